"""Where IA³ goes in a model: roles (``k``, ``v``, ``mlp``) -> linear layers, through tuneforge's families table.

The embedded model keeps keys and values in ``blocks.N.attn.k`` / ``.v`` and its MLP's down projection in
``blocks.N.mlp.down``; Llama-like models in ``model.layers.N.self_attn.k_proj`` / ``v_proj`` and
``mlp.down_proj``; GPT-2 projects q, k and v with one fused ``transformer.h.N.attn.c_attn`` (tuneforge turns
its ``Conv1D`` into an ``nn.Linear``) and has its down projection in ``mlp.c_proj``. None of these names is
written here: :mod:`tuneforge.models.families` maps the roles ``k``, ``v`` and ``down`` onto each family's layers, and a
layer that several of q, k, v name is fused, its output split evenly between them in q, k, v order.

Everything here is a pure function of the model's structure and the options, so a saved model is rebuilt with
its vectors in the same places.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import torch.nn as nn

from tuneforge.sdk import ConfigError, FAMILIES, family_of, parse_layers

from .layer import IA3Linear

__all__ = ["ROLES", "SIDE", "Point", "plan", "points_for", "install", "vectors", "ia3_layers", "parse_vector_name"]

#: IA³ roles, in the paper's order: keys, values, the MLP's inner activation
ROLES = ("k", "v", "mlp")
#: which side of its layer each role scales
SIDE = {"k": "out", "v": "out", "mlp": "in"}
# the role's name in tuneforge.models.families (whose "mlp" means every MLP layer, as LoRA targets)
_FAMILY_ROLE = {"k": "k", "v": "v", "mlp": "down"}
_FUSED_ORDER = ("q", "k", "v")  # how a fused projection lays out its output
_VECTOR = re.compile(r"^(?P<path>.+)\.ia3\.(?P<role>[a-z]+)$")


@dataclasses.dataclass(frozen=True)
class Point:
    """One IA³ vector: the layer at ``path``, the ``role`` it plays there, and the features ``[start, stop)`` of
    that layer's output (``side="out"``) or input (``side="in"``) it scales."""

    path: str
    role: str
    start: int
    stop: int

    @property
    def side(self) -> str:
        return SIDE[self.role]

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        """The vector's name in the model's state dict."""
        return f"{self.path}.ia3.{self.role}"


def parse_vector_name(name: str) -> tuple[str, str] | None:
    """``"blocks.0.attn.k.ia3.k"`` -> ``("blocks.0.attn.k", "k")``; None for any other tensor name."""
    m = _VECTOR.match(name)
    if m is None or m.group("role") not in ROLES:
        return None
    return m.group("path"), m.group("role")


def _layer(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"ia3: this model has no layer {path}") from None


def _span(model, family, sub: str, role: str, layer: nn.Module, path: str) -> tuple[int, int]:
    """The features of ``layer`` (at ``sub`` inside a block) that ``role`` scales."""
    if SIDE[role] == "in":
        return 0, layer.in_features
    sharing = [r for r in _FUSED_ORDER if sub in family.aliases.get(r, [])]
    if len(sharing) == 1:
        return 0, layer.out_features
    # A fused projection: the roles that name it split its output evenly, in q, k, v order. That holds for
    # GPT-2's c_attn (3 * d_model); a fused layer with grouped keys and values would not split evenly.
    d_model = model.config.d_model
    if layer.out_features != len(sharing) * d_model:
        raise ConfigError(
            f"ia3: {path} is fused ({', '.join(sharing)} share it), but its {layer.out_features} outputs are not "
            f"{len(sharing)} x d_model ({d_model}); IA³ cannot tell where the {role} features lie")
    i = sharing.index(role)
    return i * d_model, (i + 1) * d_model


