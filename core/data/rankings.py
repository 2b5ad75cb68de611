"""Human rankings of responses: parsing, validation, the pairs they imply, and batches that keep a ranking together.

A ranking record is one prompt, its responses, and an ordering of them, best first, with ties::

    {"prompt": "describe the lake.", "responses": ["...", "...", "...", "..."], "ranking": "C > B = D > A"}
    {"prompt": "describe the lake.", "responses": ["...", "...", "...", "..."], "ranking": [[2], [1, 3], [0]]}
    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "describe the lake."}], ...}

Letters index the responses (A is the first); the second form gives the tiers as lists of 0-based indices (a
bare integer is a tier of one). Every response appears exactly once. ``C > B = D > A`` implies the strict pairs
C>B, C>D, C>A, B>A, D>A and the tie B=D. A malformed ranking (a letter out of range, a response missing, one
listed twice, which in two tiers is a cycle, an empty tier) is a :class:`tuneforge.DataError` naming file:line.

Objectives that learn from rankings (``reward-model``, ``dpo``) read them with :func:`read_rankings` and batch
them with :func:`ranking_batch`: one batch element is one whole ranking (all its responses scored in the same
forward pass), and each pair carries the weight ``1 / (pairs of its ranking)``, so a 5-response ranking (10
pairs) counts as much as a 3-response one (3 pairs), not three times as much.

A prompt is text or a conversation (a list of ``{"role", "content"}`` messages ending with the user turn the
responses answer). Text keeps the layout of the embedded world, ``bos prompt ␣ response eos``; a conversation goes
through the model's chat template (:mod:`tuneforge.data.chat`): the generation prompt, then the response as the
assistant's turn up to its end-of-turn token, the same ids a policy's rollout has (:func:`prompt_ids` is what it
writes after), so an SFT model, its reward model and its DPO / PPO policy all read one layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import string
from collections.abc import Iterator, Sequence

import torch

from tuneforge.data.batching import epoch_generator, fit_context, pad_right
from tuneforge.data.chat import chat_messages, template_of
from tuneforge.data.records import read_records, split_held_out
from tuneforge.errors import DataError

__all__ = ["Ranking", "parse_ranking", "format_ranking", "ranking_pairs", "read_rankings", "split_rankings",
           "ranking_text", "prompt_ids", "ranking_ids", "fitted_ranking_ids", "ranking_batch", "ranking_epoch"]

LETTERS = string.ascii_uppercase


@dataclasses.dataclass
class Ranking:
    """One validated record: ``tiers`` holds response indices, best tier first; ``where`` is its file:line;
    ``prompt`` is text or a validated conversation (``[{"role", "content"}, ...]``)."""

    prompt: str | list[dict]
    responses: list[str]
    tiers: list[list[int]]
    where: str = ""
    task: str = ""

    def pairs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(strict pairs (better, worse), tied pairs (i, j) with i < j), as response indices."""
        return ranking_pairs(self.tiers)


def _letter(i: int) -> str:
    return LETTERS[i] if 0 <= i < len(LETTERS) else f"#{i}"


def format_ranking(tiers: Sequence[Sequence[int]]) -> str:
    """``[[2], [1, 3], [0]]`` -> ``"C > B = D > A"``."""
    return " > ".join(" = ".join(_letter(i) for i in tier) for tier in tiers)


