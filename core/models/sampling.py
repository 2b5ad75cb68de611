"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling."""
from __future__ import annotations

import torch

__all__ = ["sample_next", "filter_logits"]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p. logits: (B, V).

    ``top_k`` keeps the k largest logits (ties with the k-th are kept too); None or 0 keeps all.
    ``top_p`` keeps the smallest set of most likely tokens whose probability sums to >= top_p; None or >= 1
    keeps all. Both together: top-k first, then the nucleus of what is left. The most likely token always stays.
    """
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest of each row
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V), most likely first
        probs = torch.softmax(sorted_logits.float(), dim=-1)  # (B, V)
        # Drop a token when the mass of the tokens before it already reaches top_p: what stays is the smallest
        # prefix whose mass is >= top_p. The first token is never dropped, so top_p <= 0 still leaves one.
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # (B, V)
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` (B, V) -> (B,). temperature 0 is greedy (argmax; top_k/top_p moot)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float()  # float32: bf16 logits sample badly
    if temperature != 1.0:  # (x / 1 is x: one op less per decode step at the usual rollout temperature)
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
