"""What adapters, LoRA and soft prompts share: named per-task parts on one frozen base model, and which run.

Every module that holds per-task parts (a :class:`TaskModule`: ``LoRALinear``, ``AdapterPoint``, ``SoftPrompts``)
keeps them by name, so one base model can carry many: ``sentiment`` and ``topic`` LoRAs, a ``topic`` adapter...
Which parts a forward applies:

- routed rows (:func:`tuneforge.models.routing.rows`): each row its own task's parts, in one forward pass;
- else the *active* parts, set model-wide with :func:`set_active` / :func:`using` (a module holding a single
  part applies it when nothing was set; holding several, it asks the caller to choose);
- :func:`tuneforge.models.routing.base` (or ``using(model, [])``): none, the base model.

Several active parts of one module combine: LoRA updates and parallel adapters add up, serial adapters apply
one after the other.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch.nn as nn

from tuneforge.models import routing
from tuneforge.errors import ConfigError

__all__ = [
    "TaskModule", "task_modules", "names", "set_active", "using", "base_named_parameters", "base_fingerprint",
    "base_shapes", "parse_layers", "layer_of", "match_linears",
]


class TaskModule:
    """Mixin of modules that hold named per-task parts. Subclasses set ``kind`` (for messages) and implement
    ``task_names()`` and ``part_parameters(name)``; ``active`` is ``None`` until someone chooses."""

    kind: str = "per-task parts"
    active: tuple[str, ...] | None = None

    def task_names(self) -> list[str]:
        raise NotImplementedError

    def part_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of part ``name`` (what a mechanism trains, and what is not the base)."""
        raise NotImplementedError

    def all_part_parameters(self) -> list[nn.Parameter]:
        return [p for n in self.task_names() for p in self.part_parameters(n)]

    def resolved_active(self) -> tuple[str, ...]:
        if self.active is not None:
            return tuple(n for n in self.active if n in self.task_names())
        held = self.task_names()
        if len(held) <= 1:
            return tuple(held)
        raise ConfigError(
            f"this model holds {self.kind} {', '.join(held)}: say which run, for every row with "
            "tuneforge.parts.modules.set_active(model, [...]), or per row with tuneforge.models.routing.rows([...]) around the "
            "call (a 'task' field in the data; --task NAME for tuneforge generate)"
        )

    def selection(self, batch_size: int, device) -> routing.Selection:
        """What this forward applies (see :func:`tuneforge.models.routing.select`)."""
        active = self.resolved_active() if routing.current() is None else ()
        return routing.select(batch_size, self.task_names(), active=active, owner=self.kind, device=device)


def task_modules(model: nn.Module) -> Iterator[tuple[str, TaskModule]]:
    """(path, module) of every per-task module in ``model``, in module order."""
    for path, module in model.named_modules():
        if isinstance(module, TaskModule):
            yield path, module


def names(model: nn.Module) -> dict[str, list[str]]:
    """The per-task parts a model holds, by kind: ``{"LoRA adapters": ["sentiment"], "soft prompts": [...]}``."""
    out: dict[str, list[str]] = {}
    for _, m in task_modules(model):
        have = out.setdefault(m.kind, [])
        have.extend(n for n in m.task_names() if n not in have)
    return out


def set_active(model: nn.Module, active: Sequence[str] | None) -> None:
    """Apply the parts named ``active`` to every row of later forwards (each module applies those it holds);
    ``[]`` = none (the base model); ``None`` = back to each module's default. Unknown names are an error."""
    modules = [m for _, m in task_modules(model)]
    if active is not None:
        held = {n for m in modules for n in m.task_names()}
        missing = [n for n in active if n not in held]
        if missing:
            raise ConfigError(f"set_active: no part named {', '.join(map(repr, missing))} in this model; it holds "
                             f"{', '.join(sorted(held)) or 'none'}")
    for m in modules:
        check = getattr(m, "check_active", None)
        if check is not None:
            check(active)
        m.active = None if active is None else tuple(n for n in active if n in m.task_names())


@contextmanager
def using(model: nn.Module, active: Sequence[str] | None):
    """:func:`set_active` for the duration of a block, then each module's previous choice again."""
    before = [(m, m.active) for _, m in task_modules(model)]
    set_active(model, active)
    try:
        yield model
    finally:
        for m, value in before:
            m.active = value


def base_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the base model: everything but the per-task parts, shared tensors once."""
    parts = {id(p) for _, m in task_modules(model) for p in m.all_part_parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in parts]


def base_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in base_named_parameters(model)}


def base_fingerprint(model: nn.Module) -> str:
    """16 hex digits naming the base model's parameter names and shapes (not values): a part trained on one
    base is told apart from a base of other shapes."""
    shapes = sorted((n, s) for n, s in base_shapes(model).items())
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


_RANGE = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")


def parse_layers(spec: Sequence[str], depth: int, *, owner: str) -> list[int]:
    """Block indices from ``["all"]``, ``["0", "2-3"]`` or ``["-1"]`` (negative: from the end)."""
    if not spec or list(spec) == ["all"]:
        return list(range(depth))
    out: list[int] = []
    for item in spec:
        m = _RANGE.match(str(item).strip())
        if not m:
            raise ConfigError(f"{owner}: layers={item!r}: write 'all', block numbers (0,2), ranges (1-3) or "
                              "negative numbers counted from the last block (-1)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        for i in range(lo, hi + 1) if lo <= hi else [lo]:
            j = i + depth if i < 0 else i
            if not 0 <= j < depth:
                raise ConfigError(f"{owner}: layers={item}: this model has blocks 0..{depth - 1}")
            if j not in out:
                out.append(j)
    return sorted(out)


def layer_of(path: str) -> int | None:
    """The block a module path belongs to: its first numeric component (``blocks.3.attn.q`` -> 3)."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def match_linears(model: nn.Module, patterns: Sequence[str], layers: Sequence[int], *,
                  owner: str) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules whose path matches one of ``patterns`` inside the blocks ``layers``.

    A pattern matches a path equal to it or ending with ``.pattern`` (PEFT's rule: ``q`` matches
    ``blocks.0.attn.q``), with ``*`` and ``?`` wildcards (``attn.*``, ``mlp.up``). Layers inside adapters are
    never targets; a module outside every block (the LM head) only when a pattern names its whole path.
    """
    found = []
    wanted = set(layers)
    inside = tuple(p + "." for p, m in task_modules(model) if p and not isinstance(m, nn.Linear))  # adapters
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not path:
            continue
        if inside and path.startswith(inside):
            continue  # a linear layer inside an adapter is not a target
        exact = any(fnmatch.fnmatchcase(path, pat) for pat in patterns)
        suffix = any(fnmatch.fnmatchcase(path, "*." + pat) for pat in patterns)
        layer = layer_of(path)
        in_blocks = (exact or suffix) and layer in wanted
        if (exact if layer is None else in_blocks):
            found.append((path, module))
    if not found:
        linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and layer_of(p) == 0]
        raise ConfigError(f"{owner}: targets={','.join(patterns)} match no linear layer in blocks "
                          f"{','.join(map(str, layers))}; block 0 has {', '.join(linears) or 'none'}")
    return found