def parse_ranking(ranking, n_responses: int, *, where: str = "ranking") -> list[list[int]]:
    """Tiers of response indices, best first, from ``"C > B = D > A"`` or ``[[2], [1, 3], [0]]``.

    :param n_responses: how many responses the record has; every one must be ranked exactly once.
    :param where: ``file:line`` (or any label) for the error message.
    :raises DataError: the ranking is malformed; the message says what is wrong and how to write it.
    """
    if isinstance(ranking, str):
        tiers = _parse_text(ranking, n_responses, where)
    elif isinstance(ranking, list):
        tiers = _parse_tiers(ranking, n_responses, where)
    else:
        raise DataError(f"{where}: field 'ranking' must be a string like \"C > B = D > A\" or a list of tiers like "
                        f"[[2], [1, 3], [0]], got {type(ranking).__name__}")
    seen: dict[int, int] = {}  # response -> its tier
    for t, tier in enumerate(tiers):
        for i in tier:
            if i in seen:
                if seen[i] == t:
                    raise DataError(f"{where}: ranking {_show(ranking)} lists response {_letter(i)} twice in one tier; "
                                    "each response appears once")
                between = format_ranking(tiers[seen[i] + 1:t]) or format_ranking([tiers[t]])
                raise DataError(f"{where}: ranking {_show(ranking)} is a cycle: {_letter(i)} is ranked both above and "
                                f"below {between}; each response appears once, in its one tier")
            seen[i] = t
    missing = [i for i in range(n_responses) if i not in seen]
    if missing:
        names = ", ".join(_letter(i) for i in missing)
        raise DataError(f"{where}: ranking {_show(ranking)} leaves out response(s) {names} of the record's "
                        f"{n_responses}; rank every response (equal ones joined by '=', e.g. B = D)")
    return tiers


def _show(ranking) -> str:
    return repr(ranking) if isinstance(ranking, str) else str(ranking)


def _parse_text(text: str, n: int, where: str) -> list[list[int]]:
    valid = f"A-{_letter(n - 1)}" if n > 1 else "A"
    tiers = []
    for k, chunk in enumerate(text.split(">")):
        tier = []
        for token in chunk.split("="):
            token = token.strip()
            if not token:
                raise DataError(f"{where}: ranking {text!r} has an empty tier (tier {k + 1}: nothing between "
                                f"'>' or '=' signs); write responses as letters {valid}, e.g. \"C > B = D > A\"")
            if len(token) != 1 or token.upper() not in LETTERS:
                raise DataError(f"{where}: ranking {text!r}: {token!r} is not a response letter; responses are "
                                f"letters {valid} (A is the first), joined by '>' (better) and '=' (tied)")
            index = LETTERS.index(token.upper())
            if index >= n:
                raise DataError(f"{where}: ranking {text!r} names response {token}, but the record has {n} responses "
                                f"({valid})")
            if token not in LETTERS:
                raise DataError(f"{where}: ranking {text!r}: write response letters in upper case ({token.upper()!r}, "
                                f"not {token!r})")
            tier.append(index)
        tiers.append(tier)
    return tiers


def _parse_tiers(tiers, n: int, where: str) -> list[list[int]]:
    out = []
    for k, tier in enumerate(tiers):
        items = [tier] if isinstance(tier, int) and not isinstance(tier, bool) else tier
        if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise DataError(f"{where}: ranking tier {k + 1} is {tier!r}; each tier is a list of response indices "
                            "(0 is the first response) or one index, e.g. [[2], [1, 3], 0]")
        if not items:
            raise DataError(f"{where}: ranking tier {k + 1} is empty; drop it or put a response in it")
        for i in items:
            if not 0 <= i < n:
                raise DataError(f"{where}: ranking tier {k + 1} names response {i}, but the record has {n} responses "
                                f"(indices 0-{n - 1})")
        out.append(list(items))
    return out


