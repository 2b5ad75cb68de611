"""What ``tuneforge demo`` leaves to read: every row judged against its target, the table, the loss curves
(``loss_curves.png``, with the ``plot`` extra) and ``report.md``, one page with the table, the curves and the
samples."""
from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import torch

from tuneforge.common.names import inside
from tuneforge.tools.demo_stage import format_table

__all__ = ["TARGETS", "judge", "plot_curves", "write_report", "print_report"]


def _ref(rows: list[dict], mechanism: str) -> float:
    return next(r["value"] for r in rows if r["mechanism"] == mechanism)


FULL = "finetune (all layers + head)"

# (row's mechanism, row's metric) -> (the target as written, the check). A check sees the row and every row, so a
# target can be relative to a reference row. Rows with no entry are reported without a target.
TARGETS = {
    # 2,000 AdamW steps gave 0.285-0.288 at seeds 0, 1, 2 (unigram: 4.20); the shorter Muon schedule lands as low
    ("pretrain", "held-out bits/token"): ("≤ 0.30", lambda r, rows: r["value"] <= 0.30),
    ("finetune (last 2 blocks + head)", "sentiment accuracy"): ("≥ 0.95", lambda r, rows: r["value"] >= 0.95),
    **{(name, "sentiment accuracy"): ("≥ 0.95 × full fine-tuning, < 3% of the weights",
                                      lambda r, rows: r["value"] >= 0.95 * _ref(rows, FULL) and r["trainable_pct"] < 3)
       for name in ("adapter (serial) + head", "adapter (parallel) + head", "lora (rank 8 on q, v) + head")},
    ("prompt-tuning (sentiment)", "sentiment accuracy"): (
        "≥ 0.90 × full fine-tuning, < 1% of the weights",
        lambda r, rows: r["value"] >= 0.90 * _ref(rows, FULL) and r["trainable_pct"] < 1),
    ("prompt-tuning (topic)", "topic accuracy"): ("≥ 0.90", lambda r, rows: r["value"] >= 0.90),
    ("prompt-tuning (both, one mixed batch)", "accuracy, both tasks"): (
        "each row scores as its task alone (≤ 1e-4)", lambda r, rows: r["max_abs_diff_vs_alone"] <= 1e-4),
    ("sft (lora) on builtin:instruct", "held-out exact match"): ("≥ 0.90", lambda r, rows: r["value"] >= 0.90),
    ("reward model, ties modelled (Davidson)", "held-out pairwise accuracy"): (
        "≥ 0.90, P(tie) higher on real ties",
        lambda r, rows: r["value"] >= 0.90 and r["tie_prob_on_ties"] > r["tie_prob_on_strict"]),
    **{(f"{name} (lora policy)", "win rate vs reference (hidden preference)"): (
        f"≥ {least:.2f}", lambda r, rows, least=least: r["value"] >= least)
       for name, least in (("ppo", 0.75), ("grpo", 0.75), ("dpo", 0.70))},
    **{(f"{name} (lora policy)", "KL per token to the reference"): ("≤ 0.3 nats", lambda r, rows: r["value"] <= 0.3)
       for name in ("ppo", "grpo")},
    **{(f"{name} (lora policy)", "in-vocabulary words in its samples"): ("≥ 0.95", lambda r, rows: r["value"] >= 0.95)
       for name in ("ppo", "grpo", "dpo")},
}


def judge(rows: list[dict], quick: bool = False) -> list[dict]:
    """Each row with a target gains ``target`` (as written) and ``met``; in a --quick demo nothing trains long
    enough to be judged, so rows keep their target and ``met`` is None."""
    for r in rows:
        target = TARGETS.get((r["mechanism"], r["metric"]))
        if target is not None:
            r["target"] = target[0]
            r["met"] = None if quick else bool(target[1](r, rows))
    return rows


