"""Proof that weights did not change: a SHA-256 over the exact bytes of named tensors.

The engine takes it over every parameter that does not train, before the first step and after the last, and
writes both into the run summary (``frozen_weights``). ``prompting`` rests on it (nothing may change), and so do
the frozen bases of prompt tuning, adapters and LoRA: a plugin that writes into a frozen weight is caught.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

__all__ = ["weights_digest", "frozen_named"]


def frozen_named(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter that does not train and every buffer, each shared tensor once."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or p.requires_grad:
            continue
        seen.add(id(p))
        out.append((name, p))
    for name, b in model.named_buffers():
        if id(b) not in seen:
            seen.add(id(b))
            out.append((name, b))
    return out


def weights_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hex SHA-256 over each tensor's name, dtype, shape and bytes, in name order (so order of discovery and
    device do not matter, and any changed bit does)."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda nt: nt[0]):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Bytes via a uint8 view: exact for every dtype (bfloat16 included), no float formatting involved.
        flat = t.contiguous().reshape(-1).cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()
