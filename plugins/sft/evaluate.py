"""How an SFT run is judged on held-out records: the loss on their answers, and whether the model, asked with the
chat template's generation prompt, writes the reference answer (exact match, overall and per ``kind``)."""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from tuneforge.sdk import continue_ids, next_token_loss_of, tokenizer_of

from .examples import IGNORE, Example, padded_batch

__all__ = ["heldout_loss", "exact_match", "normalise"]


def normalise(text: str) -> str:
    """An answer as exact match compares it: surrounding whitespace and case do not count."""
    return " ".join(text.split()).lower()


@torch.no_grad()
def heldout_loss(model, examples: list[Example], *, batch_size: int, device) -> dict[str, float]:
    total, count = 0.0, 0
    pad = tokenizer_of(model).pad_id
    for b in range(0, len(examples), batch_size):
        batch = padded_batch(examples[b:b + batch_size], pad)
        n = int((batch["target"] != IGNORE).sum())
        loss = next_token_loss_of(model, batch["input"].to(device), batch["target"].to(device))
        total, count = total + float(loss) * n, count + n
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def exact_match(model, examples: list[Example], *, batch_size: int, device, max_new_tokens: int | None = None,
                ) -> dict[str, float]:
    """Greedy answers to each example's conversation up to its last answer (the ids it trains with, so a record cut
    to fit the context is asked as it was cut), compared with that answer.

    Returns ``exact_match`` and, for records with a ``kind``, ``exact_match/KIND``."""
    tok = tokenizer_of(model)
    right: dict[str | None, list[bool]] = defaultdict(list)
    for b in range(0, len(examples), batch_size):
        chunk = examples[b:b + batch_size]
        golds = [next(m["content"] for m in reversed(e.messages) if m["role"] == "assistant") for e in chunk]
        heads = [e.input[:e.prompt] for e in chunk]
        room = model.config.max_seq_len - max(len(h) for h in heads)
        new = max(1, min(max_new_tokens or _room(tok, golds), room))
        rows = continue_ids(model.generate, tok, heads, (tok.eos_id,), max_new_tokens=new, temperature=0.0,
                            device=device)
        for e, (_, answer, *_), gold in zip(chunk, rows, golds):
            right[e.kind].append(normalise(answer) == normalise(gold))
    every = [r for rs in right.values() for r in rs]
    out = {"exact_match": sum(every) / max(len(every), 1)}
    out.update({f"exact_match/{kind}": sum(rs) / len(rs) for kind, rs in sorted(right.items()) if kind is not None})
    return out


def _room(tok, golds: list[str]) -> int:
    """New tokens enough for the longest reference answer, its end-of-turn and a little more."""
    return max(len(tok.encode(g)) for g in golds) + 8
