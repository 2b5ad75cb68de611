"""A run's numeric precision (``--precision``): the autocast context its forwards run in and the dtype of its weights.

- ``fp32``: every weight float32, nothing autocast.
- ``bf16-mixed`` (recommended for speed): the forwards of the loss, of the evaluation and of data an objective
  makes with the model (rollouts) run under ``torch.autocast(dtype=bfloat16)``; the weights that train stay
  float32 (master weights), so the optimizer state and the checkpoints are float32; the backward runs outside
  autocast, as torch recommends. Losses and log-probabilities are reduced in float32 by the objectives
  (``logits.float()``); a loss that comes back in a lower precision is said once.
- ``bf16``: every weight cast to bfloat16 before the optimizer is made, so the optimizer state and checkpoints are
  bfloat16 too. An update smaller than a weight's bfloat16 spacing (2^-8 of its size) rounds away: there is no
  stochastic rounding or Kahan summation here, so long or low-learning-rate runs learn less than bf16-mixed.

A model that already holds low-precision weights (``hf:PATH?dtype=bfloat16``, or the bfloat16 an HF model gets
by default on CUDA) is made to keep the run's promise: under bf16-mixed its trained parameters become float32
master weights and its frozen ones stay bfloat16 (autocast computes in bfloat16 anyway); under fp32 a dtype the
user asked for in ``--model`` is refused (the two options contradict each other) and a default one is cast to
float32, said in the log.

Dispatching: the compiled ops follow autocast by rules registered with them (:mod:`tuneforge.kernels.native`) or in
their Python faces (attention, linear_cross_entropy).
"""
from __future__ import annotations

import contextlib

import torch

from tuneforge.errors import ConfigError

__all__ = ["MIXED", "master_dtype", "autocast", "prepare_run", "prepare_model", "asked_dtype",
           "resume_note", "low_precision_loss", "say_low_loss"]

MIXED = "bf16-mixed"
_LOW = torch.bfloat16


def master_dtype(precision: str) -> torch.dtype:
    """The dtype of the weights that train, of their optimizer state and of the checkpoints."""
    return _LOW if precision == "bf16" else torch.float32


def autocast(precision: str, device: torch.device):
    """The context a forward of the run runs in: ``torch.autocast`` to bfloat16 under bf16-mixed, else nothing.
    Never put a backward inside it."""
    if precision != MIXED:
        return contextlib.nullcontext()
    device = torch.device(device)
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"--precision {MIXED}: torch has no autocast for {device.type} tensors; use --precision "
                          "fp32 or bf16 on this device")
    return torch.autocast(device.type, dtype=_LOW)


def prepare_run(model: torch.nn.Module, run, *, resumed: dict | None = None) -> None:
    """:func:`prepare_model` for ``run`` (its --precision and --model), recorded in its summary; ``resumed``: the
    state.json of the checkpoint about to load, whose precision may differ (said in the log)."""
    cfg = run.config
    run.summary["precision"] = cfg.precision
    run.summary["weight_dtypes"] = prepare_model(model, cfg.precision, asked_dtype=asked_dtype(cfg.model), log=run.log)
    note = resume_note((resumed.get("train") or {}).get("precision"), cfg.precision) if resumed is not None else None
    if note:
        run.log(f"resuming: {note}")


def asked_dtype(model_spec: str | None) -> str | None:
    """The weights' dtype ``--model`` names explicitly (``hf:PATH?dtype=bfloat16``), if it does."""
    _, _, query = (model_spec or "").partition("?")
    asked = [v for k, _, v in (item.partition("=") for item in query.split("&")) if k == "dtype"]
    return asked[-1] if asked else None


