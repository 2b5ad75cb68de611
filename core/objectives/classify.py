"""Classification objectives over labelled text, shared by the plugins that classify:

- :class:`VerbalizedTask`: the language model itself answers. Training maximises the likelihood of the label's
  word after the prompt (cross-entropy on those tokens only); prediction compares, for each row, the likelihood
  of every label word of its task and takes the most likely. Used by ``finetune`` with the LM head, by
  ``prompt-tuning`` (the frozen model's head), and for scoring by ``prompting``.
- :class:`HeadTask`: a classification head reads the last token's hidden state; class cross-entropy, and the
  prediction is the most activated output. Used by ``finetune:head=classify``.

Both read the data once, validate every record before training, route rows of mixed data to their task with
:func:`tuneforge.models.routing.rows`, and report held-out accuracy.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from tuneforge.models import routing
from tuneforge.data.records import split_held_out
from tuneforge.errors import ConfigError, DataError
from tuneforge.data.labelled import Labelled, Template, default_template, read_labelled, resolve_labels, verbalizer
from tuneforge.data.batching import epoch_generator, fit_context, pad_right
from tuneforge.models.lm_loss import next_token_loss_of, target_logprobs

__all__ = ["VerbalizedTask", "HeadTask", "score_candidates"]


def _split(run, fields: dict, holdout: float) -> tuple[Labelled, Labelled]:
    """Training and held-out records: --eval-data, else the builtin test split, else the file's last
    ``holdout`` share (which then never trains)."""
    return split_held_out(run.config, lambda spec, split: read_labelled(spec, split=split, **fields), holdout)


def _epoch_rows(n: int, run) -> Iterator[torch.Tensor]:
    """Row indices of each batch of one epoch, in an order that depends only on (seed, epoch)."""
    bs = run.config.batch_size
    order = torch.randperm(n, generator=epoch_generator(run.seed, run.epoch, salt=1))
    for b in range(n // bs):
        yield order[b * bs:(b + 1) * bs]


@torch.no_grad()
def score_candidates(model, prompts: Sequence[list[int]], candidates: Sequence[Sequence[list[int]]], *,
                     tasks: Sequence[str] | None = None, pad_id: int, device, rows_per_batch: int = 64
                     ) -> list[list[float]]:
    """Log-likelihood of each candidate continuation of each prompt: ``out[i][j] = log p(candidates[i][j] |
    prompts[i])``, summed over the candidate's tokens. Row ``i`` runs under task ``tasks[i]``.

    Every (prompt, candidate) pair is one right-padded row (causal attention never looks right, so padding
    needs no mask), in batches of ``rows_per_batch``.
    """
    pairs = [(i, j) for i, cands in enumerate(candidates) for j in range(len(cands))]
    out: list[list[float]] = [[0.0] * len(c) for c in candidates]
    for b in range(0, len(pairs), rows_per_batch):
        chunk = pairs[b:b + rows_per_batch]
        seqs = [prompts[i] + candidates[i][j] for i, j in chunk]
        ids = pad_right(seqs, pad_id).to(device)  # (R, T)
        answer = torch.zeros_like(ids, dtype=torch.bool)  # (R, T): the candidate's tokens
        for r, (i, j) in enumerate(chunk):
            answer[r, len(prompts[i]):len(prompts[i]) + len(candidates[i][j])] = True
        with routing.rows([tasks[i] for i, _ in chunk] if tasks is not None else None):
            token_logp = target_logprobs(model, ids)  # (R, T-1): token t is predicted at position t - 1
        sums = (token_logp * answer[:, 1:]).sum(-1).tolist()  # one host sync per batch
        for (i, j), value in zip(chunk, sums):
            out[i][j] = value
    return out


class _LabelledTask:
    """Reading, splitting and label sets common to both objectives."""

    def __init__(self, owner: str, *, text_field="text", label_field="label", task_field="task",
                 labels: list[str] | None = None, classes: int | None = None, holdout: float = 0.1,
                 reserve: int = 0):
        self.owner, self.holdout, self.reserve = owner, holdout, reserve
        self.fields = dict(text_field=text_field, label_field=label_field, task_field=task_field)
        self.given, self.classes = labels, classes
        self.train = self.held_out = None
        self.truncated = 0

    def read(self, run) -> None:
        """Read and validate the data once; resolves the label sets (overall and per task)."""
        if self.train is not None:
            return
        self.train, self.held_out = _split(run, self.fields, self.holdout)
        self.labels = resolve_labels(self.train, self.given, self.classes, owner=self.owner)
        by_task: dict[str, list[str]] = {}
        for task, label in zip(self.train.tasks, self.train.labels):
            by_task.setdefault(task, [])
            if label not in by_task[task]:
                by_task[task].append(label)
        # each task's candidates, in the overall label order
        self.task_labels = {t: [lb for lb in self.labels if lb in ls] for t, ls in by_task.items()}
        for task, label, loc in zip(self.held_out.tasks, self.held_out.labels, self.held_out.where):
            if label not in self.task_labels.get(task, self.labels):
                where = f" of task '{task}'" if task else ""
                raise DataError(f"{loc}: label '{label}'{where} never occurs in the training data "
                                f"({', '.join(self.task_labels.get(task, self.labels))}); the model could not learn it")
        if len(self.train) < run.config.batch_size:
            raise ConfigError(f"{self.owner}: {self.train.source} has {len(self.train)} training records, fewer "
                              f"than one batch of {run.config.batch_size}; lower --batch-size or add records")

    def _room(self, run) -> int:
        return run.model_config.max_seq_len - max(self.reserve, getattr(run, "prefix_tokens", 0))

    def _note_truncation(self, run) -> None:
        if self.truncated:
            run.log(f"{self.owner}: {self.truncated} input(s) were longer than the context and lost their beginning")
            self.truncated = 0

    def _tasks(self, data: Labelled, idx) -> list[str] | None:
        return [data.tasks[i] for i in idx] if data.mixed else None


class VerbalizedTask(_LabelledTask):
    """The LM answers with the label's word; see the module docstring."""

    def __init__(self, owner: str, *, template: str | None = None, verbalizer: list[str] | None = None, **kw):
        super().__init__(owner, **kw)
        self.template_text, self.pairs = template, verbalizer

    def read(self, run) -> None:
        if self.train is not None:
            return
        super().read(run)
        self.template = Template(self.template_text or default_template(run.config.data), owner=self.owner)
        self.words = verbalizer(self.pairs, self.labels, run.config.data, owner=self.owner)
        tok = run.tokenizer
        self.word_ids = {lb: tok.encode(w) for lb, w in self.words.items()}
        self.train_rows = [self._encode(run, t, lb) for t, lb in zip(self.train.texts, self.train.labels)]
        self._note_truncation(run)

    def prompt_ids(self, run, text: str, *, formatted: bool = False) -> list[int]:
        """bos + the template's prompt for ``text`` (or ``text`` itself when already ``formatted``), cut from the
        left to leave room for the longest label word."""
        prompt = text if formatted else self.template.prompt(text)
        ids, cut = fit_context(run.tokenizer.encode(prompt, bos=True),
                               self._room(run) - max(len(w) for w in self.word_ids.values()))
        self.truncated += cut
        return ids

    def _encode(self, run, text: str, label: str) -> tuple[list[int], int]:
        """(prompt + answer ids, where the answer starts)."""
        prompt = self.prompt_ids(run, text)
        return prompt + self.word_ids[label], len(prompt)

    def epoch(self, run) -> Iterator[dict]:
        self.read(run)  # now, not at the first batch: bad records fail before anything is written
        return self._epoch(run)

    def _epoch(self, run) -> Iterator[dict]:
        pad = run.tokenizer.pad_id
        for idx in _epoch_rows(len(self.train_rows), run):
            rows = [self.train_rows[i] for i in idx]
            ids = pad_right([r for r, _ in rows], pad)  # (B, T+1)
            target = ids[:, 1:].clone()  # (B, T): predict token t+1 from tokens <= t
            keep = torch.zeros_like(target, dtype=torch.bool)
            for r, (seq, start) in enumerate(rows):
                keep[r, start - 1:len(seq) - 1] = True  # only the answer's tokens are learned
            batch = {"input": ids[:, :-1], "target": target.masked_fill(~keep, -100)}
            tasks = self._tasks(self.train, idx.tolist())
            if tasks is not None:
                batch["task"] = tasks
            yield batch

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        with routing.rows(batch.get("task")):  # the head too: a routed LoRA may sit on it
            loss = next_token_loss_of(model, batch["input"], batch["target"])
        return loss, {"tokens": float((batch["target"] != -100).sum())}

    def predict(self, model, run, texts: Sequence[str], tasks: Sequence[str] | None = None,
                prompts: Sequence[list[int]] | None = None) -> list[str]:
        """The most likely label of each text (among its task's labels); ``prompts`` overrides the encoding."""
        self.read(run)
        prompts = prompts if prompts is not None else [self.prompt_ids(run, t) for t in texts]
        row_tasks = list(tasks) if tasks is not None else [""] * len(prompts)
        cands = [self.task_labels.get(t) or self.labels for t in row_tasks]  # each row's own task's labels
        scores = score_candidates(model, prompts, [[self.word_ids[lb] for lb in c] for c in cands], tasks=tasks,
                                  pad_id=run.tokenizer.pad_id, device=run.device)
        return [c[max(range(len(s)), key=s.__getitem__)] for c, s in zip(cands, scores)]

    def evaluate(self, model, run) -> dict[str, float]:
        self.read(run)
        held = self.held_out
        if len(held) == 0:
            return {}
        tasks = held.tasks if held.mixed else None
        predicted = self.predict(model, run, held.texts, tasks)
        self._note_truncation(run)
        return _accuracy(predicted, held)


