"""The Python face of tuneforge's kernels: one function per op, each call routed to the path that should run it.

Three paths: ``cpp``, the project's compiled kernel (``torch.ops.tuneforge.*``, see ``native.py``); ``sdpa``,
torch's ``scaled_dot_product_attention`` (attention only, ``sdpa.py``); ``reference``, pure torch
(``reference.py``). :func:`route` is the one decision, a pure function of the op, the device, the call and
``TUNEFORGE_KERNELS``; :func:`routes` reports it per op and device, :func:`backend` in short.

Attention on CUDA runs SDPA (torch's flash / cuDNN / memory-efficient backends) unless ``TUNEFORGE_KERNELS=cpp``
forces the project's kernel, and even then head sizes it lacks and packed calls run SDPA; the reference, which
builds (B, H, Tq, Tk) scores, runs attention only when ``TUNEFORGE_KERNELS=reference`` (or inside
:func:`reference_only`). On the CPU attention runs the compiled kernel when it loaded, else SDPA.
``linear_cross_entropy`` runs the compiled op on CPU tensors and its reference elsewhere (CUDA included): that
reference is itself chunked pure torch, so no path holds the (N, V) logits.

Layer: the bottom, beside ``common``. Imports torch and nothing else of tuneforge's.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from tuneforge.kernels import sdpa
from tuneforge.kernels.fused import CUDA_HEAD_SIZES, check_inputs
from tuneforge.kernels.fused import attention as fused_attention
from tuneforge.kernels import linear_ce
from tuneforge.kernels.gated import silu_mul
from tuneforge.kernels.reference import (
    ACTIVATIONS, attention_reference, bottleneck_adapter_reference, linear_cross_entropy_reference,
    lora_linear_reference, multi_bottleneck_adapter_reference, multi_lora_linear_reference,
)

__all__ = [
    "flash_attention", "lora_linear", "multi_lora_linear", "bottleneck_adapter", "multi_bottleneck_adapter",
    "linear_cross_entropy", "linear_token_logprobs", "silu_mul", "backend", "routes", "route", "reference_only", "ACTIVATIONS", "attention_reference", "PATHS", "DEVICES",
]

_REFERENCES = {
    "flash_attention": attention_reference,
    "lora_linear": lora_linear_reference,
    "multi_lora_linear": multi_lora_linear_reference,
    "bottleneck_adapter": bottleneck_adapter_reference,
    "multi_bottleneck_adapter": multi_bottleneck_adapter_reference,
    "linear_cross_entropy": linear_cross_entropy_reference,  # chunked: never the (N, V) logits
}
# op name -> (table name, callable). The only dispatch table: models and mechanisms call the functions below,
# never a backend. "routed" (attention) and "cpp" entries decide per call with route(); "reference" runs pure torch.
_IMPLEMENTATIONS = {op: ("reference", fn) for op, fn in _REFERENCES.items()}
#: ops with a compiled kernel, by name (the rest run their reference wherever they are)
COMPILED = ("flash_attention", "lora_linear", "multi_lora_linear", "bottleneck_adapter", "multi_bottleneck_adapter",
            "linear_cross_entropy")
#: the paths a call can take, and the device types the report covers
PATHS, DEVICES = ("cpp", "sdpa", "reference"), ("cpu", "cuda")
# The registered op that says whether an op has a compiled kernel for a device (attention: its forward).
_KERNEL = {"flash_attention": "flash_attention_forward"}
# Fixed at import: TUNEFORGE_KERNELS, whether the compiled ops loaded, whether reference_only() is active.
_STATE = {"mode": "auto", "loaded": False, "reference_only": False}
_CUDA_DTYPES = (torch.float32, torch.bfloat16)


#: ops whose hand-written CUDA kernel no GPU has run yet: on CUDA they run pure torch (cuBLAS) unless forced, so an
#: unmeasured kernel never slows a user down. Attention on CUDA goes to SDPA (see _route_attention).
UNPROVEN_ON_CUDA = frozenset({"multi_lora_linear"})


def route(op: str, device_type: str, *, mode: str = "auto", has_kernel: bool = False, dtype=None, head_dim=None,
          packed: bool = False) -> tuple[str, str]:
    """Which path a call of ``op`` on ``device_type`` tensors takes, and why: ``(path, reason)``, path in
    :data:`PATHS`. Pure: everything it depends on is an argument, so every branch is testable on any machine.

    :param mode: ``TUNEFORGE_KERNELS`` (auto, cpp, reference).
    :param has_kernel: the loaded extension registered this op's kernel for this device type.
    :param dtype: the inputs' dtype; head_dim: attention's D; packed: attention gets ``cu_seqlens``. None (dtype,
        head_dim): not known (a report), the usual case is assumed and the reason names the exceptions.
    """
    if mode == "reference":
        return "reference", "TUNEFORGE_KERNELS=reference: every op's pure-torch reference"
    if op == "flash_attention":
        return _route_attention(device_type, mode, has_kernel, dtype, head_dim, packed)
    if not has_kernel:
        return "reference", (f"no compiled {op} kernel for {device_type} tensors in this process (not loaded or "
                             "not built): pure torch (its products are ATen/BLAS calls)")
    if device_type != "cpu" and dtype is not None and dtype not in _CUDA_DTYPES:
        return "reference", f"the {device_type} kernel takes float32/bfloat16, not {dtype}: pure torch"
    if device_type == "cuda" and op in UNPROVEN_ON_CUDA and mode != "cpp":
        return "reference", (f"the project's CUDA {op} kernel has not yet been checked on a GPU "
                             "(benchmarks/gpu_check.py): pure torch (cuBLAS) unless TUNEFORGE_KERNELS=cpp forces it")
    return "cpp", f"the project's compiled op on {device_type} tensors" + (
        "" if device_type == "cpu" or dtype else " (float32/bfloat16; other dtypes: pure torch)")


def _route_attention(device_type, mode, has_kernel, dtype, head_dim, packed) -> tuple[str, str]:
    if device_type == "cpu":
        if has_kernel:
            return "cpp", "the project's compiled CPU kernel"
        return "sdpa", ("compiled kernels unavailable: torch SDPA (the pure-torch reference would build "
                        "(B, H, Tq, Tk) scores)")
    if device_type != "cuda":
        return "sdpa", f"no project kernel for {device_type}: torch SDPA"
    if mode != "cpp":
        return "sdpa", ("default on CUDA: torch SDPA (flash / cuDNN / memory-efficient backends); "
                        "TUNEFORGE_KERNELS=cpp forces the project's kernel")
    lacks = None
    if not has_kernel:
        lacks = "this build has no CUDA kernel"
    elif packed:
        lacks = "packed documents (cu_seqlens) have no CUDA kernel"
    elif head_dim is not None and head_dim not in CUDA_HEAD_SIZES:
        lacks = f"head size {head_dim} has no CUDA kernel (it has {'/'.join(map(str, CUDA_HEAD_SIZES))})"
    elif dtype == torch.float64:
        lacks = "float64 has no CUDA kernel"
    if lacks:
        return "sdpa", f"TUNEFORGE_KERNELS=cpp, but {lacks}: torch SDPA"
    unknown = head_dim is None and dtype is None
    return "cpp", "TUNEFORGE_KERNELS=cpp forces the project's kernel" + (
        f" (head sizes {'/'.join(map(str, CUDA_HEAD_SIZES))}, not packed, not float64; other calls: SDPA)"
        if unknown else "")


@functools.lru_cache(maxsize=None)
def _has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded extension registered a kernel of ``tuneforge::op`` for this device type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (_STATE["loaded"] and key is not None
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"tuneforge::{_KERNEL.get(op, op)}", key))


def _attention(q, k, v, *, causal=True, key_padding_mask=None, scale=None, cu_seqlens=None):
    """flash_attention as routed: the path :func:`route` picks for these tensors."""
    check_inputs(q, k, v, causal, key_padding_mask, cu_seqlens)
    device = q.device.type
    path, _ = route("flash_attention", device, mode=_STATE["mode"], has_kernel=_has_kernel("flash_attention", device),
                    dtype=q.dtype, head_dim=q.size(-1), packed=cu_seqlens is not None)
    if path == "cpp":
        return _compiled_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                   cu_seqlens=cu_seqlens)
    run = sdpa.attention if path == "sdpa" else attention_reference
    return run(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, cu_seqlens=cu_seqlens)


def _compiled_attention(q, k, v, *, causal=True, key_padding_mask=None, scale=None, cu_seqlens=None):
    """The project's kernel (``fused.attention``); no keys at all is answered here (zeros, nothing to compute)."""
    if k.size(-2) == 0:
        return sdpa.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    return fused_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                           cu_seqlens=cu_seqlens)


