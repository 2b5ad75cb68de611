"""Packed rows: several documents back to back in one row, as the models' ``forward_hidden(cu_seqlens=...)`` takes
them.

A packed batch is described by the attention kernel's offsets (see ``tuneforge.kernels.flash_attention``):
``cu_seqlens`` int (S + 1,) shared by every row, or (B, S + 1) per row, 0 = c_0 <= c_1 <= ... <= c_S <= T.
Document s holds positions c_s .. c_{s+1} - 1; a row with fewer documents repeats its last offset (empty
documents); positions from c_S on are padding, which attends to nothing and which no document attends to.

Why a model needs more than the kernel's mask: a document must read the same positions as it would alone, so its
position ids restart at 0 (:func:`packed_positions`), and where attention cannot run the kernel (transformers'
fallbacks) the documents become a 4-D mask (:func:`document_mask`).
"""
from __future__ import annotations

import torch

from tuneforge.kernels.reference import document_ids

__all__ = ["check_offsets", "packed_positions", "document_mask"]


def check_offsets(cu_seqlens, batch: int, length: int, device=None) -> torch.Tensor:
    """``cu_seqlens`` as an integer tensor on ``device`` (int32/int64 kept, a list made int64), checked: (S + 1,) or
    (B, S + 1) with S >= 1, starting at 0, never decreasing, ending at most at T = ``length``.

    :raises ValueError: naming the shape or offsets that are wrong.
    """
    cu = torch.as_tensor(cu_seqlens, device=device)
    if cu.dtype not in (torch.int32, torch.int64):
        if cu.is_floating_point() or cu.dtype == torch.bool or cu.is_complex():
            raise ValueError(f"cu_seqlens must hold integer offsets, got {cu.dtype}")
        cu = cu.to(torch.int64)
    if not (cu.dim() == 1 or (cu.dim() == 2 and cu.size(0) == batch)) or cu.size(-1) < 2:
        raise ValueError(f"cu_seqlens must be (S + 1,) or (B, S + 1) = ({batch}, S + 1) offsets with S >= 1 "
                         f"documents, got shape {tuple(cu.shape)}")
    rows = cu if cu.dim() == 2 else cu[None]  # (B or 1, S + 1)
    bad = (rows[:, 0] != 0).any() | (rows[:, 1:] < rows[:, :-1]).any() | (rows[:, -1] > length).any()
    if bool(bad):  # one host read per call
        shown = rows.tolist() if rows.numel() <= 64 else f"shape {tuple(rows.shape)}"
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at most at the row length T = "
                         f"{length}; got {shown}")
    return cu


def packed_positions(cu_seqlens, batch: int, length: int) -> torch.Tensor:
    """(B, T) int64 position ids that restart at 0 at each document's first token; the padding past c_S counts
    from 0 again (it reads nothing, and nothing reads it). ``cu_seqlens`` as in the module docstring."""
    cu = check_offsets(cu_seqlens, batch, length).to(torch.int64)
    cu = cu.expand(batch, -1).contiguous()  # (B, S + 1)
    t = torch.arange(length, device=cu.device).expand(batch, length).contiguous()  # (B, T)
    # the last offset at or before t: the start of t's document (of the last of repeated offsets: an empty
    # document starts and ends there), or c_S for the padding
    start = cu.gather(1, torch.searchsorted(cu, t, right=True) - 1)  # (B, T)
    return t - start


def document_mask(cu_seqlens, batch: int, length: int, *, causal: bool = True) -> torch.Tensor:
    """(B, 1, T, T) bool, True = query t may attend to key u: both in the same document (and u <= t when causal).
    Padding past c_S attends to nothing. The form transformers' sdpa and eager attention take."""
    doc = document_ids(check_offsets(cu_seqlens, batch, length), batch, length)  # (B, T), -1 on padding
    same = (doc[:, :, None] == doc[:, None, :]) & (doc >= 0)[:, :, None]  # (B, Tq, Tk)
    if causal:
        same = same & torch.ones(length, length, dtype=torch.bool, device=doc.device).tril()
    return same[:, None]  # (B, 1, T, T)
