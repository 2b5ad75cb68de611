"""``flash_attention`` through torch's own ``scaled_dot_product_attention`` (SDPA), with tuneforge's conventions.

The default on CUDA (torch picks its flash, cuDNN or memory-efficient backend) and on the CPU when the compiled
kernels are unavailable; unlike the pure-torch reference it never builds the (B, H, Tq, Tk) float32 scores when
no mask is needed. What this module adds to a bare SDPA call:

- bottom-right causal alignment: ``is_causal=True`` when Tq == Tk (the flash backend), no mask at all for a
  single query (it sees every key), ``causal_lower_right`` for 1 < Tq < Tk (cached decoding of a few tokens);
- grouped-query k/v: ``enable_gqa`` where no mask is passed and the flash backend takes q (half precision); else
  k/v are expanded to q's heads, because the memory-efficient backend (masks, float32) does not take GQA and SDPA
  would otherwise fall back to its math backend, which does build the scores;
- a key padding mask as a bool ``attn_mask``, and rows that see no key at all (left padding under the causal
  mask, a row of only padding) given zeros: such a row is let see every key, so no NaN enters the forward or the
  backward, then its output is zeroed; no host synchronisation either way;
- packed documents (``cu_seqlens``): SDPA per document, see :func:`attention`.

Layer: kernels (imports torch only).
"""
from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention as _sdpa

__all__ = ["attention", "host_offsets"]

# The last cu_seqlens read to the host: (tensor, its _version, its rows). A model passes the same offsets tensor
# to every layer, so one device-to-host copy serves the whole forward (and backward) instead of one per layer.
_LAST_OFFSETS: tuple = (None, -1, None)


def attention(q, k, v, *, causal: bool = True, key_padding_mask=None, scale=None, cu_seqlens=None):
    """SDPA with ``tuneforge.kernels.flash_attention``'s signature and meaning (shapes checked by the caller).

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D), Hkv dividing H. Returns (B, H, Tq, D) in q's dtype; rows that see no
    key are zeros with zero gradients.

    Packed documents run SDPA once per document (per row when the rows' offsets differ), each a square causal (or
    full) block on the flash backend, and zeros past the last offset. Chosen over FlexAttention with a document
    mask because it is exact with torch's tested kernels, needs no ``torch.compile`` (eager FlexAttention builds
    the scores; compiled, it costs a compile per new shape), and is the same code on CPU and CUDA, so the CPU
    tests cover the CUDA path. Its cost: the offsets are read to the host once per offsets tensor (a sync on
    CUDA) and S (or B * S) SDPA calls instead of one.
    """
    if k.size(-2) == 0:
        return _zeros(q, k, v)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
    if cu_seqlens is None:
        return _dense(q, k, v, causal, mask, scale)
    B, T = q.size(0), q.size(2)
    rows = host_offsets(cu_seqlens, B, T)
    if all(r == rows[0] for r in rows):  # one layout for every row: each document is one call over the batch
        return _documents(q, k, v, causal, mask, scale, rows[0])
    return torch.cat([_documents(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal,
                                 None if mask is None else mask[b:b + 1], scale, rows[b]) for b in range(B)])


def host_offsets(cu_seqlens, batch: int, length: int) -> list[tuple[int, ...]]:
    """Each row's document offsets on the host, checked: (S + 1,) shared or (B, S + 1) per row, starting at 0,
    never decreasing, ending at most at T. One copy to the host per offsets tensor (cached while unchanged)."""
    global _LAST_OFFSETS
    last, version, rows = _LAST_OFFSETS
    if cu_seqlens is not last or cu_seqlens._version != version:
        rows = cu_seqlens.tolist()  # the one device-to-host copy (a synchronisation on CUDA)
        _LAST_OFFSETS = (cu_seqlens, cu_seqlens._version, rows)
    shape = tuple(cu_seqlens.shape)
    if len(shape) == 1 and shape[0] >= 2:
        rows = [rows] * batch
    elif not (len(shape) == 2 and shape[0] == batch and shape[1] >= 2):
        raise ValueError(f"flash_attention: cu_seqlens must be (S + 1,) or (B, S + 1) = ({batch}, S + 1) with at "
                         f"least one document, got {shape}")
    for b, row in enumerate(rows):
        if row[0] != 0 or row[-1] > length or any(e < s for s, e in zip(row, row[1:])):
            raise ValueError(f"flash_attention: cu_seqlens of row {b} must start at 0, never decrease and end at "
                             f"most at T = {length}; got {row if len(row) <= 64 else str(row[:64]) + '...'}")
    return [tuple(r) for r in rows]


