"""Per-row routing: which task each row of a batch belongs to, for modules that differ per task.

A mixed batch serves several tasks in one forward pass: row 0 uses the ``sentiment`` soft prompt and LoRA,
row 1 the ``topic`` ones, and so on. The modules that depend on the task (soft prompts, adapters, LoRA) sit deep
inside the model, where no forward argument reaches them, so the caller states the rows' tasks around the call::

    with tuneforge.models.routing.rows(["sentiment", "topic", "topic"]):
        logits = model(idx)  # idx: (3, T)

and each such module asks :func:`select` during the forward. Three states:

- no routing (the default): every module applies its *active* parts to every row;
- ``rows([...])``: row ``i`` uses the parts named ``tasks[i]``; an empty name means none for that row. A module
  that holds no part of that name runs the row without one (a model may carry LoRA for some tasks and soft
  prompts for others), but a name that *no* module in the forward holds is a mistake (a typo), raised as a
  ``ConfigError`` (a ``ValueError``) when the block exits;
- ``base()``: every per-task part is off, for every row: the base model (RLHF's frozen reference).

Code that runs part of a forward again later (activation checkpointing recomputes a block during the backward,
after the ``with`` block has exited) takes the routing along with :func:`carried`.
"""
from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from tuneforge.errors import ConfigError

__all__ = ["rows", "base", "current", "carried", "select", "Selection"]


@dataclasses.dataclass
class _Route:
    names: tuple[str, ...] | None  # None: base model for every row
    claimed: set = dataclasses.field(default_factory=set)  # names some module held
    known: set = dataclasses.field(default_factory=set)  # every name the consulted modules hold
    consulted: bool = False
    tensors: dict = dataclasses.field(default_factory=dict)  # (known names, device) -> (B,) ids, built once


_ROUTE: contextvars.ContextVar[_Route | None] = contextvars.ContextVar("tuneforge_route", default=None)


@contextmanager
def rows(tasks: Sequence[str | None] | None):
    """Route row ``i`` of every forward inside the block to ``tasks[i]`` (``None`` = no routing)."""
    if tasks is None:
        token = _ROUTE.set(None)
        try:
            yield
        finally:
            _ROUTE.reset(token)
        return
    route = _Route(tuple("" if t is None else str(t) for t in tasks))
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)
    # reached only when the block ran without an exception
    if route.consulted:
        for i, name in enumerate(route.names):
            if name and name not in route.claimed:
                raise ConfigError(
                    f"routing: row {i} names task '{name}', which no soft prompt, adapter or LoRA in the model "
                    f"holds; known: {', '.join(sorted(route.known)) or 'none'} (an empty name runs the row "
                    "on the base model)"
                )


@contextmanager
def base():
    """Every forward inside the block runs the base model: no soft prompt, adapter or LoRA on any row."""
    token = _ROUTE.set(_Route(None))
    try:
        yield
    finally:
        _ROUTE.reset(token)


def carried():
    """A context manager that re-enters the routing in force *now*, whenever it is entered later.

    The recompute of a checkpointed block runs during ``backward()``, usually after the caller's ``rows(...)``
    block exited: without this, its per-task modules would select for an unrouted forward and compute other
    activations than those whose gradients the backward needs. The same route object comes back, so its
    per-row id tensors are reused and what it records of the names stays consistent."""
    route = _ROUTE.get()

    @contextmanager
    def again():
        token = _ROUTE.set(route)
        try:
            yield
        finally:
            _ROUTE.reset(token)

    return again()


def current() -> tuple[str, ...] | None:
    """The tasks of the rows of the forward being run; ``None`` when the caller routed nothing; inside
    :func:`base` a tuple of empty names is not known in advance, so this returns ``()``."""
    route = _ROUTE.get()
    if route is None:
        return None
    return route.names if route.names is not None else ()


@dataclasses.dataclass
class Selection:
    """What one per-task module applies in one forward.

    ``shared``: indices (into the module's names) applied to every row, in order (empty = none: the base).
    ``ids``: else, per-row indices, (B,) int64 on the module's device, -1 = none for that row.
    """

    shared: tuple[int, ...] = ()
    ids: torch.Tensor | None = None
    row_ids: tuple[int, ...] | None = None  # the same as a tuple (for modules that loop on the host)

    @property
    def per_row(self) -> bool:
        return self.ids is not None


def select(batch_size: int, known: Sequence[str], *, active: Sequence[str], owner: str,
           device: torch.device | None = None) -> Selection:
    """The parts of a per-task module (its names ``known``) that the forward being run applies.

    ``active``: the names applied to every row when the caller routed nothing. Uniform routing (every row the
    same task) comes back as ``shared``, so modules take their one-task path; a mixed batch as per-row ids.
    """
    route = _ROUTE.get()
    index = {name: i for i, name in enumerate(known)}
    if route is None:
        return Selection(tuple(index[n] for n in active))
    if route.names is None:
        return Selection(())
    if len(route.names) != batch_size:
        raise ConfigError(f"{owner}: routing names {len(route.names)} rows, the batch has {batch_size}")
    route.consulted = True
    route.known.update(known)
    ids = tuple(index.get(name, -1) for name in route.names)
    route.claimed.update(name for name in route.names if name in index)
    if len(set(ids)) == 1:
        return Selection(() if ids[0] < 0 else (ids[0],))
    key = (tuple(known), str(device))
    if key not in route.tensors:
        route.tensors[key] = torch.tensor(ids, dtype=torch.long, device=device)
    return Selection((), route.tensors[key], ids)
