"""Turning token rows into batches: padding, fitting a context, and the per-epoch order every objective draws.

Shared by the objectives (classification, next-token), the rankings batches and the RLHF rows, so each lays its
rows out and shuffles them the same way; a resumed run draws the same order as the original.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pad_right", "fit_context", "epoch_generator"]


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch): a resumed run draws the same order as the original."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2**63))
    return g



def pad_right(rows: Sequence[Sequence[int]], pad_id: int, fill: int | None = None) -> torch.Tensor:
    """(B, T_max) long tensor of ``rows``, right-padded with ``fill`` (default ``pad_id``)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id if fill is None else fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def fit_context(ids: list[int], room: int) -> tuple[list[int], bool]:
    """Keep the first token (bos) and the last ``room - 1`` others: long inputs lose their beginning, never the
    part next to the answer. Returns (ids, whether anything was cut)."""
    if len(ids) <= room:
        return ids, False
    return ids[:1] + ids[len(ids) - room + 1:], True