def _documents(q, k, v, causal, mask, scale, offsets):
    """Attention within each document [c_s, c_s+1) of one offsets row; zeros past the last offset."""
    T, end = q.size(2), offsets[-1]
    if end == 0:
        return _zeros(q, k, v)
    pieces = [_dense(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], causal, None if mask is None else mask[:, s:e], scale)
              for s, e in zip(offsets, offsets[1:]) if e > s]  # each (B, H, e - s, D); empty documents add nothing
    if end < T:
        pieces.append(q[:, :, end:].masked_fill(_true(q.device), 0))  # (B, H, T - end, D): they see nothing
    return torch.cat(pieces, dim=2)  # (B, H, T, D)


def _dense(q, k, v, causal, mask, scale):
    """One SDPA call over whole rows (no documents). mask: bool (B, Tk) or None."""
    H, Tq = q.size(1), q.size(2)
    Tk, gqa = k.size(2), k.size(1) != H
    if mask is None:
        if gqa and not _flash_shaped(q):  # SDPA's GQA would fall to its math backend, which builds the scores
            k, v, gqa = *_expand(k, v, H), False
        if not causal or Tq == 1:  # a single causal query is the newest position: it sees every key
            return _sdpa(q, k, v, scale=scale, enable_gqa=gqa)
        if Tq == Tk:
            return _sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        k, v = _expand(k, v, H)  # the lower-right bias runs the memory-efficient backend, which takes no GQA
        # imported here: torch.nn.attention.bias imports torch._dynamo, a second or more of every process's start
        from torch.nn.attention.bias import causal_lower_right

        return _sdpa(q, k, v, attn_mask=causal_lower_right(Tq, Tk), scale=scale)
    if causal and Tq > 1:
        # Query i sits at position Tk - Tq + i and keeps the real keys at or before it.
        band = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)  # (Tq, Tk)
        allowed = band[None] & mask[:, None, :]  # (B, Tq, Tk)
        sees = (mask.to(torch.int32).cumsum(-1) > 0)[:, Tk - Tq:]  # (B, Tq): a real key at or before i
    else:
        allowed = mask[:, None, :]  # (B, 1, Tk), broadcast over queries
        sees = mask.any(-1, keepdim=True)  # (B, 1)
    blind = ~sees[:, None, :, None]  # (B, 1, Tq or 1, 1): rows that see no key
    # A blind row gets every key (a finite, harmless softmax) and its output is zeroed: a fully masked row would
    # give NaN on some backends, and NaN in the forward poisons the backward of the whole head.
    allowed = allowed[:, None] | blind  # (B, 1, Tq or 1, Tk)
    k, v = _expand(k, v, H)
    out = _sdpa(q, k, v, attn_mask=allowed, scale=scale)  # (B, H, Tq, D)
    return out.masked_fill(blind, 0)


def _flash_shaped(q) -> bool:
    """Whether torch's flash backend takes q (half precision, head size a multiple of 8 up to 256): the one that
    takes grouped-query k/v as they are (``enable_gqa``); the memory-efficient backend does not."""
    return q.dtype in (torch.float16, torch.bfloat16) and q.size(-1) % 8 == 0 and q.size(-1) <= 256


def _expand(k, v, heads: int):
    """k, v (B, Hkv, Tk, D) -> (B, H, Tk, D): key/value head j serves query heads j*H/Hkv .. (j+1)*H/Hkv - 1."""
    if k.size(1) == heads:
        return k, v
    group = heads // k.size(1)
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _true(device):
    return torch.ones((), dtype=torch.bool, device=device)


def _zeros(q, k, v):
    """(B, H, Tq, D) zeros still tied to q, k and v (zero gradients, never NaN: masked_fill and where select
    rather than multiply), so autograd.grad over q, k, v works as for any other output."""
    tie = torch.where(~_true(q.device), (k.sum() + v.sum()).to(q.dtype), 0)  # 0, with a zero gradient to k, v
    return q.masked_fill(_true(q.device), 0) + tie