def _where_compiled(op: str, compiled):
    """The compiled op where :func:`route` sends the call (its device has a kernel; CUDA kernels take float32 and
    bfloat16, the CPU ops are ATen compositions that take any floating dtype), the reference elsewhere."""
    reference = _REFERENCES[op]

    def run(x, *args, **kw):
        device = x.device.type
        path, _ = route(op, device, mode=_STATE["mode"], has_kernel=_has_kernel(op, device), dtype=x.dtype)
        return compiled(x, *args, **kw) if path == "cpp" else reference(x, *args, **kw)

    run.__name__ = op
    return run


def _use_compiled() -> None:
    from tuneforge.kernels import native

    _STATE["mode"] = native.mode()
    if _STATE["mode"] == "reference":
        return  # every op keeps its pure-torch reference, attention on every device included
    _IMPLEMENTATIONS["flash_attention"] = ("routed", _attention)
    if not native.load():
        return
    _STATE["loaded"] = True
    ops = torch.ops.tuneforge
    compiled = {
        "lora_linear": _where_compiled("lora_linear", ops.lora_linear),
        "multi_lora_linear": _where_compiled("multi_lora_linear", ops.multi_lora_linear),
        # the op also returns z = down(h) for its backward; the face returns the output alone
        "bottleneck_adapter": _where_compiled("bottleneck_adapter", lambda *args: ops.bottleneck_adapter(*args)[0]),
        "multi_bottleneck_adapter": _where_compiled("multi_bottleneck_adapter",
                                                    lambda *args: ops.multi_bottleneck_adapter(*args)[0]),
        # CPU only: CUDA tensors run the chunked pure-torch twin (cuBLAS products), see route()
        "linear_cross_entropy": _where_compiled("linear_cross_entropy", linear_ce.compiled),
    }
    for op, fn in compiled.items():
        _IMPLEMENTATIONS[op] = ("cpp", fn)


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
    if not (q.dtype == k.dtype == v.dtype) and torch.is_autocast_enabled(q.device.type):
        # Under autocast a model's q/k may come out of float32 math (rotary embeddings) beside a bfloat16 v; run in
        # the autocast dtype, as torch's SDPA does under autocast (custom ops are not autocast-aware by themselves).
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
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


