"""The options a run leaves to the engine (``--batch-size``, ``--seq-len``, ``--lr``, ``--warmup``), sized to the
model, to what trains and to the machine, resolved once after the plugins chose what trains and printed at start.

Why by the model: the toy presets train from scratch at 3e-3 on batches of 16 windows of their whole context; a
pretrained model of 0.1-8B parameters with an 8K context would get a (16, 8192) batch whose float32 logits alone are
24 GiB, and a learning rate that wipes out what it learned.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from tuneforge.engine.config import TrainConfig

__all__ = ["Resolved", "resolve", "MAX_DEFAULT_SEQ_LEN", "SCRATCH_LR", "NEW_PARAMS_LR", "PRETRAINED_LR", "SCRATCH_BATCH"]

MAX_DEFAULT_SEQ_LEN = 1024  # a longer context is asked for with --seq-len
SCRATCH_LR = 3e-3  # the embedded presets from random weights
NEW_PARAMS_LR = 2e-4  # only what mechanisms added trains (LoRA, adapters, soft prompts, a new head)
PRETRAINED_LR = 3e-5  # pretrained weights themselves train (fine-tuning)
SCRATCH_BATCH = 16
WARMUP = 30
BATCH_CHOICES = (8, 4, 2, 1)
# Bytes of activations kept for the backward, per token and per layer and model width, in float32: attention
# inputs and outputs, the MLP's (4x wide) hidden, norms and residuals: ~34 values of d per layer (the estimate
# used by Korthikanti et al. for a GPT block without recomputation), at 4 bytes.
_ACT_BYTES_PER_TOKEN_LAYER_WIDTH = 34 * 4


@dataclasses.dataclass
class Resolved:
    config: TrainConfig
    lines: list[str]  # what was chosen and why, one line per option the run left to the engine


def _free_memory(device: torch.device) -> int:
    """Bytes this process could still use on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _activation_bytes(model_config, seq_len: int) -> int:
    """Activation bytes of one sequence of ``seq_len`` tokens (no checkpointing, float32)."""
    return seq_len * model_config.n_layers * model_config.d_model * _ACT_BYTES_PER_TOKEN_LAYER_WIDTH


def resolve(cfg: TrainConfig, model_config, *, pretrained: bool, only_new: bool | None, device: torch.device,
            prefix_tokens: int = 0, free_bytes: int | None = None) -> Resolved:
    """Fill the options ``cfg`` leaves as None.

    The engine calls it twice: before the plugins change the model (``only_new`` None: the batch size alone, which
    a plugin may read while it does, e.g. a head sized from the data), then once what trains and the soft prompt's
    length are known (the rest).

    :param pretrained: the base holds trained weights (a Hugging Face or GGUF model, or ``--init``).
    :param only_new: every trainable parameter was added by a mechanism (none of the base's trains); None: not
        known yet, only ``batch_size`` is filled.
    :param prefix_tokens: context positions a soft prompt takes before each row.
    :param free_bytes: memory left for activations (default: measured on ``device``).
    """
    changes, lines = {}, []
    context = int(model_config.max_seq_len) - prefix_tokens
    if cfg.seq_len is None and context > MAX_DEFAULT_SEQ_LEN and only_new is not None:
        changes["seq_len"] = MAX_DEFAULT_SEQ_LEN
        lines.append(f"--seq-len {MAX_DEFAULT_SEQ_LEN} (the model's context is {context}; ask for more with --seq-len)")
    seq_len = changes.get("seq_len") or cfg.seq_len or min(context, MAX_DEFAULT_SEQ_LEN)
    if cfg.batch_size is None:
        if not pretrained:
            changes["batch_size"] = SCRATCH_BATCH
        else:
            free = _free_memory(device) if free_bytes is None else free_bytes
            per_row = _activation_bytes(model_config, seq_len)
            fits = [b for b in BATCH_CHOICES if b * per_row <= free // 4]
            changes["batch_size"] = fits[0] if fits else 1
            lines.append(f"--batch-size {changes['batch_size']} (activations ~{per_row * changes['batch_size'] / 2**30:.1f} "
                         f"GiB for {seq_len} tokens a row, within a quarter of the {free / 2**30:.1f} GiB free)")
    if only_new is None:
        return Resolved(cfg.replace(**changes) if changes else cfg, lines)
    if cfg.lr is None:
        if not pretrained:
            changes["lr"] = SCRATCH_LR
        else:
            changes["lr"] = NEW_PARAMS_LR if only_new else PRETRAINED_LR
            why = "only parameters the mechanisms added train" if only_new else "pretrained weights train"
            lines.append(f"--lr {changes['lr']:g} (a pretrained model, {why})")
    if cfg.warmup is None:
        changes["warmup"] = WARMUP if not pretrained else min(WARMUP, max(1, cfg.steps // 10))
        if pretrained:
            lines.append(f"--warmup {changes['warmup']}")
    return Resolved(cfg.replace(**changes) if changes else cfg, lines)
