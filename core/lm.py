"""Causal language modelling pieces shared by the objectives that predict the next token (pretrain, and
fine-tuning on domain text): token windows for an epoch, and the shifted cross-entropy.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["TokenWindows", "next_token_loss", "epoch_generator", "unigram_entropy"]


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch): a resumed run draws the same order as the original."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2**63))
    return g


class TokenWindows:
    """A token stream cut into windows of ``seq_len + 1`` tokens (input and its shift by one).

    Documents are encoded between the begin- and end-of-text tokens (so generation can start a document with
    ``bos`` as training saw it) and concatenated; the stream is cut with
    stride ``seq_len`` so every token is predicted once per epoch. An epoch visits the windows in a random
    order drawn from (seed, epoch), in batches of ``batch_size`` (the last incomplete batch is dropped so
    every step has the same shape).
    """

    def __init__(self, texts: list[str], tokenizer, seq_len: int):
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer.encode(text, bos=True, eos=True))
        self.tokens = torch.tensor(ids, dtype=torch.long)  # (N,)
        self.seq_len = seq_len

    @property
    def n_windows(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __len__(self) -> int:
        return self.n_windows

    def split_tail(self, n: int) -> "TokenWindows":
        """Move the last ``n`` windows into a new TokenWindows (held-out data that then never trains)."""
        cut = (self.n_windows - min(n, self.n_windows)) * self.seq_len
        tail = TokenWindows([], None, self.seq_len)
        tail.tokens, self.tokens = self.tokens[cut:], self.tokens[:cut + 1]  # window edges share one token
        return tail

    def window(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The windows numbered ``idx`` (K,) as ``{"input": (K, T), "target": (K, T)}``."""
        starts = idx * self.seq_len  # (K,)
        offsets = torch.arange(self.seq_len + 1)  # (T+1,)
        chunk = self.tokens[starts[:, None] + offsets[None, :]]  # (K, T+1)
        return {"input": chunk[:, :-1], "target": chunk[:, 1:]}

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.n_windows // batch_size

    def epoch(self, epoch: int, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the batches of one epoch, in an order that depends only on (seed, epoch)."""
        order = torch.randperm(self.n_windows, generator=epoch_generator(seed, epoch))
        for b in range(self.batches_per_epoch(batch_size)):
            yield self.window(order[b * batch_size:(b + 1) * batch_size])

    def in_order(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in stream order (for evaluation: the same windows every time)."""
        n = self.n_windows if limit is None else min(self.n_windows, limit * batch_size)
        for b in range(0, n, batch_size):
            yield self.window(torch.arange(b, min(b + batch_size, n)))


def next_token_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, T, V) against ``target`` (B, T), already shifted by one."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=ignore_index)


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy in nats/token of the token frequencies: the loss of a model that learned only which tokens are
    common, the bar any sequence model must clear."""
    p = torch.bincount(tokens.flatten()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())
