"""``prompting``: steer a trained model with hard prompts only. Nothing trains, and the run proves it.

Zero-shot: each held-out text goes into a template (``review: {input} verdict: {label}.``) and the model's
likelihood of each label's word (the verbalizer: positive -> good) decides the prediction. Few-shot: ``shots``
solved examples from the training split come first. The classic check on what few-shot examples teach runs
beside it: the same examples with deliberately wrong labels (``accuracy_wrong_labels``). ``generate=N`` also
writes free continuations of N held-out prompts.

The engine hashes every weight before and after (``frozen_weights`` in summary.json); combining ``prompting``
with a mechanism that would train is refused before anything runs.
"""
from __future__ import annotations

import dataclasses
import json
import random
from typing import Optional

import torch

from tuneforge.sdk import ConfigError, VerbalizedTask, hookimpl, routing


__all__ = ["Prompting"]


class Prompting:
    """Zero- and few-shot prompting, classification by label-word likelihood, and free generation."""

    @dataclasses.dataclass
    class Options:
        template: Optional[str] = None  # {input} and {label} slots; default: the builtin task's own format
        verbalizer: list[str] = dataclasses.field(default_factory=list)  # LABEL:WORD pairs; default builtin words
        shots: int = 0  # solved examples before each query (few-shot); 0 = zero-shot
        wrong_labels: bool = True  # with shots: also score the same examples with wrong labels
        separator: str = "\n"  # between examples and the query
        generate: int = 0  # free continuations of this many held-out prompts (prompting/generations.jsonl)
        max_new_tokens: int = 40
        limit: int = 0  # held-out records to score; 0 = all
        text_field: str = "text"
        label_field: str = "label"
        task_field: str = "task"

        def __post_init__(self):
            for name in ("shots", "generate", "limit"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
            if self.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    def __init__(self, options: Options):
        self.options = options
        self.task: VerbalizedTask | None = None
        self.examples: list[tuple[str, str]] = []

    @hookimpl
    def tuneforge_trainable_params(self):
        return []

    @hookimpl
    def tuneforge_validate(self, run):
        wanting = {n: c for n, c in run.trainable.items() if c}
        if wanting:
            who = ", ".join(f"'{n}' would train {c:,} parameters" for n, c in wanting.items())
            raise ConfigError(
                f"prompting changes no weight, but {who}. Run prompting on its own (with --init the trained model), "
                "or drop it to train"
            )
        if not run.config.verify_frozen:
            raise ConfigError("prompting proves that no weight changed by hashing them; remove --verify-frozen false")
        self._setup(run)  # data, template, verbalizer and examples: wrong ones fail before anything is written

    # -- building prompts ----------------------------------------------------------------------------------------

    def _setup(self, run) -> VerbalizedTask:
        if self.task is not None:
            return self.task
        o = self.options
        task = VerbalizedTask("prompting", template=o.template, verbalizer=o.verbalizer or None,
                              text_field=o.text_field, label_field=o.label_field, task_field=o.task_field)
        task.read(run)
        if task.train.mixed or task.held_out.mixed:
            raise ConfigError("prompting: the data names several tasks; prompt one task at a time")
        self.task = task
        self.examples = self._choose_examples(run, task) if o.shots else []
        return task

    def _choose_examples(self, run, task) -> list[tuple[str, str]]:
        """``shots`` (text, label) pairs from the training split, labels taken in turn, each short enough that a
        typical (median) query still fits the context after them; a longer query loses its prompt's beginning
        (counted in the log)."""
        o, tok = self.options, run.tokenizer
        queries = sorted(len(tok.encode(task.template.prompt(t))) for t in task.held_out.texts)
        typical = queries[len(queries) // 2]
        longest_word = max(len(w) for w in task.word_ids.values())
        budget = run.model_config.max_seq_len - 1 - typical - longest_word
        per_example = budget // o.shots - len(tok.encode(o.separator))
        rng = random.Random(run.seed)
        order = list(range(len(task.train)))
        rng.shuffle(order)
        picked: list[tuple[str, str]] = []
        for i in range(o.shots):
            want = task.labels[i % len(task.labels)]
            for j in order:
                text, label = task.train.texts[j], task.train.labels[j]
                if label == want and (text, label) not in picked and \
                        len(tok.encode(task.template.full(text, task.words[label]))) <= per_example:
                    picked.append((text, label))
                    break
            else:
                raise ConfigError(
                    f"prompting: shots={o.shots} examples do not fit the model's context of "
                    f"{run.model_config.max_seq_len} tokens beside queries of {typical} tokens (the median); use "
                    "fewer shots or a model with a longer context (e.g. --model tiny:max_seq_len=512 when pretraining)"
                )
        return picked

    def prompt_texts(self, texts, *, wrong: bool = False, shots: bool = True) -> list[str]:
        """The prompt of each text: the examples (labels deliberately wrong when ``wrong``), then the query."""
        task, o = self.task, self.options
        lines = []
        for text, label in (self.examples if shots else []):
            if wrong:  # the next label in the list: for two labels, the opposite one
                label = task.labels[(task.labels.index(label) + 1) % len(task.labels)]
            lines.append(task.template.full(text, task.words[label]))
        head = o.separator.join(lines) + o.separator if lines else ""
        return [head + task.template.prompt(t) for t in texts]

    def _prompts(self, run, texts, **kw) -> list[list[int]]:
        return [self.task.prompt_ids(run, p, formatted=True) for p in self.prompt_texts(texts, **kw)]

    # -- evaluation and generation -------------------------------------------------------------------------------

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        task = self._setup(run)
        held = task.held_out
        n = len(held) if not self.options.limit else min(self.options.limit, len(held))
        texts, labels = held.texts[:n], held.labels[:n]

        def accuracy(prompts) -> float:
            predicted = task.predict(model, run, texts, prompts=prompts)
            return sum(p == t for p, t in zip(predicted, labels)) / n

        out = {"accuracy": accuracy(self._prompts(run, texts)), "records": float(n), "shots": float(len(self.examples))}
        task._note_truncation(run)
        if self.examples:
            out["accuracy_zero_shot"] = accuracy(self._prompts(run, texts, shots=False))
            if self.options.wrong_labels:
                out["accuracy_wrong_labels"] = accuracy(self._prompts(run, texts, wrong=True))
        return out

    @hookimpl
    def tuneforge_run_end(self, run, model, summary):
        o = self.options
        task = self._setup(run)
        summary["prompting"] = {"template": task.template.text, "verbalizer": task.words,
                                "examples": [{"text": t, "label": lb} for t, lb in self.examples]}
        if not o.generate:
            return
        texts = task.held_out.texts[:o.generate]
        rows = []
        model.eval()
        for text, ids in zip(texts, self._prompts(run, texts)):
            room = run.model_config.max_seq_len - len(ids)
            if room < 1:
                continue
            idx = torch.tensor([ids], device=run.device)
            with torch.no_grad(), routing.rows(None):
                new = model.generate(idx, min(o.max_new_tokens, room), temperature=0.0, eos_id=run.tokenizer.eos_id)
            rows.append({"input": text, "continuation": run.tokenizer.decode(new[0, len(ids):].tolist())})
        summary["prompting"]["generations"] = rows[:5]
        if run.out is not None and run.is_main:
            folder = run.out / "prompting"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