class HeadTask(_LabelledTask):
    """A classification head over the last token's hidden state; see the module docstring."""

    def read(self, run) -> None:
        if self.train is not None:
            return
        super().read(run)
        self.index = {lb: i for i, lb in enumerate(self.labels)}
        self.train_rows = [self.encode(run, t) for t in self.train.texts]
        self._note_truncation(run)

    def encode(self, run, text: str) -> list[int]:
        ids, cut = fit_context(run.tokenizer.encode(text, bos=True, eos=True), self._room(run))
        self.truncated += cut
        return ids

    def _batch(self, run, rows: list[list[int]], labels: list[str] | None, tasks) -> dict:
        batch = {"input": pad_right(rows, run.tokenizer.pad_id),  # (B, T)
                 "last": torch.tensor([len(r) - 1 for r in rows])}  # (B,): the hidden state the head reads
        if labels is not None:
            batch["label"] = torch.tensor([self.index[lb] for lb in labels])
        if tasks is not None:
            batch["task"] = tasks
        return batch

    def epoch(self, run) -> Iterator[dict]:
        self.read(run)  # now, not at the first batch: bad records fail before anything is written
        return self._epoch(run)

    def _epoch(self, run) -> Iterator[dict]:
        for idx in _epoch_rows(len(self.train_rows), run):
            idx = idx.tolist()
            yield self._batch(run, [self.train_rows[i] for i in idx], [self.train.labels[i] for i in idx],
                              self._tasks(self.train, idx))

    @staticmethod
    def logits(model, batch) -> torch.Tensor:
        """(B, N) class scores: the head applied to each row's last real token (right padding is never seen,
        since attention is causal)."""
        with routing.rows(batch.get("task")):
            h = model.forward_hidden(batch["input"])  # (B, T, C)
        last = h[torch.arange(h.size(0), device=h.device), batch["last"]]  # (B, C)
        return model.lm_head(last)  # (B, N)

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.logits(model, batch)
        loss = F.cross_entropy(logits.float(), batch["label"])
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return loss, {"accuracy": acc, "tokens": float(batch["input"].numel())}

    def predict(self, model, run, texts: Sequence[str], tasks: Sequence[str] | None = None,
                batch_size: int = 64) -> list[str]:
        self.read(run)
        out: list[str] = []
        for b in range(0, len(texts), batch_size):
            rows = [self.encode(run, t) for t in texts[b:b + batch_size]]
            batch = self._batch(run, rows, None, list(tasks[b:b + batch_size]) if tasks else None)
            batch = {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out.extend(self.labels[i] for i in self.logits(model, batch).argmax(-1).tolist())
        return out

    def evaluate(self, model, run) -> dict[str, float]:
        self.read(run)
        held = self.held_out
        if len(held) == 0:
            return {}
        predicted = self.predict(model, run, held.texts, held.tasks if held.mixed else None)
        self._note_truncation(run)
        return _accuracy(predicted, held)


def _accuracy(predicted: list[str], held: Labelled) -> dict[str, float]:
    right = [p == t for p, t in zip(predicted, held.labels)]
    out = {"accuracy": sum(right) / len(right)}
    if held.mixed:
        for task in held.task_names():
            mine = [r for r, t in zip(right, held.tasks) if t == task]
            out[f"accuracy/{task or 'none'}"] = sum(mine) / len(mine)
    return out