def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean"):
    """``F.cross_entropy(hidden @ weight.T + bias, target, ...)`` without the (N, V) logits: computed over chunks
    of rows, with the gradients of hidden, weight and bias.

    hidden: (..., C), weight: (V, C), target: (...) class indices, bias: (V,) or None. ``reduction``: ``"mean"``
    over rows whose target is not ``ignore_index`` (like F.cross_entropy, but 0, not NaN, with zero gradients when
    every row is ignored), ``"sum"``, or ``"none"``: per-row losses of target's shape, 0 at ignored rows.
    ``label_smoothing`` eps: ``(1 - eps) * nll + eps * mean over the vocabulary of -log p``, as F.cross_entropy.
    Per-token log-probabilities of the targets are ``-linear_cross_entropy(..., reduction="none")`` (see
    :func:`linear_token_logprobs`).

    The loss is float32 whatever the inputs (float64 stays float64), accumulated in float32; gradients come back in
    the inputs' dtypes. Under ``torch.autocast`` hidden, weight and bias are cast to the autocast dtype as F.linear
    would cast them; the loss stays float32. For mean and sum the gradients are computed in the forward while the
    logits are at hand (when grad mode is on and an input requires grad) and the backward scales them (no double
    backward). CPU tensors run the compiled op, others the chunked pure torch.
    """
    h2, w, t, b, shape = linear_ce.prepare(hidden, weight, target, bias, ignore_index, label_smoothing, reduction)
    loss = _IMPLEMENTATIONS["linear_cross_entropy"][1](
        h2, w, t, b, ignore_index=int(ignore_index), label_smoothing=float(label_smoothing), reduction=reduction)
    return loss.view(shape) if reduction == "none" else loss


