"""How an SFT run is judged on held-out records: the loss on their answers, and whether the model, asked with the
chat template's generation prompt, writes the reference answer (exact match, overall and per ``kind``)."""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from tuneforge.sdk import next_token_loss_of, template_of, tokenizer_of

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
    """Greedy answers to each example's conversation up to its last answer, compared with that answer.

    Returns ``exact_match`` and, for records with a ``kind``, ``exact_match/KIND``."""
    tok = tokenizer_of(model)
    template = template_of(tok)
    right: dict[str | None, list[bool]] = defaultdict(list)
    for b in range(0, len(examples), batch_size):
        chunk = examples[b:b + batch_size]
        prompts = [template.prompt_ids(e.messages[:_last_answer(e.messages)]) for e in chunk]
        golds = [e.messages[_last_answer(e.messages)]["content"] for e in chunk]
        answers = generate_answers(model, prompts, tok, device=device,
                                   max_new_tokens=max_new_tokens or _room(tok, golds))
        for e, answer, gold in zip(chunk, answers, golds):
            right[e.kind].append(normalise(answer) == normalise(gold))
    every = [r for rs in right.values() for r in rs]
    out = {"exact_match": sum(every) / max(len(every), 1)}
    out.update({f"exact_match/{kind}": sum(rs) / len(rs) for kind, rs in sorted(right.items()) if kind is not None})
    return out


def generate_answers(model, prompts: list[list[int]], tok, *, device, max_new_tokens: int) -> list[str]:
    """Greedy continuations of token ``prompts`` (left-padded together), cut at the end-of-turn token."""
    width = max(len(p) for p in prompts)
    new = max(1, min(max_new_tokens, model.config.max_seq_len - width))
    ids = torch.full((len(prompts), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = True
    out = model.generate(ids.to(device), new, temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                         key_padding_mask=mask.to(device))
    texts = []
    for row in out[:, width:].tolist():
        if tok.eos_id in row:
            row = row[:row.index(tok.eos_id)]
        texts.append(tok.decode(row))
    return texts


def _last_answer(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _room(tok, golds: list[str]) -> int:
    """New tokens enough for the longest reference answer, its end-of-turn and a little more."""
    return max(len(tok.encode(g)) for g in golds) + 8
