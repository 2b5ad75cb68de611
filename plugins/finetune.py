"""``finetune``: continue training a pretrained model (``--init``) on the last N blocks, or all of it.

Its objective gives way to another plugin's (``objective_yields``: beside ``sft`` finetune only says which blocks
train) and wins over the defaults of lora, adapters and soft prompts. Chosen by the options and the data:

- ``head=lm`` on text: next-token cross-entropy (domain adaptation);
- ``head=lm`` on labelled records: the model learns to answer with the label's word (see
  :class:`tuneforge.objectives.classify.VerbalizedTask`); accuracy compares the label words' likelihoods;
- ``head=classify``: a new N-output head replaces the LM head and reads the last token; class cross-entropy,
  prediction = the most activated output.

Frozen means frozen: with ``layers=N`` the embeddings and every block below the last N never change, and an LM
head tied to the token embedding is untied first (it would otherwise drag the input embedding along).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn as nn

from tuneforge.sdk import (ConfigError, HeadTask, ObjectiveOptions, TextTask, VerbalizedTask, block_parameters,
    check_layers, fit_context, has_labels, hookimpl, others_choose_params, pad_right, resolve_layers, tokenizer_of,
    untie_head)

__all__ = ["Finetune", "ClassifierHead", "classify"]


class ClassifierHead(nn.Linear):
    """The N-class head that replaces the LM head; ``labels[i]`` names output ``i``."""

    def __init__(self, d_model: int, labels: list[str]):
        super().__init__(d_model, len(labels))
        self.labels = list(labels)
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)


class Finetune:
    """Train the last N blocks (+ final norm and head) of a pretrained model, optionally with a new head."""

    # The objective tuneforge.sdk.testing adds to a tiny run none of whose mechanisms brings one: beside a plugin
    # that chooses what trains, finetune trains nothing of its own, so that plugin is tested alone.
    test_objective = True
    # Beside another objective (sft, dpo...) finetune only chooses the blocks that train (see engine/registry.py).
    objective_yields = True

    @dataclasses.dataclass
    class Options(ObjectiveOptions):  # the data fields, template, verbalizer and holdout of every objective
        # N = the last N blocks + final norm + head train; 0 = only the head; all = everything; auto = all alone, and
        # beside LoRA / adapters / soft prompts only a new classification head (the parts are what train)
        layers: str = "auto"
        head: Literal["lm", "classify"] = "lm"  # classify = a new N-class head in place of the LM head
        classes: Optional[int] = None  # the head's outputs; default: the number of labels in the data
        labels: list[str] = dataclasses.field(default_factory=list)  # class order; default: the data's, sorted
        eval_batches: int = 8  # head=lm on text: held-out batches per evaluation

        def __post_init__(self):
            super().__post_init__()
            check_layers(self.layers)
            if self.classes is not None and self.classes < 2:
                raise ValueError(f"classes must be at least 2, got {self.classes}")
            if self.classes is not None and self.head != "classify":
                raise ValueError("classes= sets the size of a new classification head; add head=classify")
            if self.eval_batches < 1:
                raise ValueError(f"eval_batches must be at least 1, got {self.eval_batches}")

    def __init__(self, options: Options):
        self.options = options
        self.task = None

    # -- which objective ---------------------------------------------------------------------------------------

    def _task(self, run):
        if self.task is None:
            o = self.options
            fields = dict(text_field=o.text_field, label_field=o.label_field, task_field=o.task_field,
                          labels=o.labels or None, holdout=o.holdout)
            if o.head == "classify":
                self.task = HeadTask("finetune", classes=o.classes, **fields)
            elif has_labels(run.config.data, o.label_field):  # head=lm learns label words, else the text
                self.task = VerbalizedTask("finetune", template=o.template, verbalizer=o.verbalizer or None, **fields)
            else:
                self.task = TextTask("finetune", field=o.text_field, holdout=o.holdout, eval_batches=o.eval_batches)
        return self.task

    def _layers(self, run) -> tuple[str, bool]:
        """(blocks that train, whether the head trains) once ``auto`` is resolved against the run's plugins."""
        o = self.options
        if o.layers == "auto" and others_choose_params(run, self):
            return "0", o.head == "classify"  # the parts train; a new head must learn with them, the LM head not
        return resolve_layers(o.layers, run, self), True

    # -- hooks -------------------------------------------------------------------------------------------------

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        o = self.options
        depth = len(model.blocks)
        layers, head_trains = self._layers(run)
        if layers != "all" and int(layers) > depth:
            raise ConfigError(f"finetune: layers={o.layers}, but the model has {depth} blocks; use layers=0..{depth} "
                              "or layers=all")
        if o.head == "classify":
            if not o.labels:  # resolved from the data once, then saved with the options (a rebuild needs no data)
                task = self._task(run)
                task.read(run)
                o.labels = list(task.labels)
            if o.classes is not None and o.classes != len(o.labels):
                raise ConfigError(f"finetune: classes={o.classes} but labels= names {len(o.labels)}: "
                                  f"{', '.join(o.labels)}")
            head = model.lm_head
            if not (isinstance(head, ClassifierHead) and head.labels == o.labels):  # else: keep training that head
                model.lm_head = ClassifierHead(model.config.d_model, o.labels).to(model.tok_emb.weight.device)
        elif layers != "all" and head_trains:
            untie_head(model)  # the head trains, the input embedding it was tied to stays frozen

    @hookimpl
    def tuneforge_trainable_params(self, model, run):
        layers, head_trains = self._layers(run)
        return block_parameters(model, layers, head=head_trains)

    @hookimpl
    def tuneforge_data(self, run):
        return self._task(run).epoch(run)

    @hookimpl
    def tuneforge_loss(self, model, batch):
        return self.task.loss(model, batch)

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        return self._task(run).evaluate(model, run) if run.is_objective(self) else None


@torch.no_grad()
def classify(model, texts: list[str], *, tasks: list[str] | None = None, batch_size: int = 64) -> list[str]:
    """Labels predicted by a model with a fine-tuned classification head (e.g. from ``tuneforge.load_model``)."""
    head = model.lm_head
    if not isinstance(head, ClassifierHead):
        raise ConfigError("classify: this model has no classification head (train with finetune:head=classify)")
    tok, device = tokenizer_of(model), model.tok_emb.weight.device
    out: list[str] = []
    for b in range(0, len(texts), batch_size):
        rows = [fit_context(tok.encode(t, bos=True, eos=True), model.config.max_seq_len)[0]
                for t in texts[b:b + batch_size]]
        batch = {"input": pad_right(rows, tok.pad_id).to(device),
                 "last": torch.tensor([len(r) - 1 for r in rows], device=device)}
        if tasks:
            batch["task"] = tasks[b:b + batch_size]
        out.extend(head.labels[i] for i in HeadTask.logits(model, batch).argmax(-1).tolist())
    return out
