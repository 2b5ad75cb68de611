"""What the stages of ``tuneforge demo`` share: the folder the demo owns, each stage's run folder, the table's
rows and the state the stages add to (:class:`Demo`)."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from tuneforge.common.names import inside
from tuneforge.errors import ConfigError

__all__ = ["MARKER", "STAGES", "FILES", "PRECISIONS", "Demo", "format_table", "row", "claim", "stage", "demo_precision"]

# What a demo writes in --out: a run folder per stage, which the next demo replaces, and a few result files.
# A folder holding anything else is not the demo's to empty (--out runs would otherwise delete a run called lora).
MARKER = ".tuneforge-demo"
STAGES = frozenset({
    "pretrain", "finetune", "finetune-all", "head-only", "adapter-serial", "adapter-parallel", "lora",
    "prompt-sentiment", "prompt-topic", "mixed-batch", "prompting-bare", "prompting", "reward-model-davidson",
    "reward-model-ignore", "sft", "ppo", "grpo", "dpo",
})
FILES = frozenset({MARKER, "demo.json", "samples.txt", "loss_curves.png", "report.md"})
PRECISIONS = ("auto", "fp32", "bf16-mixed")  # tuneforge demo --precision


def demo_precision(asked: str = "auto", cpuinfo: str | None = None) -> str:
    """The --precision the demo's runs train in. ``auto``: bf16-mixed where the hardware multiplies bfloat16
    natively (a CUDA GPU; a CPU with AVX512-BF16 or AMX, read from ``cpuinfo``, /proc/cpuinfo by default), where it
    made the demo's stages 1.2-1.4x faster (benchmarks/RESULTS.md); fp32 elsewhere, where bfloat16 is emulated
    and slower than float32."""
    if asked != "auto":
        return asked
    if torch.cuda.is_available():
        return "bf16-mixed"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no flags to read
            return "fp32"
    return "bf16-mixed" if re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) else "fp32"


def format_table(rows: list[dict]) -> str:
    head = ["mechanism", "trainable params", "% of model", "seconds", "metric", "value"]
    body = [[r["mechanism"], f"{r['trainable_params']:,}", f"{r['trainable_pct']:.2f}", f"{r['seconds']:.1f}",
             r["metric"], f"{r['value']:.4f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def row(name: str, result, metric: str, key: str, total: int | None = None) -> dict:
    s = result.summary
    return {"mechanism": name, "trainable_params": s["trainable_params"],
            "trainable_pct": 100.0 * s["trainable_params"] / (total or s["total_params"]),
            "seconds": s["seconds"], "metric": metric, "value": float(result.metrics[key]),
            "precision": s.get("precision")}


def claim(out: Path) -> None:
    """Make ``out`` the demo's folder: new, empty, or an earlier demo's (its marker, or only the names a demo
    writes); anything else is refused before a stage folder is replaced."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"demo --out {out} is a file, not a folder: nothing was written; give a folder path")
    if out.is_dir() and not (out / MARKER).is_file():
        other = sorted(p.name for p in out.iterdir() if p.name not in STAGES | FILES)
        if other:
            raise ConfigError(f"demo --out {out} holds files that are not a demo's ({', '.join(other[:5])}"
                              f"{', ...' if len(other) > 5 else ''}): nothing was changed. Give a new or empty folder: "
                              "the demo replaces its stage folders (pretrain, lora, ...) there")
    out.mkdir(parents=True, exist_ok=True)
    inside(out, MARKER).write_text(json.dumps({"format": "tuneforge.tools.demo", "stages": sorted(STAGES)}) + "\n")


def stage(out: Path, name: str, note: str) -> Path:
    """The stage's run folder, emptied of an earlier demo's run: only a known stage name inside ``out``, which
    :func:`claim` made the demo's own."""
    if name not in STAGES:
        raise ValueError(f"demo stage {name!r} is not in STAGES; add it there")  # a mistake in this file
    print(f"\n== {name}: {note}", file=sys.stderr)
    folder = inside(out, name)
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)
    return folder


@dataclasses.dataclass
class Demo:
    """What the stages share: the folder, the quick switch and seed, and what they add to the table, the loss
    curves, the samples and each stage's wall time (``times``: training, evaluation and saving)."""

    out: Path
    quick: bool
    seed: int
    precision: str = "fp32"  # of every training stage (demo_precision)
    rows: list[dict] = dataclasses.field(default_factory=list)
    curves: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    samples: list[str] = dataclasses.field(default_factory=list)
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    _current: tuple[str, float] | None = None

    def n(self, full, short):
        """``full`` in the real demo, ``short`` with --quick."""
        return short if self.quick else full

    @property
    def common(self) -> dict:
        return dict(seed=self.seed, eval_every=0, precision=self.precision)

    @property
    def sampling(self) -> dict:
        """:attr:`common` for the stages that mostly sample (sft's exact-match answers, ppo's and grpo's rollouts):
        always fp32. Sampling under bfloat16 autocast was slower here: 64 rows x 48 tokens of ``tiny`` 0.61 s
        against 0.21 in fp32 (autocast casts the weights again on every one of the many small forwards); on seed 0
        ppo took 53 s against 35, grpo 31 against 20, and sft's greedy exact match read 0.9025 against 0.9275."""
        return {**self.common, "precision": "fp32"}

    def stage(self, name: str, note: str) -> Path:
        """Start stage ``name`` (its folder, as :func:`stage`), ending the one before: its time is printed and
        kept in ``times``."""
        self.end()
        folder = stage(self.out, name, note)
        self._current = (name, time.perf_counter())
        return folder

    def end(self) -> None:
        """End the current stage, if any: print its time, keep it, and put it on the stage's rows."""
        if self._current is None:
            return
        name, started = self._current
        self._current = None
        self.times[name] = round(time.perf_counter() - started, 1)
        for r in self.rows:
            if r.get("stage") == name:
                r["stage_seconds"] = self.times[name]
        print(f"-- {name}: {self.times[name]:.1f} s (stage total: training, evaluation, saving)", file=sys.stderr)

    def add(self, row: dict, curve: str | None = None, result=None) -> None:
        """A row of the current stage; ``curve``: the name its training loss is drawn under."""
        if self._current is not None:
            row["stage"] = self._current[0]
        self.rows.append(row)
        if curve is not None:
            self.curves[curve] = [h["loss"] for h in result.history]
