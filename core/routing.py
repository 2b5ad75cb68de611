"""Per-row routing: which task each row of a batch belongs to, for modules that differ per task.

A mixed batch serves several tasks in one forward pass: row 0 uses the ``sentiment`` soft prompt, row 1 the
``topic`` one, and so on. The modules that depend on the task (soft prompts, and later adapters) sit deep inside
the model, where no forward argument reaches them, so the caller states the rows' tasks around the call::

    with tuneforge.routing.rows(["sentiment", "topic", "topic"]):
        logits = model(idx)  # idx: (3, T)

and each such module reads :func:`current` during the forward. ``None`` for the whole batch (the default) means
"no routing": a module with a single task applies it to every row. An empty name for one row means "none of
the per-task modules for this row" (the base model).
"""
from __future__ import annotations

import contextvars
from collections.abc import Sequence
from contextlib import contextmanager

__all__ = ["rows", "current", "task_ids"]

_ROWS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("tuneforge_rows", default=None)


@contextmanager
def rows(tasks: Sequence[str | None] | None):
    """Route row ``i`` of every forward inside the block to ``tasks[i]`` (``None`` = no routing)."""
    value = None if tasks is None else tuple("" if t is None else str(t) for t in tasks)
    token = _ROWS.set(value)
    try:
        yield
    finally:
        _ROWS.reset(token)


def current() -> tuple[str, ...] | None:
    """The tasks of the rows of the forward being run, or ``None`` when the caller routed nothing."""
    return _ROWS.get()


def task_ids(names: Sequence[str], known: Sequence[str], *, owner: str) -> list[int]:
    """Index of each row's task in ``known`` (-1 for an empty name); an unknown task is a clear error."""
    index = {name: i for i, name in enumerate(known)}
    out = []
    for row, name in enumerate(names):
        if name == "":
            out.append(-1)
        elif name in index:
            out.append(index[name])
        else:
            raise ValueError(
                f"{owner}: row {row} names task '{name}', which has none here; known: {', '.join(known) or 'none'} "
                "(an empty name runs the row without one)"
            )
    return out