def plan(model: nn.Module, targets: Sequence[str], layers: Sequence[str] = ("all",)) -> list[Point]:
    """The IA³ vectors ``targets`` (roles) on blocks ``layers`` ask for, in block order then role order.

    :raises ConfigError: a role the model's family has no layer for, or a layer that is not where the table says.
    """
    family = family_of(model)
    depth = len(model.blocks)
    blocks = parse_layers(list(layers), depth, owner="ia3")
    points = []
    for i in blocks:
        for role in ROLES:  # a fixed order, whatever order targets= was written in
            if role not in targets:
                continue
            subs = family.aliases.get(_FAMILY_ROLE[role])
            if not subs:
                known = ", ".join(sorted({f.name for f in FAMILIES.values()} | {"tuneforge"}))
                raise ConfigError(
                    f"ia3: tuneforge's families table names no '{_FAMILY_ROLE[role]}' layer for this "
                    f"'{family.name}' model, so targets={role} has no place in it (known families: {known})")
            for sub in subs:
                if any(c in sub for c in "*?["):
                    raise ConfigError(f"ia3: the '{family.name}' family names '{_FAMILY_ROLE[role]}' by the pattern "
                                      f"{sub!r}; IA³ needs one layer per role")
                path = f"{family.blocks}.{i}.{sub}"
                layer = _layer(model, path)
                start, stop = _span(model, family, sub, role, layer, path)
                points.append(Point(path, role, start, stop))
    return points


def points_for(model: nn.Module, shapes: dict[str, Sequence[int]], *, where: str) -> list[Point]:
    """The points of saved vectors (state-dict name -> shape, e.g. a checkpoint's ``*.ia3.k`` tensors), checked
    against where this model's family puts each role; other names are ignored."""
    found = {}
    for name, shape in shapes.items():
        parsed = parse_vector_name(name)
        if parsed is not None:
            found[name] = (*parsed, tuple(shape))
    roles = [r for r in ROLES if any(role == r for _, role, _ in found.values())]
    placed = {p.name: p for p in plan(model, roles)} if roles else {}  # every block, in plan's fixed order
    points = []
    for name, (path, role, shape) in found.items():
        p = placed.get(name)
        if p is None:
            raise ConfigError(f"ia3: {where} holds the vector {name}, but this model has no '{role}' layer at "
                              f"{path} ({len(model.blocks)} blocks): it was trained on another base")
        if shape != (p.size,):
            raise ConfigError(f"ia3: {where} holds {name} of shape {shape}; this model's {role} layer there "
                              f"needs ({p.size},): it was trained on another base")
        points.append(p)
    order = {name: i for i, name in enumerate(placed)}
    return sorted(points, key=lambda p: order[p.name])  # install order = parameter order: keep it fixed


def ia3_layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    """(path, layer) of every IA³ layer in ``model``, in module order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, IA3Linear)]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def install(model: nn.Module, points: Sequence[Point], *, init: float = 1.0, where: str = "") -> list[Point]:
    """Put the vectors of ``points`` into ``model`` (at ``init``); a vector the model holds already is kept as it
    is. Every point is checked before anything changes. Returns the points, for finding their vectors later.

    :param where: where the points come from, for messages (a saved folder or checkpoint).
    """
    src = f" from {where}" if where else ""
    for p in points:
        layer = _layer(model, p.path)
        if isinstance(layer, IA3Linear):
            if layer.side != p.side:
                raise ConfigError(f"ia3: {p.path} holds IA³ on its {layer.side}put; '{p.role}'{src} scales its "
                                  f"{p.side}put")
            if p.role in layer.spans and layer.spans[p.role] != (p.start, p.stop):
                raise ConfigError(f"ia3: {p.path} holds a '{p.role}' vector over features {layer.spans[p.role]}; "
                                  f"the one{src} covers [{p.start}, {p.stop})")
        elif type(layer) is not nn.Linear:
            raise ConfigError(
                f"ia3: {p.path} is a {type(layer).__name__}, not a plain linear layer (another mechanism replaced "
                f"it, e.g. lora); IA³ and that mechanism cannot share a layer: give them different layers "
                f"(lora:targets=q,o, or ia3:targets=...)")
        if p.stop > (layer.out_features if p.side == "out" else layer.in_features):
            raise ConfigError(f"ia3: the '{p.role}' vector{src} for {p.path} has {p.size} features, which a "
                              f"{layer.in_features} -> {layer.out_features} layer does not have: it was trained "
                              "on another base")
    for p in points:
        layer = model.get_submodule(p.path)
        if not isinstance(layer, IA3Linear):
            layer = IA3Linear(layer, p.side)
            _set_module(model, p.path, layer)
        if p.role not in layer.ia3:
            layer.add(p.role, p.start, p.stop, init)
    return list(points)


def vectors(model: nn.Module, points: Iterable[Point]) -> list[nn.Parameter]:
    """The vectors of ``points`` in ``model`` (found by structure: the IA³ layers at those paths)."""
    return [model.get_submodule(p.path).ia3[p.role] for p in points]
