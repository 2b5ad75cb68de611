"""Next-token losses and log-probabilities of a :class:`~tuneforge.models.protocol.LanguageModel`, without the
(N, V) logits when the output layer is a plain linear map.

At batch 4 x 512 and a vocabulary of 49,152 the float32 logits alone are 400 MB, their log-softmax and gradient as
much again, for every forward of an objective and of every log-prob pass of dpo, ppo and the reward model. Here the
hidden states (``forward_hidden``) go with the head's weight into :func:`tuneforge.kernels.linear_cross_entropy`,
which computes the logits a chunk of rows at a time. A head that is not a plain ``nn.Linear`` (a classification
head, a LoRA-wrapped head, a soft-capped one) keeps the ordinary path: ``lm_head(hidden)`` then the loss in float32.
Both paths give the same numbers; which one runs is decided by the head's type alone (by structure, not by name).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.kernels import linear_cross_entropy

__all__ = ["plain_head", "token_losses", "next_token_loss_of", "hidden_logprobs", "target_logprobs"]


def plain_head(model) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (V, C), bias (V,) or None) of ``model.lm_head`` when it is exactly ``nn.Linear``, else None."""
    head = getattr(model, "lm_head", None)
    if type(head) is nn.Linear:  # a subclass or wrapper may change what the layer computes
        return head.weight, head.bias
    return None


def token_losses(model, hidden: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                 label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``target`` (B, T) under ``lm_head(hidden)`` for hidden states (B, T, C), float32.

    ``reduction`` as :func:`tuneforge.kernels.linear_cross_entropy`: ``"mean"`` over rows that are not
    ``ignore_index``, ``"sum"``, or ``"none"`` ((B, T), 0 at ignored positions).
    """
    head = plain_head(model)
    if head is not None:
        return linear_cross_entropy(hidden, head[0], target, head[1], ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, reduction=reduction)
    logits = model.lm_head(hidden).float()  # (B, T, V)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=ignore_index,
                             label_smoothing=label_smoothing, reduction="none").view(target.shape)  # (B, T)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (target != ignore_index).sum().clamp(min=1)  # 0, not NaN, when every row is ignored


def next_token_loss_of(model, idx: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                       label_smoothing: float = 0.0, **forward_kwargs) -> torch.Tensor:
    """Mean cross-entropy of the next tokens ``target`` (B, T) (``idx`` shifted by one) after the model reads
    ``idx`` (B, T); ``forward_kwargs`` go to ``forward_hidden`` (key_padding_mask, positions)."""
    hidden = model.forward_hidden(idx, **forward_kwargs)  # (B, T, C)
    return token_losses(model, hidden, target, ignore_index=ignore_index, label_smoothing=label_smoothing)


def hidden_logprobs(model, hidden: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every t, (B, T-1) float32, from the hidden states (B, T, C) of ``ids``
    (B, T); with ``temperature`` the distribution is softmax(logits / temperature), as sampling used it."""
    hidden = hidden[:, :-1]  # (B, T-1, C): the last position predicts nothing here
    if temperature != 1.0:  # (h / t) W^T = (h W^T) / t: the head's bias, if any, is scaled apart
        head = plain_head(model)
        if head is None or head[1] is not None:
            logits = model.lm_head(hidden).float() / temperature  # (B, T-1, V)
            return -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        hidden = hidden / temperature
    return -token_losses(model, hidden, ids[:, 1:], reduction="none")


def target_logprobs(model, ids: torch.Tensor, *, temperature: float = 1.0, **forward_kwargs) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every t: (B, T-1), float32 (as ``token_logprobs(model(ids), ids)``)."""
    return hidden_logprobs(model, model.forward_hidden(ids, **forward_kwargs), ids, temperature=temperature)
