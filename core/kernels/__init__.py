"""The Python face of tuneforge's kernels: one function per op, dispatching to the best available backend.

Each op runs its compiled C++/CUDA kernel (``torch.ops.tuneforge.*``, see ``native.py``) where one is built and
loads, else its pure-torch reference (``reference.py``). ``_IMPLEMENTATIONS`` below is the one place that decides
which code runs; ``backend()`` reports it.

Layer: the bottom, beside ``common``. Imports torch and nothing else of tuneforge's.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from tuneforge.kernels.fused import CUDA_HEAD_SIZES, check_inputs
from tuneforge.kernels.fused import attention as fused_attention
from tuneforge.kernels.reference import (
    ACTIVATIONS, attention_reference, bottleneck_adapter_reference, lora_linear_reference,
    multi_bottleneck_adapter_reference, multi_lora_linear_reference,
)

__all__ = [
    "flash_attention", "lora_linear", "multi_lora_linear", "bottleneck_adapter", "multi_bottleneck_adapter",
    "backend", "reference_only", "ACTIVATIONS", "attention_reference",
]

_REFERENCES = {
    "flash_attention": attention_reference,
    "lora_linear": lora_linear_reference,
    "multi_lora_linear": multi_lora_linear_reference,
    "bottleneck_adapter": bottleneck_adapter_reference,
    "multi_bottleneck_adapter": multi_bottleneck_adapter_reference,
}
# op name -> (backend name, callable). The only dispatch table: models and mechanisms call the functions below,
# never a backend.
_IMPLEMENTATIONS = {op: ("reference", fn) for op, fn in _REFERENCES.items()}
#: ops with a compiled kernel, by name (the rest run their reference wherever they are)
COMPILED = ("flash_attention", "lora_linear", "multi_lora_linear", "bottleneck_adapter", "multi_bottleneck_adapter")


@functools.lru_cache(maxsize=None)
def _has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension registered a kernel of ``tuneforge::op`` for this device type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"tuneforge::{op}", key)


def _compiled_attention(q, k, v, *, causal=True, key_padding_mask=None, scale=None, cu_seqlens=None):
    """The project's kernel where it runs (CPU; CUDA at the head sizes it has), the reference elsewhere."""
    check_inputs(q, k, v, causal, key_padding_mask, cu_seqlens)
    device, D = q.device.type, q.size(-1)
    cuda_ok = (device == "cuda" and _has_kernel("flash_attention_forward", "cuda") and D in CUDA_HEAD_SIZES
               and q.dtype != torch.float64 and cu_seqlens is None)
    if (device != "cpu" and not cuda_ok) or k.size(-2) == 0:
        return attention_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                   cu_seqlens=cu_seqlens)
    return fused_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                           cu_seqlens=cu_seqlens)


def _where_compiled(op: str, compiled):
    """The compiled op on the devices it has a kernel for, the reference elsewhere. CUDA kernels take float32 and
    bfloat16; the CPU ops are ATen compositions that take any floating dtype."""
    reference = _REFERENCES[op]

    def run(x, *args):
        if _has_kernel(op, x.device.type) and (x.device.type == "cpu" or x.dtype in (torch.float32, torch.bfloat16)):
            return compiled(x, *args)
        return reference(x, *args)

    run.__name__ = op
    return run


def _use_compiled() -> None:
    from tuneforge.kernels import native

    if not native.load():
        return
    ops = torch.ops.tuneforge
    compiled = {
        "flash_attention": _compiled_attention,
        "lora_linear": _where_compiled("lora_linear", ops.lora_linear),
        "multi_lora_linear": _where_compiled("multi_lora_linear", ops.multi_lora_linear),
        # the op also returns z = down(h) for its backward; the face returns the output alone
        "bottleneck_adapter": _where_compiled("bottleneck_adapter", lambda *args: ops.bottleneck_adapter(*args)[0]),
        "multi_bottleneck_adapter": _where_compiled("multi_bottleneck_adapter",
                                                    lambda *args: ops.multi_bottleneck_adapter(*args)[0]),
    }
    for op in COMPILED:
        _IMPLEMENTATIONS[op] = ("cpp", compiled[op])


