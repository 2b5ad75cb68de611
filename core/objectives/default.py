"""The default objective a parameterisation offers: learn the run's data as given.

``prompt-tuning``, ``adapter`` and ``lora`` change which parameters move, not what is optimised. When no other
mechanism in the run brings an objective, they fall back to this one (hooks marked ``trylast``; the first
named wins): label words on labelled records (:class:`tuneforge.objectives.classify.VerbalizedTask`), next tokens on text
(:class:`tuneforge.objectives.next_token.TextTask`). A plugin opts in by inheriting :class:`DefaultObjective` and
:class:`ObjectiveOptions` (the fields that say how to read the data).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from tuneforge.objectives.classify import VerbalizedTask
from tuneforge.hookspecs import hookimpl
from tuneforge.data.labelled import has_labels
from tuneforge.objectives.next_token import TextTask
from tuneforge.common.options import check_range

__all__ = ["ObjectiveOptions", "DefaultObjective"]


@dataclasses.dataclass
class ObjectiveOptions:
    """How the default objective reads the data (used only when no other mechanism brings an objective)."""

    text_field: str = "text"  # the record field holding the input text
    label_field: str = "label"  # the record field holding the label (labelled data: label words are learned)
    task_field: str = "task"  # in mixed data, the task (soft prompt, adapter, LoRA) each record's row uses
    template: Optional[str] = None  # labelled data: prompt with {input} and {label} slots
    verbalizer: list[str] = dataclasses.field(default_factory=list)  # labelled data: LABEL:WORD pairs
    holdout: float = 0.1  # share of a file held out for evaluation when there is no --eval-data

    def __post_init__(self):
        check_range(self, "holdout", "[0, 0.5)", " (a share of the file)")


class DefaultObjective:
    """Mixin: ``tuneforge_data`` / ``tuneforge_loss`` (trylast) and ``tuneforge_evaluate`` for the data as given.
    The plugin has ``self.options`` (an :class:`ObjectiveOptions`) and ``objective_owner`` (its name)."""

    objective_owner = "default objective"
    _objective_task = None

    def objective_reserve(self) -> int:
        """Context positions the model itself takes before the input (a soft prompt's tokens)."""
        return 0

    def objective_task(self, run):
        if self._objective_task is None:
            o, owner, reserve = self.options, self.objective_owner, self.objective_reserve()
            if has_labels(run.config.data, o.label_field):
                self._objective_task = VerbalizedTask(
                    owner, template=o.template, verbalizer=o.verbalizer or None, text_field=o.text_field,
                    label_field=o.label_field, task_field=o.task_field, holdout=o.holdout, reserve=reserve)
            else:
                self._objective_task = TextTask(owner, field=o.text_field, holdout=o.holdout, reserve=reserve)
        return self._objective_task

    @hookimpl(trylast=True)
    def tuneforge_data(self, run):
        return self.objective_task(run).epoch(run)

    @hookimpl(trylast=True)
    def tuneforge_loss(self, model, batch):
        return self._objective_task.loss(model, batch)

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        if run.is_objective(self):
            return self.objective_task(run).evaluate(model, run)
        return None