def plot_curves(curves: dict[str, list[float]], path: Path) -> bool:
    """Training loss (or reward) of every stage, one panel each; False (and nothing written) without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = 5
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.5 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, curves.items()):
        ax.plot(range(1, len(values) + 1), values, lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.suptitle("training loss per stage (RL stages: mean reward per step)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _mark(r: dict) -> str:
    if "target" not in r:
        return ""
    return r["target"] + {True: " ✓", False: " ✗", None: ""}[r["met"]]


def _markdown_table(rows: list[dict]) -> str:
    lines = ["| stage | mechanism | trainable | % of model | train s | metric | value | target |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.get('stage', '')} | {r['mechanism']} | {r['trainable_params']:,} | "
                     f"{r['trainable_pct']:.2f} | {r['seconds']:.1f} | {r['metric']} | {r['value']:.4f} | {_mark(r)} |")
    return "\n".join(lines)


def _exceptions(rows: list[dict], precision: str) -> str:
    """`` (fp32: sft, ppo, grpo)``: the stages whose runs recorded another precision than the demo's, or ''."""
    other: dict[str, list[str]] = {}
    for r in rows:
        ran, name = r.get("precision"), r.get("stage")
        if ran and name and ran != precision and name not in other.setdefault(ran, []):
            other[ran].append(name)
    return "".join(f" ({p}: {', '.join(names)})" for p, names in other.items())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def write_report(out: Path, rows: list[dict], stages: dict[str, float], samples: list[str], plotted: bool, *,
                 seed: int, quick: bool, unigram: float, precision: str = "fp32") -> Path:
    """``report.md``: when and where it ran, the judged table, each stage's time, the curves and the samples."""
    met = [r["met"] for r in rows if r.get("met") is not None]
    verdict = ("--quick: a smoke run, too short to judge against the targets" if quick else
               f"{sum(met)} of {len(met)} targets met")
    parts = [
        f"# tuneforge demo{' --quick' if quick else ''}, seed {seed}",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {machine()}, training in {precision}"
        f"{_exceptions(rows, precision)}. "
        f"{sum(stages.values()) / 60:.1f} minutes in all. **{verdict}.**",
        "",
        "Accuracies are on held-out records. Win rates: the policy's response beats the reference's on held-out "
        "prompts by the world's hidden preference, ties count half, 0.5 = no better. Pretraining's unigram baseline "
        f"is {unigram:.3f} bits/token (a model that learned nothing). `train s` is the training loop's time; the "
        "stage times below include evaluation and saving.",
        "",
        _markdown_table(rows),
        "",
        "## Stage times",
        "",
        " · ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items()),
        "",
        "## Loss curves",
        "",
        "![loss curves](loss_curves.png)" if plotted else
        "Not drawn: matplotlib is not installed (`pip install 'tuneforge[plot]'`, which `make demo` does).",
        "",
        "## Samples",
        "",
        "The pretrained model (temperature 0.7, top-k 40), then held-out ranking prompts answered by the reference "
        "and each policy (temperature 0.7, same seed).",
        "",
        "```",
        *samples,
        "```",
        "",
        "Every figure is also in `demo.json`; every stage's run folder (checkpoint, `metrics.jsonl`, "
        "`summary.json`) is beside this file.",
        "",
    ]
    path = inside(out, "report.md")
    path.write_text("\n".join(parts))
    return path


def print_report(rows: list[dict], samples: list[str], out: Path, plotted: bool, unigram: float,
                 stages: dict[str, float], quick: bool) -> None:
    shown = [{**r, "metric": f"{r['metric']} [{_mark(r)}]" if "target" in r else r["metric"]} for r in rows]
    print("\n" + format_table(shown))
    met = [r["met"] for r in rows if r.get("met") is not None]
    print(f"\n(pretrain: the unigram baseline is {unigram:.3f} bits/token; a model that learned nothing scores about "
          "that. Accuracies are on held-out records; prompt-tuning % is of the base model. Win rates: the policy's "
          "response beats the reference's on held-out prompts by the world's hidden preference, ties count half; "
          "0.5 = no better.)")
    print("\nsamples of the pretrained model (temperature 0.7, top-k 40), then held-out ranking prompts answered by "
          "the reference and each policy (temperature 0.7, same seed):")
    for text in samples:
        print("  " + text.replace("\n", " | "))
    curves = f"loss curves in {out / 'loss_curves.png'}" if plotted else \
        "no loss curves: matplotlib is not installed (pip install 'tuneforge[plot]')"
    print(f"\n{sum(stages.values()) / 60:.1f} minutes; "
          + ("--quick: too short to judge against the targets" if quick else f"{sum(met)} of {len(met)} targets met")
          + f". Rows in {out / 'demo.json'}, one page in {out / 'report.md'}; {curves}; checkpoints in the stage "
          f"folders of {out}", file=sys.stdout)
