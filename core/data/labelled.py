"""Labelled text for the objectives that classify (fine-tuning, prompt tuning) and for prompting: records,
label sets, templates with ``{input}`` / ``{label}`` slots, and verbalizers that turn labels into words.

A record is ``{"text": ..., "label": ...}`` plus, in mixed data, ``"task"``: the name of the task (and so of the
soft prompt or adapter) its row uses. Labels may be strings or integers; they are compared as strings.
"""
from __future__ import annotations

import dataclasses
import re
import string

from tuneforge.data.records import BUILTIN_PREFIX, read_records
from tuneforge.errors import ConfigError, DataError
from tuneforge.common.options import suggest

__all__ = ["Labelled", "read_labelled", "has_labels", "resolve_labels", "Template", "default_template", "verbalizer"]

# How the embedded world writes its labelled lines in builtin:text, so a pretrained model knows the format.
BUILTIN_TEMPLATES = {
    "sentiment": "review: {input} verdict: {label}.",
    "topic": "note: {input} category: {label}.",
}
GENERIC_TEMPLATE = "{input}\nanswer: {label}"


@dataclasses.dataclass
class Labelled:
    """Validated labelled records, in file order."""

    texts: list[str]
    labels: list[str]
    tasks: list[str]  # "" where the record names no task
    where: list[str]  # file:line of each record
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, rows: slice) -> "Labelled":
        """The records ``rows`` (a slice), e.g. a file's tail held out for evaluation."""
        return Labelled(self.texts[rows], self.labels[rows], self.tasks[rows], self.where[rows], self.source)

    @property
    def mixed(self) -> bool:
        return any(self.tasks)

    def task_names(self) -> list[str]:
        return sorted(set(self.tasks))


def read_labelled(spec: str, *, split: str = "train", text_field: str = "text", label_field: str = "label",
                  task_field: str = "task") -> Labelled:
    """Read ``spec`` (``builtin:``, ``.jsonl``) as labelled records; a missing or mistyped field names file:line."""
    records = read_records(spec, split=split, fields={text_field: str, label_field: (str, int)})
    tasks = []
    for item, loc in zip(records.items, records.where):
        task = item.get(task_field, "")
        if not isinstance(task, str):
            raise DataError(f"{loc}: field '{task_field}' must be a string (the task's name), got {task!r}")
        tasks.append(task)
    labels = [str(r[label_field]) for r in records.items]
    _one_spelling(labels, records.where, label_field)
    return Labelled([r[text_field] for r in records.items], labels, tasks, list(records.where), spec)


def _one_spelling(labels: list[str], where: list[str], field: str) -> None:
    """Refuse labels that differ only in case ("Positive" beside "positive"): each would silently become a class
    of its own, and the stray spelling a class with a handful of examples."""
    first: dict[str, tuple[str, str]] = {}  # casefolded -> (the first spelling met, where)
    for label, loc in zip(labels, where):
        seen = first.setdefault(label.casefold(), (label, loc))
        if seen[0] != label:
            raise DataError(f"{loc}: {field} '{label}' differs only in case from '{seen[0]}' ({seen[1]}); they would "
                            f"be two classes: write every record's {field} the same way")


def has_labels(spec: str, label_field: str = "label") -> bool:
    """Whether the records of ``spec`` carry labels (objectives that learn either text or labels decide by it)."""
    return label_field in read_records(spec, split="train").items[0]


