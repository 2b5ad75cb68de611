"""Pure-torch reference implementations of tuneforge's ops.

They are the fallback when no compiled kernel is available and the oracle every compiled kernel is tested
against, so they favour the plainest correct math over speed.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention_reference"]


def attention_reference(q, k, v, *, causal: bool = True, key_padding_mask=None, scale=None):
    """softmax(q k^T * scale + mask) v, explicitly.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tq <= Tk. ``causal`` is bottom-right aligned: query i sits at
    absolute position Tk - Tq + i (the newest tokens after a KV cache) and sees keys at positions <= that.
    key_padding_mask: bool (B, Tk), True = a real token. A query that sees no key returns zeros.
    """
    Tq, Tk, D = q.size(-2), k.size(-2), q.size(-1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # Softmax in (at least) float32: bf16 has too few mantissa bits for a sum over thousands of keys.
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)  # (Tq, Tk)
    if causal:
        allowed = allowed.tril(diagonal=Tk - Tq)
    allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()  # (B, 1, Tq, Tk)
    # The most negative finite float rather than -inf: a row with no allowed key then softmaxes to a finite
    # uniform row (not NaN, whose backward would poison the gradients), which is zeroed just below.
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # a query that sees nothing: zeros
    return torch.matmul(probs, v.to(acc)).to(q.dtype)  # (B, H, Tq, D)
