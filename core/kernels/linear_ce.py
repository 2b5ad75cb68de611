"""The fused linear + cross-entropy behind the Python face: argument checks, autocast, and the compiled op's call.

``tuneforge::linear_cross_entropy`` (``csrc/linear_ce.h``) runs on the CPU; everywhere else the chunked pure-torch
twin (``reference.linear_cross_entropy_reference``) runs. Which one a call takes is decided in
``tuneforge.kernels``; this module checks and prepares the arguments both receive, and calls the compiled op.
"""
from __future__ import annotations

import torch

__all__ = ["prepare", "compiled"]

_REDUCTIONS = ("mean", "sum", "none")


def prepare(hidden, weight, target, bias, ignore_index: int, label_smoothing: float, reduction: str):
    """Checked, flattened and autocast inputs: ``(hidden (N, C), weight, target (N,) int64, bias, shape)`` where
    ``shape`` is the target's shape (what reduction none returns). Raises ValueError / TypeError saying what is
    wrong and what to pass instead."""
    where = "linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{where}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.size(-1) != weight.size(1):
        raise ValueError(f"{where}: hidden must be (..., C) and weight (V, C) with the same C, got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    V = weight.size(0)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{where}: target must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(target.shape)}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{where}: bias must be (V,) = ({V},), got {tuple(bias.shape)}")
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    if any(not t.is_floating_point() for t in inputs):
        raise TypeError(f"{where}: hidden, weight and bias must be floating point, got "
                        f"{[str(t.dtype) for t in inputs]}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{where}: target must hold class indices (int64), got {target.dtype}")
    devices = {t.device for t in (*inputs, target)}
    if len(devices) != 1:
        raise ValueError(f"{where}: hidden, weight, target and bias must be on one device, got "
                         f"{sorted(map(str, devices))}: move them with .to(hidden.device)")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # as F.linear would be: a custom op is not autocast-aware
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif len({t.dtype for t in inputs}) != 1:
        raise TypeError(f"{where}: hidden, weight and bias must share one dtype (or run under torch.autocast), got "
                        f"{[str(t.dtype) for t in inputs]}")
    target = target.reshape(-1).to(torch.int64)  # (N,)
    bad = ((target < 0) | (target >= V)) & (target != ignore_index)  # (N,)
    if bool(bad.any()):  # one host sync on CUDA, as F.cross_entropy's own device-side assert would cost a crash
        first = int(target[bad][0])
        raise ValueError(f"{where}: target {first} is outside the vocabulary [0, {V}) and is not ignore_index "
                         f"({ignore_index}): check the tokenizer's vocabulary against the head's {V} rows")
    return hidden.reshape(-1, hidden.size(-1)), weight, target, bias, tuple(hidden.shape[:-1])


def compiled(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """The compiled op on prepared inputs; gradients are made (in its forward, for mean and sum) only for the
    tensors that require them while grad mode is on."""
    grad = torch.is_grad_enabled()
    needs = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    with torch.autocast(hidden.device.type, enabled=False):  # inputs are cast already; sums stay float32
        return torch.ops.tuneforge.linear_cross_entropy(hidden, weight, bias, target, int(ignore_index),
                                                        float(label_smoothing), reduction, needs, 0)[0]
