"""``pretrain``: next-token cross-entropy from random initialisation; every weight trains.

On a Hugging Face model (``--model hf:PATH``) the architecture, config and tokenizer are the folder's and the
weights start from transformers' random init; ``--init`` continues from a checkpoint's weights instead."""
from __future__ import annotations

import dataclasses

from tuneforge.sdk import TextTask, check_range, hookimpl

__all__ = ["Pretrain"]


class Pretrain:
    """Next-token prediction on raw text (labels are the input shifted by one); all weights train."""

    @dataclasses.dataclass
    class Options:
        field: str = "text"  # the .jsonl field holding the text
        eval_batches: int = 8  # held-out batches per evaluation
        holdout: float = 0.05  # share of a file's windows held out when no eval data is given

        def __post_init__(self):
            check_range(self, "holdout", "[0, 0.5)", " (a share of the file)")
            if self.eval_batches < 1:
                raise ValueError(f"eval_batches must be at least 1, got {self.eval_batches}")

    def __init__(self, options: Options):
        self.options = options
        self.task = TextTask("pretrain", field=options.field, holdout=options.holdout,
                             eval_batches=options.eval_batches)

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        # A model that arrived with trained weights (a Hugging Face folder) starts again from its config's random
        # init; the embedded model is random already, and --init asks to go on from a checkpoint's weights.
        from_scratch = getattr(model, "from_scratch", None)
        if from_scratch is not None and not run.config.init:
            return from_scratch(run.seed)
        return None

    @hookimpl
    def tuneforge_trainable_params(self, model):
        return list(model.parameters())

    @hookimpl
    def tuneforge_data(self, run):
        return self.task.epoch(run)

    @hookimpl
    def tuneforge_loss(self, model, batch):
        return self.task.loss(model, batch)

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        return self.task.evaluate(model, run)