_use_compiled()


def flash_attention(q, k, v, *, causal: bool = True, key_padding_mask=None, scale=None, cu_seqlens=None):
    """Scaled dot-product attention. q: (B, H, Tq, D), k/v: (B, Hkv, Tk, D) -> (B, H, Tq, D) in q's dtype.

    ``causal`` is bottom-right aligned (query i is at position Tk - Tq + i, so new queries after a KV cache see
    every cached key), ``key_padding_mask`` is bool (B, Tk) with True for real tokens, ``scale`` defaults to
    1/sqrt(D). Hkv may divide H (grouped-query attention: key/value head j serves query heads j*H/Hkv ..
    (j+1)*H/Hkv - 1). ``cu_seqlens`` packs documents back to back along T (Tq == Tk): int (S + 1,) shared by every
    row or (B, S + 1) per row, offsets 0 = c_0 <= ... <= c_S <= T; a query sees only keys of its own document and
    positions past c_S see nothing (see ``reference.document_ids``). A query that sees no key returns zeros (never
    NaN). Softmax runs in float32 at least.
    """
    impl = _IMPLEMENTATIONS["flash_attention"][1]
    return impl(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, cu_seqlens=cu_seqlens)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float):
    """``x W^T + b + scaling (x A^T) B^T``. x: (..., in), weight: (out, in), lora_a: (r, in), lora_b: (out, r)."""
    return _IMPLEMENTATIONS["lora_linear"][1](x, weight, bias, lora_a, lora_b, scaling)


def multi_lora_linear(x, weight, bias, lora_a, lora_b, scalings, adapter_ids):
    """Row ``n`` of x (its first dimension) adds adapter ``adapter_ids[n]``'s update (-1: none).
    lora_a: (A, r, in), lora_b: (A, out, r), scalings: (A,), adapter_ids: (N,) int64."""
    return _IMPLEMENTATIONS["multi_lora_linear"][1](x, weight, bias, lora_a, lora_b, scalings, adapter_ids)


def bottleneck_adapter(h, w_down, b_down, w_up, b_up, activation: str = "gelu", residual: bool = True):
    """``h + up(act(down(h)))``; h: (..., C), w_down: (m, C), w_up: (C, m). ``residual=False`` drops ``h +``."""
    return _IMPLEMENTATIONS["bottleneck_adapter"][1](h, w_down, b_down, w_up, b_up, activation, residual)


def multi_bottleneck_adapter(h, w_down, b_down, w_up, b_up, scales, adapter_ids, activation: str = "gelu"):
    """Row ``n`` of h gets ``scales[a] * up_a(act(down_a(h)))`` with a = ``adapter_ids[n]`` (-1: zeros).
    w_down: (A, m, C), b_down: (A, m), w_up: (A, C, m), b_up: (A, C), scales: (A,)."""
    return _IMPLEMENTATIONS["multi_bottleneck_adapter"][1](h, w_down, b_down, w_up, b_up, scales, adapter_ids,
                                                           activation)


def backend() -> dict[str, str]:
    """Which implementation each op runs: ``"reference"`` (pure torch), ``"cpp"`` (compiled, CPU tensors) or
    ``"cpp+cuda"`` (compiled for CPU and CUDA tensors), e.g. ``{"flash_attention": "cpp", ...}``."""
    forward = {"flash_attention": "flash_attention_forward"}
    cuda = torch.cuda.is_available()
    report = {}
    for op, (name, _) in _IMPLEMENTATIONS.items():
        report[op] = name + ("+cuda" if name == "cpp" and cuda and _has_kernel(forward.get(op, op), "cuda") else "")
    return report


@contextlib.contextmanager
def reference_only():
    """Run every op's pure-torch reference inside the block, whatever is compiled: to compare the two paths in
    one process (benchmarks), or to rule the kernels out while debugging. Not thread-safe: it swaps the table."""
    saved = dict(_IMPLEMENTATIONS)
    _IMPLEMENTATIONS.update({op: ("reference", fn) for op, fn in _REFERENCES.items()})
    try:
        yield
    finally:
        _IMPLEMENTATIONS.clear()
        _IMPLEMENTATIONS.update(saved)