def prepare_model(model: torch.nn.Module, precision: str, *, asked_dtype: str | None = None, log=print) -> dict:
    """Give ``model``'s parameters the dtypes ``precision`` promises, in place (the Parameter objects stay, so
    tied weights, the frozen-weight bookkeeping and hooks keep them). Call it after assembling and before loading
    a checkpoint into the model (a float32 checkpoint then loads into float32 weights) and before the optimizer is
    made. Buffers (rotary frequencies, masks) keep their dtype.

    :param asked_dtype: the dtype ``--model`` asked for explicitly (``?dtype=...``), if any.
    :returns: ``{dtype name: parameter count}`` after the change, for the summary.
    :raises ConfigError: --precision fp32 on weights the user asked to load in a lower precision.
    """
    params = list({id(p): p for p in model.parameters()}.values())  # tied weights once
    low = [p for p in params if p.is_floating_point() and p.dtype != torch.float32]
    if precision == "bf16":
        _cast(params, _LOW)
    elif precision == MIXED:
        trained = [p for p in low if p.requires_grad]
        if trained:
            _cast(trained, torch.float32)
            log(f"--precision {MIXED}: {_count(trained)} trained parameters were {_dtypes(trained)}; they train as "
                "float32 master weights (the frozen ones keep their dtype: autocast computes in bfloat16 anyway)")
        # float16 (or another low dtype) beside bfloat16 activations would meet ops that autocast does not cast
        _cast([p for p in low if not p.requires_grad and p.dtype != _LOW], _LOW)
    elif low:
        if asked_dtype and asked_dtype not in ("float32", "float"):
            raise ConfigError(
                f"--model asks for dtype={asked_dtype} weights ({_count(low)} parameters) but --precision is fp32, "
                "which trains and computes in float32. Pass --precision bf16-mixed (recommended: the "
                "trained weights become float32, the frozen ones stay bfloat16, compute in bfloat16) or --precision "
                "bf16 (everything bfloat16), or drop ?dtype= from --model.")
        _cast(low, torch.float32)
        log(f"--precision fp32: the model's {_count(low)} {_dtypes(low)} parameters (its default dtype on this "
            "device) were cast to float32; pass --precision bf16-mixed or bf16 to keep them in bfloat16")
    counts: dict[str, int] = {}
    for p in params:
        name = str(p.dtype).replace("torch.", "")
        counts[name] = counts.get(name, 0) + p.numel()
    return counts


def _cast(params, dtype: torch.dtype) -> None:
    for p in params:
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)  # the same Parameter object: ties and identities hold


def _count(params) -> str:
    return f"{sum(p.numel() for p in params):,}"


def _dtypes(params) -> str:
    return "/".join(sorted({str(p.dtype).replace("torch.", "") for p in params}))


def resume_note(saved: str | None, precision: str) -> str | None:
    """What resuming a checkpoint of a run with ``--precision saved`` under ``precision`` does, when they differ:
    the weights and optimizer state are cast to this run's dtypes as they load."""
    saved = saved or "fp32"  # checkpoints from before --precision are float32
    if saved == precision:
        return None
    before, after = master_dtype(saved), master_dtype(precision)
    if before == after:
        return (f"the checkpoint was trained with --precision {saved}; its {str(before).replace('torch.', '')} "
                f"weights continue under --precision {precision}")
    loss = " (rounding them: updates below bfloat16's spacing are lost from here on)" if after == _LOW else ""
    return (f"the checkpoint holds {str(before).replace('torch.', '')} weights (--precision {saved}); they and the "
            f"optimizer state are cast to {str(after).replace('torch.', '')} for --precision {precision}{loss}")


def low_precision_loss(loss: torch.Tensor) -> bool:
    """Whether a loss was reduced in less than float32 (an objective that forgot ``logits.float()``)."""
    return torch.is_tensor(loss) and loss.is_floating_point() and torch.finfo(loss.dtype).bits < 32


def say_low_loss(loss: torch.Tensor, run) -> bool:
    """Log (and return True) when ``loss`` was reduced in less than float32 under a bfloat16 precision."""
    if run.config.precision == "fp32" or not low_precision_loss(loss):
        return False
    run.log(f"WARNING: the objective's loss is {str(loss.dtype).replace('torch.', '')}: under --precision "
            f"{run.config.precision} reduce it in float32 (cast the logits with .float() before the cross-entropy), "
            "or the small differences between its terms are lost")
    return True