def linear_token_logprobs(hidden, weight, target, bias=None, *, ignore_index: int = -100):
    """log p(target) of each position under softmax(hidden @ weight.T + bias), float32, target's shape (0 where the
    target is ``ignore_index``), without the (N, V) logits: ``-linear_cross_entropy(..., reduction="none")``."""
    return -linear_cross_entropy(hidden, weight, target, bias, ignore_index=ignore_index, reduction="none")


def routes() -> dict[str, dict[str, tuple[str, str]]]:
    """Per op and device type (:data:`DEVICES`), the path a call takes now and why: ``{"flash_attention": {"cpu":
    ("cpp", "..."), "cuda": ("sdpa", "default on CUDA: ...")}, ...}``. Where no CUDA device is present the "cuda"
    entry says what this install would run on one. Calls the report cannot foresee (attention's head size, dtype,
    cu_seqlens) are named in the reason."""
    cuda_here = torch.cuda.is_available()
    report = {}
    for op, (name, _) in _IMPLEMENTATIONS.items():
        per = {}
        for device in DEVICES:
            if name == "reference" and _STATE["reference_only"]:
                path, why = "reference", "inside tuneforge.kernels.reference_only()"
            else:
                path, why = route(op, device, mode=_STATE["mode"], has_kernel=_has_kernel(op, device))
            per[device] = (path, why + ("" if device != "cuda" or cuda_here else
                                        " [no CUDA device here: what this install would run on one]"))
        report[op] = per
    return report


def backend() -> dict[str, str]:
    """The short form of :func:`routes`: the path each op takes on CPU tensors (``"cpp"``, ``"sdpa"`` or
    ``"reference"``), with ``"+cuda"`` where the project's compiled kernel also serves CUDA tensors here, e.g.
    ``{"flash_attention": "cpp", "lora_linear": "cpp+cuda", ...}``."""
    cuda_here = torch.cuda.is_available()
    return {op: per["cpu"][0] + ("+cuda" if cuda_here and per["cpu"][0] == per["cuda"][0] == "cpp" else "")
            for op, per in routes().items()}


@contextlib.contextmanager
def reference_only():
    """Run every op's pure-torch reference inside the block, whatever is compiled and on every device (attention
    too, on CUDA): to compare the paths in one process (benchmarks), or to rule the kernels out while debugging.
    Not thread-safe: it swaps the table."""
    saved, was = dict(_IMPLEMENTATIONS), _STATE["reference_only"]
    _IMPLEMENTATIONS.update({op: ("reference", fn) for op, fn in _REFERENCES.items()})
    _STATE["reference_only"] = True
    try:
        yield
    finally:
        _IMPLEMENTATIONS.clear()
        _IMPLEMENTATIONS.update(saved)
        _STATE["reference_only"] = was
