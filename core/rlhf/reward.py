"""Rewards from a trained reward model: the scalar head that replaces the LM head, and scoring text with it.

The ``reward-model`` mechanism trains a :class:`ScalarHead`; online objectives (``ppo``) load such a model with
``tuneforge.load_model`` and score their samples with :func:`score`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge.data.batching import fit_context, pad_right
from tuneforge.data.rankings import ranking_ids
from tuneforge.errors import ConfigError
from tuneforge.models.tokenizer import tokenizer_of

__all__ = ["ScalarHead", "rewards", "score"]


class ScalarHead(nn.Module):
    """In place of the LM head: one score per position, (..., C) -> (..., 1); plus the tie model's parameter."""

    def __init__(self, d_model: int, ties: str = "davidson"):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        self.ties = ties
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


def rewards(model, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Score of each row of ``idx`` (N, T), read at position ``last`` (N,): (N,) float32."""
    hidden = model.forward_hidden(idx)  # (N, T, C)
    at_last = hidden[torch.arange(idx.size(0), device=idx.device), last]  # (N, C)
    return model.lm_head(at_last).squeeze(-1).float()  # (N,)


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
        rows = [fit_context(ranking_ids(tok, p, r)[0], model.config.max_seq_len)[0]
                for p, r in zip(prompts[b:b + batch_size], responses[b:b + batch_size])]
        last = torch.tensor([len(r) - 1 for r in rows], device=device)
        out.append(rewards(model, pad_right(rows, tok.pad_id).to(device), last))
    return torch.cat(out) if out else torch.zeros(0, device=device)
