"""tuneforge's own fused attention kernel behind the Python face: argument checks, dtype handling, the op call.

The kernel (``torch.ops.tuneforge.flash_attention_forward``) runs on the CPU (``csrc/attention.cpp``: float32 at
speed, float64 for gradcheck) and, when forced with ``TUNEFORGE_KERNELS=cpp``, on CUDA (``csrc/cuda``: float32 and
bfloat16, head sizes 16/32/64/128). Which path a call takes is decided in ``tuneforge.kernels`` (the dispatch
table and the routing); this module only runs the kernel once chosen.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention", "check_inputs", "CUDA_HEAD_SIZES"]

#: head sizes the CUDA kernel was written for; others go elsewhere
CUDA_HEAD_SIZES = (16, 32, 64, 128)


def check_inputs(q, k, v, causal: bool, key_padding_mask, cu_seqlens) -> None:
    """Shape, device and dtype checks done before any kernel sees a pointer: a clear error instead of a crash."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v must be (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    if tuple(k.shape) != tuple(v.shape) or k.size(0) != B or k.size(3) != D or Hkv == 0 or H % Hkv:
        raise ValueError(f"flash_attention: k and v must be (B, Hkv, Tk, D) = ({B}, Hkv, Tk, {D}) with Hkv dividing "
                         f"q's {H} heads, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries are the newest keys), got Tq={Tq}, Tk={Tk}")
    devices = {t.device for t in (q, k, v)}
    if len(devices) != 1 or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"flash_attention: q, k, v must share one device and dtype, got "
                         f"{[(str(t.device), str(t.dtype)) for t in (q, k, v)]}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(f"key_padding_mask must be (B, Tk) = ({B}, {Tk}), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q on {q.device}: move it with "
                             f".to(q.device)")
    if cu_seqlens is not None:
        if Tq != Tk:
            raise ValueError(f"cu_seqlens (packed documents) needs Tq == Tk, got Tq={Tq}, Tk={Tk}")
        if cu_seqlens.device != q.device or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32/int64 on {q.device}, got {cu_seqlens.dtype} on "
                             f"{cu_seqlens.device}")


def attention(q, k, v, *, causal=True, key_padding_mask=None, scale=None, cu_seqlens=None):
    """Run the compiled kernel. On the CPU it takes float32 and float64 (other dtypes convert to float32 around
    it); on CUDA float32 and bfloat16 as they are. k/v may have fewer heads than q (grouped-query attention) and
    may be strided views (a KV cache's filled slice): the CPU kernel reads them in place."""
    s = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    native = (torch.float32, torch.bfloat16) if q.device.type == "cuda" else (torch.float32, torch.float64)
    cast = lambda t: t if t.dtype in native else t.float()  # noqa: E731
    # no-op conversions skipped: each is a dispatched op, and a decode step calls this once per layer
    mask = key_padding_mask if key_padding_mask is None or key_padding_mask.dtype == torch.bool else \
        key_padding_mask.to(torch.bool)
    cu = cu_seqlens if cu_seqlens is None or cu_seqlens.dtype == torch.int64 else cu_seqlens.to(torch.int64)
    out, _ = torch.ops.tuneforge.flash_attention_forward(cast(q), cast(k), cast(v), causal, mask, cu, s)
    return out if out.dtype == q.dtype else out.to(q.dtype)