def resolve_labels(data: Labelled, given: list[str] | None, classes: int | None, *, owner: str) -> list[str]:
    """The label set, in class-index order: ``given`` (checked against the data), else the data's labels sorted.

    :raises DataError: a record's label is not in ``given`` (names file:line and the known labels).
    :raises ConfigError: ``classes`` disagrees with the number of labels.
    """
    if given:
        if len(set(given)) != len(given):
            raise ConfigError(f"{owner}: labels {given} name a label twice")
        known = set(given)
        for label, loc in zip(data.labels, data.where):
            if label not in known:
                raise DataError(f"{loc}: label '{label}' is not one of {owner}'s labels "
                                f"({', '.join(given)}){suggest(label, given)}; add it to labels= or fix the record")
        labels = list(given)
    else:
        numeric = lambda x: x.lstrip("-").isdigit()  # noqa: E731
        labels = sorted(set(data.labels), key=lambda x: (0, int(x), "") if numeric(x) else (1, 0, x))  # 2 before 10
    if classes and classes != len(labels):
        raise ConfigError(
            f"{owner}: classes={classes}, but {data.source} has {len(labels)} labels ({', '.join(labels)}); "
            f"set classes={len(labels)} or leave it out, or list the labels with labels=..."
        )
    if len(labels) < 2:
        raise ConfigError(f"{owner}: {data.source} has {len(labels)} label(s) ({', '.join(labels)}); a classifier "
                          "needs at least two")
    return labels


class Template:
    """A prompt with an ``{input}`` slot and an optional ``{label}`` slot (default: after a space at the end).

    ``prompt(x)`` is the text up to where the label goes (what a model continues), ``full(x, word)`` the whole
    line with the label word in place (few-shot examples, training text).
    """

    def __init__(self, text: str, *, owner: str):
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        unknown = [f for f in fields if f not in ("input", "label")]
        if unknown:
            raise ConfigError(f"{owner}: template {text!r} has slot {{{unknown[0]}}}; only {{input}} and {{label}} "
                              "exist (write {{ and }} for literal braces)")
        if "input" not in fields:
            raise ConfigError(f"{owner}: template {text!r} has no {{input}} slot, so every record would get the "
                              "same prompt; put {input} where the text goes, e.g. 'review: {input} verdict: {label}.'")
        if fields.count("label") > 1 or fields.count("input") > 1:
            raise ConfigError(f"{owner}: template {text!r} must have one {{input}} and at most one {{label}}")
        if "label" not in fields:
            text = text + " {label}"
        before, _, after = text.partition("{label}")
        if "{input}" not in before:
            raise ConfigError(f"{owner}: template {text!r} puts {{label}} before {{input}}; the label is what the "
                              "model predicts after reading the input")
        self.text, self._before, self._after = text, before, after

    def prompt(self, text: str) -> str:
        return self._before.format(input=text)

    def full(self, text: str, word: str) -> str:
        return self.prompt(text) + word + self._after.format()

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def _builtin_name(spec: str) -> str | None:
    return spec[len(BUILTIN_PREFIX):] if spec.startswith(BUILTIN_PREFIX) else None


def default_template(spec: str) -> str:
    """The format the embedded world uses for a builtin task (so a pretrained model knows it), else generic."""
    return BUILTIN_TEMPLATES.get(_builtin_name(spec) or "", GENERIC_TEMPLATE)


_PAIR = re.compile(r"^\s*([^=:]+?)\s*[=:]\s*(.*?)\s*$")


def verbalizer(pairs: list[str] | None, labels: list[str], spec: str, *, owner: str) -> dict[str, str]:
    """label -> word. ``pairs`` like ``["positive:good", "negative:bad"]`` (``=`` works too, outside the command
    line's ``key=value``) override the defaults: a builtin task's own words (positive -> good); any other label
    maps to itself."""
    from tuneforge.data.world import VERBALIZERS

    words = dict(VERBALIZERS.get(_builtin_name(spec) or "", {}))  # pairs given below override these
    for pair in pairs or []:
        m = _PAIR.match(pair)
        if not m or not m.group(2):
            raise ConfigError(f"{owner}: verbalizer entry {pair!r} is not LABEL:WORD (e.g. positive:good)")
        label, word = m.groups()
        if label not in labels:
            raise ConfigError(f"{owner}: verbalizer names unknown label '{label}'{suggest(label, labels)}; "
                              f"the labels are {', '.join(labels)}")
        words[label] = word
    out = {label: words.get(label, label) for label in labels}
    clash = [w for w in set(out.values()) if list(out.values()).count(w) > 1]
    if clash:
        raise ConfigError(f"{owner}: verbalizer maps two labels to the word '{clash[0]}'; they could not be told apart")
    return out