def ranking_pairs(tiers: Sequence[Sequence[int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Every pair a ranking implies: (better, worse) for responses in different tiers, (i, j) with i < j within a
    tier (a tie)."""
    strict = [(i, j) for a, upper in enumerate(tiers) for lower in tiers[a + 1:] for i in upper for j in lower]
    ties = [(min(i, j), max(i, j)) for tier in tiers for x, i in enumerate(tier) for j in tier[x + 1:]]
    return strict, ties


def read_rankings(spec: str, *, split: str = "train", prompt_field: str = "prompt",
                  responses_field: str = "responses", ranking_field: str = "ranking",
                  task_field: str = "task") -> list[Ranking]:
    """The validated ranking records of ``spec`` (``builtin:rankings`` or a ``.jsonl`` file); a prompt that is a
    list of messages is validated as a conversation (:func:`tuneforge.data.chat.chat_messages`)."""
    records = read_records(spec, split=split, fields={prompt_field: (str, list), responses_field: list,
                                                      ranking_field: (str, list)})
    out = []
    for item, where in zip(records.items, records.where):
        prompt = item[prompt_field]
        if isinstance(prompt, list):
            prompt = _conversation(prompt, where)
        responses = item[responses_field]
        if len(responses) < 2:
            raise DataError(f"{where}: field '{responses_field}' has {len(responses)} response(s); a ranking needs "
                            "at least 2")
        for k, r in enumerate(responses):
            if not isinstance(r, str) or not r.strip():
                raise DataError(f"{where}: response {_letter(k)} of '{responses_field}' must be non-empty text, got "
                                f"{r!r}")
        task = item.get(task_field, "")
        if not isinstance(task, str):
            raise DataError(f"{where}: field '{task_field}' must be a string (the task's name), got {task!r}")
        tiers = parse_ranking(item[ranking_field], len(responses), where=where)
        out.append(Ranking(prompt, list(responses), tiers, where, task))
    return out


def split_rankings(run, fields: dict, holdout: float) -> tuple[list[Ranking], list[Ranking]]:
    """Training and held-out rankings: --eval-data, else the builtin test split, else the file's last
    ``holdout`` share (which then never trains). Conversations are rendered once here, so a chat template that
    refuses one (a role it does not know) is an error naming its record before anything trains."""
    train, held_out = split_held_out(run.config, lambda spec, split: read_rankings(spec, split=split, **fields),
                                     holdout)
    for r in train + held_out:
        if isinstance(r.prompt, list):
            prompt_ids(run.tokenizer, r.prompt, where=r.where)
    return train, held_out


def ranking_text(prompt: str, response: str) -> str:
    """How a text prompt and a response are laid out as one sequence (the embedded world's corpus writes its
    answers this way): scorers, policies and rollouts all use this one layout."""
    return f"{prompt} {response}"


def prompt_ids(tokenizer, prompt: str | list[dict], *, where: str = "") -> list[int]:
    """What a response follows, in ranking rows and in a policy's rollouts alike: ``bos prompt ␣`` for text, the
    chat template's generation prompt for a conversation.

    :param where: ``file:line`` of the prompt, for errors.
    :raises DataError: a conversation that is malformed (see :func:`tuneforge.data.chat.chat_messages`), does not
        end with a user turn, or that the template refuses.
    """
    if isinstance(prompt, str):
        return tokenizer.encode(ranking_text(prompt, ""), bos=True)
    with _located(where):
        return template_of(tokenizer).prompt_ids(_conversation(prompt, where))


def ranking_ids(tokenizer, prompt: str | list[dict], response: str, *, where: str = "") -> tuple[list[int], int]:
    """(ids of the row, tokens before the response). Text: ``bos prompt ␣ response eos``. A conversation:
    :func:`prompt_ids`, then the response as the template writes an assistant turn, up to and with its end-of-turn
    token (an ``eos`` added where the template ends no turn); what a template writes after that (a newline) is
    left out, so the row's last token is the one a scalar head reads and the one a policy stops with.

    The prompt's part and the response's are encoded apart and joined, as a policy's rollout joins them (it writes
    after the encoded prompt): with a subword tokenizer, encoding the text whole would merge the space into the
    response's first token, and the response would start one token earlier than a rollout's. With bytes both ways
    are the same."""
    if isinstance(prompt, str):
        head = prompt_ids(tokenizer, prompt)
        return head + tokenizer.encode(response, eos=True), len(head)
    messages, template = _conversation(prompt, where), template_of(tokenizer)
    with _located(where):
        head = template.prompt_ids(messages)
        ex = template.example(messages + [{"role": "assistant", "content": response}], train_on="completion",
                              where=where or "ranking")
    end = len(ex.trained) - ex.trained[::-1].index(True)  # after the answer's end-of-turn token
    return head + ex.ids[ex.answer_start:end], len(head)


def fitted_ranking_ids(tokenizer, prompt: str | list[dict], response: str, context: int, *, where: str = ""
                       ) -> tuple[list[int], int]:
    """:func:`ranking_ids` fitted to ``context`` tokens: (ids, index of the response's first token). A row too
    long loses the beginning of its prompt, never the response; the start shifts by what was cut."""
    full, head = ranking_ids(tokenizer, prompt, response, where=where)
    ids, _ = fit_context(full, context)
    return ids, max(1, head - (len(full) - len(ids)))


def _conversation(prompt: list, where: str) -> list[dict]:
    """A prompt's messages, validated: a conversation whose last message is the user turn the responses answer."""
    messages = chat_messages({"prompt": prompt}, where or "prompt", needs_answer=False)
    if messages[-1]["role"] != "user":
        raise DataError(f"{where or 'prompt'}: the prompt's last message has role {messages[-1]['role']!r}; a ranked "
                        "prompt ends with the user turn its responses answer")
    return messages


@contextlib.contextmanager
def _located(where: str):
    """Errors a chat template raises (a role it refuses) name the record they came from."""
    try:
        yield
    except DataError as exc:
        if not where or str(exc).startswith(where):
            raise
        raise DataError(f"{where}: {exc}") from None


def ranking_batch(records: Sequence[Ranking], tokenizer, context: int, *, with_ties: bool = True,
                  device: torch.device | str | None = None) -> dict:
    """One micro-batch of whole rankings: every response of every record is a row.

    Returns a dict of tensors:

    - ``input`` (N, T): ``bos prompt ␣ response eos`` (or the chat template's, :func:`ranking_ids`), right-padded (causal attention never looks right, so the
      padding needs no mask); a row longer than ``context`` loses the beginning of its prompt, never the response;
    - ``last`` (N,): index of each row's last token (the ``eos`` a scalar head reads);
    - ``start`` (N,): index of each row's first response token (``response`` spans start..last, eos included);
    - ``record`` (N,): which record of the batch the row belongs to; ``response`` (N,): which of its responses;
    - ``better``/``worse`` (P,): row indices of each pair (a tie when ``tie`` (P,) is True, order then moot);
    - ``weight`` (P,): ``1 / (pairs of its record) / (records with a pair)``, so ``(loss * weight).sum()`` is the
      mean over records of each record's mean pair loss.

    ``with_ties=False`` drops tied pairs (and a record left with none counts as having no pair). ``device``: where
    the tensors go (default: stay on the CPU).
    """
    rows, last, start, record, response = [], [], [], [], []
    better, worse, tie, per_record = [], [], [], []
    for r, rec in enumerate(records):
        first = len(rows)
        for k, text in enumerate(rec.responses):
            ids, first_of_response = fitted_ranking_ids(tokenizer, rec.prompt, text, context, where=rec.where)
            rows.append(ids)
            last.append(len(ids) - 1)
            start.append(first_of_response)
            record.append(r)
            response.append(k)
        strict, ties = rec.pairs()
        pairs = [(i, j, False) for i, j in strict] + ([(i, j, True) for i, j in ties] if with_ties else [])
        per_record.append(len(pairs))
        for i, j, t in pairs:
            better.append(first + i)
            worse.append(first + j)
            tie.append(t)
    with_pairs = sum(1 for n in per_record if n)
    weight = [1.0 / (n * with_pairs) for n in per_record for _ in range(n)]
    batch = {
        "input": pad_right(rows, tokenizer.pad_id),
        "last": torch.tensor(last), "start": torch.tensor(start),
        "record": torch.tensor(record), "response": torch.tensor(response),
        "better": torch.tensor(better, dtype=torch.long), "worse": torch.tensor(worse, dtype=torch.long),
        "tie": torch.tensor(tie, dtype=torch.bool), "weight": torch.tensor(weight, dtype=torch.float32),
    }
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def ranking_epoch(records: Sequence[Ranking], run, tokenizer, context: int, *, with_ties: bool = True,
                  salt: int = 2) -> Iterator[dict]:
    """The micro-batches of one epoch (``run.config.batch_size`` rankings each), in an order drawn from (seed,
    epoch); the last incomplete batch is dropped so every step sees as many rankings. Each batch also carries
    ``index`` (N,): the position in ``records`` of each row's record (for caches keyed by record)."""
    bs = run.config.batch_size
    order = torch.randperm(len(records), generator=epoch_generator(run.seed, run.epoch, salt=salt)).tolist()
    for b in range(len(records) // bs):
        chosen = order[b * bs:(b + 1) * bs]
        batch = ranking_batch([records[i] for i in chosen], tokenizer, context, with_ties=with_ties)
        batch["index"] = torch.tensor(chosen)[batch["record"]]
        yield batch
