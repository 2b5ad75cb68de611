"""The options of a training run, from keyword arguments, a TOML file and the command line (in that order
of precedence: command line over file over defaults).

A config file looks like::

    model = "tiny"
    data = "builtin:text"
    steps = 600
    lr = 3e-3

    [mechanisms.pretrain]          # one table per mechanism, in the order they register
    eval_batches = 8

Top-level keys are the fields of :class:`TrainConfig`; ``[mechanisms.NAME]`` tables name the mechanisms and
their options (``mechanisms = ["pretrain"]`` also works when no options are needed).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional

from tuneforge.errors import ConfigError
from tuneforge.common.options import OptionError, build_options, check_range, describe_options, suggest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["TrainConfig", "load_config", "STRATEGIES", "PRECISIONS", "OPTIMIZERS", "FIELD_HELP", "checkpointing_every"]

#: How the processes of a torchrun job share the work (see tuneforge.engine.distributed).
STRATEGIES = ("ddp", "fsdp")
#: --precision: fp32; bf16-mixed (autocast to bfloat16 over fp32 master weights); bf16 (weights in bfloat16 too).
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
#: --optimizer: AdamW; Muon on the hidden matrices with AdamW on the rest (tuneforge.engine.muon).
OPTIMIZERS = ("adamw", "muon")


# Help for each TrainConfig field, which becomes a --flag of `tuneforge train` (one source of truth for names),
# kept beside the fields so a new option gets its help where it is declared.
FIELD_HELP = {
    "model": "model preset with optional overrides, e.g. tiny, small, 'tiny:n_layers=2,d_model=64', or a local "
             "Hugging Face folder hf:PATH (options: 'hf:PATH?attn=sdpa&dtype=bfloat16'; never downloaded) "
             "(default: tiny, or the architecture of --init)",
    "data": "builtin:NAME (text, sentiment, topic, rankings), a .txt file or a .jsonl file (default: builtin:text)",
    "eval_data": "held-out data (default: the builtin test split, or the last part of a file)",
    "out": "run folder for checkpoints, metrics.jsonl, summary.json (default: write nothing)",
    "steps": "optimizer steps (default: 300)",
    "batch_size": "sequences per micro-batch, per process (default: 16 on the embedded models; on a pretrained model "
                  "the largest of 8, 4, 2, 1 whose activations fit a quarter of the free memory; printed at start); "
                  "N processes train on N micro-batches at once",
    "seq_len": "tokens per sequence (default: the model's context length, at most 1024; printed at start)",
    "grad_accum": "micro-batches per optimizer step (default: 1)",
    "lr": "peak learning rate of the optimizer (default: 3e-3 when the whole model trains from scratch; on a pretrained "
          "model 2e-4 when only parameters the mechanisms added train (LoRA, adapters, soft prompts, a new head), "
          "else 3e-5; printed at start)",
    "min_lr_ratio": "the cosine schedule ends at lr * this (default: 0.1)",
    "warmup": "linear warmup steps (default: 30, at most a tenth of --steps)",
    "optimizer": "adamw, or muon: torch's Muon on the hidden weight matrices (the linear layers' weights, not the "
                 "embeddings or the output head) and AdamW on the rest, one --lr and schedule for both; it reached "
                 "the tiny model's pretraining loss in about half the tokens (benchmarks/RESULTS.md); one process or "
                 "ddp (default: adamw)",
    "weight_decay": "decoupled weight decay on matrices, AdamW's and Muon's (default: 0.1)",
    "beta1": "AdamW beta1 (default: 0.9)",
    "beta2": "AdamW beta2 (default: 0.95)",
    "clip": "max gradient norm, 0 = no clipping (default: 1.0)",
    "eval_every": "steps between evaluations, 0 = only at the end (default: 100)",
    "save_every": "steps between checkpoints, 0 = only at the end and on Ctrl-C/SIGTERM (default: 0)",
    "keep_last": "checkpoints kept in the run folder (default: 3)",
    "resume": "'auto' (latest checkpoint in --out, or a fresh start if none) or a checkpoint/run folder",
    "init": "start from the weights of this checkpoint or run folder (fresh optimizer)",
    "seed": "seed of initialisation and data order (default: 0)",
    "device": "auto, cpu, cuda, cuda:1 ... (default: auto; under torchrun auto/cuda is each process's GPU)",
    "strategy": "how processes started by torchrun or --nproc-per-node share the work: ddp (every process holds the "
                "model, gradients are averaged) or fsdp (FSDP2: parameters, gradients and optimizer state are "
                "sharded over the processes) (default: ddp)",
    "max_nonfinite": "stop after this many non-finite losses in a row (default: 10)",
    "log_every": "steps between log lines when stderr is not a terminal (default: 50)",
    "checkpointing": "activation checkpointing: none, blocks (recompute every block's activations in the backward "
                     "instead of keeping them) or every:N (every N-th block) (default: none)",
    "precision": "fp32; bf16-mixed (recommended: forwards under torch.autocast to bfloat16 over float32 master "
                 "weights, optimizer state and checkpoints; losses reduced in float32); or bf16 (weights, optimizer "
                 "state and checkpoints in bfloat16: half the memory, but updates smaller than a weight's bfloat16 "
                 "spacing are lost) (default: fp32)",
    "verify_frozen": "hash every frozen weight before and after the run and record in summary.json that none "
                     "changed (default: true; false skips the hashing on very large models)",
}


@dataclasses.dataclass
class TrainConfig:
    """Everything the loop needs; mechanisms bring their own options."""

    model: Optional[str] = None  # preset[:overrides] ("tiny", "tiny:n_layers=2") or "hf:PATH"; default tiny or --init's
    mechanisms: list = dataclasses.field(default_factory=list)  # "NAME:k=v" strings, (name, dict) or objects
    data: str = "builtin:text"  # builtin:NAME, a .txt or a .jsonl file
    eval_data: Optional[str] = None  # held-out data; default: the builtin test split, or the objective's own
    out: Optional[str] = None  # run folder: checkpoints, metrics.jsonl, summary.json; None = write nothing
    steps: int = 300  # optimizer steps
    batch_size: Optional[int] = None  # sequences per micro-batch; None = sized to the model (engine/defaults.py)
    seq_len: Optional[int] = None  # tokens per sequence; None = the model's context length, at most 1024
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: Optional[float] = None  # peak learning rate; None = by what trains (engine/defaults.py)
    min_lr_ratio: float = 0.1  # the cosine schedule decays to lr * min_lr_ratio
    warmup: Optional[int] = None  # linear warmup steps; None = 30, at most steps // 10
    optimizer: str = "adamw"  # adamw | muon (tuneforge.engine.muon)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max gradient norm; 0 disables clipping
    eval_every: int = 100  # steps between evaluations; 0 = only at the end
    save_every: int = 0  # steps between checkpoints; 0 = only at the end (and on SIGINT/SIGTERM)
    keep_last: int = 3  # checkpoints kept in the run folder; older ones are deleted after a newer is complete
    resume: Optional[str] = None  # "auto" (latest checkpoint in out) or a checkpoint/run folder
    init: Optional[str] = None  # start from these weights (a checkpoint or run folder), fresh optimizer
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    strategy: str = "ddp"  # under torchrun: ddp (replicas) or fsdp (FSDP2 shards); one process ignores it
    max_nonfinite: int = 10  # stop after this many non-finite losses in a row
    log_every: int = 50  # steps between log lines when stderr is not a terminal
    checkpointing: str = "none"  # none | blocks | every:N: recompute block activations in the backward
    precision: str = "fp32"  # fp32 | bf16-mixed | bf16
    verify_frozen: bool = True  # hash every frozen weight before and after, proving it did not change

    def __post_init__(self):
        # OptionError names the field; build_options turns it into "--lr must be ..." on the command line.
        positive = ("steps", "batch_size", "grad_accum", "keep_last", "max_nonfinite", "log_every")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise OptionError(name, f"must be 0 or more, got {getattr(self, name)}")
        # Every float is checked for finiteness too: NaN slips through any comparison and trains NaN weights.
        if self.lr is not None:
            check_range(self, "lr", "(0, inf)", " (the peak learning rate, e.g. 3e-3)")
        check_range(self, "min_lr_ratio", "[0, 1]", " (a share of --lr)")
        check_range(self, "weight_decay", "[0, inf)", " (0 = none)")
        check_range(self, "beta1", "[0, 1)", " (AdamW's decay of the gradient average)")
        check_range(self, "beta2", "[0, 1)", " (AdamW's decay of the squared-gradient average)")
        check_range(self, "clip", "[0, inf)", " (0 = no clipping)")
        if not 0 <= self.seed < 2**32:  # torch's generators take 64 bits; runs derive seeds from it times 1e6
            raise OptionError("seed", f"must be within 0 .. {2**32 - 1}, got {self.seed}")
        if self.strategy not in STRATEGIES:
            raise OptionError("strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise OptionError("seq_len", f"must be at least 2, got {self.seq_len}")
        if self.optimizer not in OPTIMIZERS:
            raise OptionError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        checkpointing_every(self.checkpointing)  # raises OptionError on a bad value

    def to_dict(self) -> dict[str, Any]:
        # asdict deep-copies every field; a plugin object (holding its run, models, files) is not data to copy
        d = dataclasses.asdict(dataclasses.replace(self, mechanisms=[]))
        # a plugin object as its declared name (what the checkpoint records it under), else its class's
        d["mechanisms"] = [m if isinstance(m, (str, tuple)) else m.name if isinstance(getattr(m, "name", None), str)
                           else type(m).__name__ for m in self.mechanisms]
        return d

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, values: dict[str, Any], *, source: str) -> "TrainConfig":
        """Typed construction with errors that name ``source`` (a file or 'the command line'); a source that is
        the ``tuneforge train`` command gets its options named as its flags (``--weight-decay``)."""
        spell = _flag if source.startswith("tuneforge train") else None
        return build_options(cls, values, owner=source, spell=spell)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def checkpointing_every(value: str) -> int:
    """``--checkpointing`` as the stride of checkpointed blocks: 0 for none, 1 for blocks, N for every:N.

    :raises OptionError: naming the flag and the accepted forms.
    """
    text = str(value).strip().lower()
    if text == "none":
        return 0
    if text == "blocks":
        return 1
    head, _, tail = text.partition(":")
    if head == "every" and tail.isdigit() and int(tail) >= 1:
        return int(tail)
    raise OptionError("checkpointing", f"must be none, blocks or every:N with N >= 1, got {value!r}")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML config into a dict of :class:`TrainConfig` values (mechanisms as ``(name, options)``).

    :raises ConfigError: the file is missing, is not valid TOML, or has an unknown key (named, with a hint).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; give the TOML file itself (e.g. {path / 'train.toml'})")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"--config {path} cannot be read ({exc.strerror or exc}); give a readable TOML file"
                          ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); TOML files are UTF-8: "
                          "save it as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    mechanisms: list = []
    for key, value in raw.items():
        if key == "mechanisms":
            if isinstance(value, dict):  # [mechanisms.NAME] tables, in file order
                for name, opts in value.items():
                    if not isinstance(opts, dict):
                        raise ConfigError(f"{path}: [mechanisms.{name}] must be a table of options, got {opts!r}")
                    mechanisms.append((name, opts))
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                mechanisms.extend(value)
            else:
                raise ConfigError(f"{path}: 'mechanisms' must be a list of names or [mechanisms.NAME] tables")
            continue
        if key not in TrainConfig.fields():
            raise ConfigError(
                f"{path}: unknown key '{key}'{suggest(key, TrainConfig.fields())}. "
                f"Keys: {describe_options(TrainConfig)}"
            )
        values[key] = value
    if mechanisms:
        values["mechanisms"] = mechanisms
    return values
