"""Rewards from a trained reward model: the scalar head that replaces the LM head, and scoring text with it.

The ``reward-model`` mechanism trains a :class:`ScalarHead`; online objectives (``ppo``) load such a model with
``tuneforge.load_model`` and score their samples with :func:`score`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge.data.batching import pad_right
from tuneforge.data.rankings import fitted_ranking_ids
from tuneforge.errors import ConfigError
from tuneforge.models.tokenizer import tokenizer_of

__all__ = ["REWARD_POOLS", "ScalarHead", "rewards", "score"]


REWARD_POOLS = ("last", "sum", "mean")


class ScalarHead(nn.Module):
    """In place of the LM head: one score per position, (..., C) -> (..., 1); plus the tie model's parameter.

    ``pool`` says which positions make a response's score: ``last`` reads its last token (the ``eos``), the usual
    choice; ``mean`` and ``sum`` score every response token and average or add them, so a feature seen anywhere
    in the response reaches the score in one step rather than through the last token's attention."""

    def __init__(self, d_model: int, ties: str = "davidson", pool: str = "last"):
        super().__init__()
        if pool not in REWARD_POOLS:
            raise ValueError(f"pool must be one of {', '.join(REWARD_POOLS)}, got {pool!r}")
        self.proj = nn.Linear(d_model, 1)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        self.ties, self.pool = ties, pool
        # davidson: log ν (0: ν = 1, a tie at equal scores has probability 1/3); rao-kupper: log θ = softplus(raw)
        self.tie_raw = nn.Parameter(torch.zeros(()))

    def forward(self, h):
        return self.proj(h)  # (..., 1)

    def tie(self) -> torch.Tensor | None:
        """The tie parameter the formulas take (log ν or log θ), or None with ``ties=ignore``."""
        if self.ties == "davidson":
            return self.tie_raw
        if self.ties == "rao-kupper":
            return F.softplus(self.tie_raw) + 1e-4  # log θ > 0: θ = 1 would leave no room for a tie
        return None


def rewards(model, idx: torch.Tensor, last: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Score of each row of ``idx`` (N, T) whose response spans positions ``start`` (N,) to ``last`` (N,), its
    ``eos`` included, pooled as ``model.lm_head.pool`` says: (N,) float32. ``start`` may be left out only for
    ``pool=last``, which reads ``last`` alone (``ranking_batch`` gives both)."""
    pool = model.lm_head.pool
    if pool != "last" and start is None:
        raise ValueError(f"rewards: this head pools over the response (pool={pool}); pass start, the index of each "
                         "row's first response token (ranking_batch's 'start')")
    hidden = model.forward_hidden(idx)  # (N, T, C)
    if pool == "last":
        return model.lm_head(hidden[torch.arange(idx.size(0), device=idx.device), last]).squeeze(-1).float()  # (N,)
    pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
    inside = (pos >= start[:, None]) & (pos <= last[:, None])  # (N, T): the response's tokens
    per_token = model.lm_head(hidden).squeeze(-1).float().masked_fill(~inside, 0.0)  # (N, T)
    total = per_token.sum(1)  # (N,)
    return total / inside.sum(1) if pool == "mean" else total


@torch.no_grad()
def score(model, prompts: Sequence[str | list[dict]], responses: Sequence[str], *, batch_size: int = 64
          ) -> torch.Tensor:
    """Reward of each (prompt, response) under a trained reward model (``tuneforge.load_model(run)``): (N,) on
    the model's device. A prompt is text or a conversation; rows are laid out as in training
    (:func:`tuneforge.data.rankings.ranking_ids`: ``bos prompt ␣ response eos``, or the chat template's turn)."""
    if not isinstance(model.lm_head, ScalarHead):
        raise ConfigError("score: this model has no scalar head; train it with -m reward-model")
    tok, device = tokenizer_of(model), model.tok_emb.weight.device
    out = []
    for b in range(0, len(prompts), batch_size):
        fitted = [fitted_ranking_ids(tok, p, r, model.config.max_seq_len)
                  for p, r in zip(prompts[b:b + batch_size], responses[b:b + batch_size])]
        rows, start = [ids for ids, _ in fitted], [first for _, first in fitted]
        last = torch.tensor([len(r) - 1 for r in rows], device=device)
        out.append(rewards(model, pad_right(rows, tok.pad_id).to(device), last, torch.tensor(start, device=device)))
    return torch.cat(out) if out else torch.zeros(0, device=device)
