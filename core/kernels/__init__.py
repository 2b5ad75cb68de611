"""The Python face of tuneforge's kernels: one function per op, dispatching to the best available backend.

Today every op runs its pure-torch reference (``reference.py``). Compiled C++/CUDA backends plug in by
changing ``_IMPLEMENTATIONS`` below, the one place that decides which code runs; ``backend()`` reports it.
"""
from __future__ import annotations

from .reference import attention_reference

__all__ = ["flash_attention", "backend", "attention_reference"]

# op name -> (backend name, callable). The only dispatch table: the model calls flash_attention(), never a backend.
_IMPLEMENTATIONS = {
    "flash_attention": ("reference", attention_reference),
}


def flash_attention(q, k, v, *, causal: bool = True, key_padding_mask=None, scale=None):
    """Scaled dot-product attention. q: (B, H, Tq, D), k/v: (B, H, Tk, D) -> (B, H, Tq, D) in q's dtype.

    ``causal`` is bottom-right aligned (query i is at position Tk - Tq + i, so new queries after a KV cache see
    every cached key), ``key_padding_mask`` is bool (B, Tk) with True for real tokens, ``scale`` defaults to
    1/sqrt(D). A query that sees no key returns zeros (never NaN). Softmax runs in float32 at least.
    """
    impl = _IMPLEMENTATIONS["flash_attention"][1]
    return impl(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def backend() -> dict[str, str]:
    """Which implementation each op runs, e.g. ``{"flash_attention": "reference"}``."""
    return {op: name for op, (name, _) in _IMPLEMENTATIONS.items()}
