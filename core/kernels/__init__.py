"""The Python face of tuneforge's kernels: one function per op, dispatching to the best available backend.

Today every op runs its pure-torch reference (``reference.py``); compiled C++/CUDA backends plug in here.
"""
from __future__ import annotations

from .reference import attention_reference

__all__ = ["flash_attention", "backend"]


def flash_attention(q, k, v, *, causal: bool = True, key_padding_mask=None, scale=None):
    """Scaled dot-product attention. q: (B, H, Tq, D), k/v: (B, H, Tk, D) -> (B, H, Tq, D).

    ``causal`` is bottom-right aligned (query i is at position Tk - Tq + i), ``key_padding_mask`` is bool
    (B, Tk) with True for real tokens, ``scale`` defaults to 1/sqrt(D); fully-masked queries give zeros.
    """
    return attention_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def backend() -> dict[str, str]:
    """Which implementation each op runs."""
    return {"flash_attention": "reference"}
