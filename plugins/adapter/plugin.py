"""``adapter``: bottleneck layers (down-projection, activation, up-projection) in a frozen model.

``placement=serial`` puts each on a sub-layer's output before the residual add; ``placement=parallel`` beside the
sub-layer, on its input, scaled by ``scale`` and added. ``positions=attn,mlp`` picks the sub-layers, ``layers=``
the blocks, ``reduction=`` the ratio hidden / bottleneck (or ``size=`` the bottleneck itself). The up-projection
starts at zero, so an untrained adapter is the identity. Several named adapters live on one model
(``tasks=a,b``, ``load=``) and rows of a batch choose theirs with :func:`tuneforge.models.routing.rows`; each is saved as
``adapters/<name>/`` in every checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch

from tuneforge.sdk import ConfigError, PartMechanism, PartOptions, family_of, kernels, parse_layers, part_generator

from .layer import POINT_FIELDS, AdapterPoint, Bottleneck, adapter_points

__all__ = ["Adapter", "add_adapter", "load_adapters", "insertion_points"]


def insertion_points(model, positions: list[str], layers: list[int]) -> list[tuple[str, torch.nn.Module]]:
    """(path, sub-layer) for each chosen position of each chosen block, e.g. ``blocks.0.attn`` or (Llama)
    ``model.layers.0.self_attn``. A position is a role (``attn``, ``mlp``) the model's family maps onto its
    sub-layers, or a sub-layer's own path inside a block (``self_attn``, ``mlp.act``)."""
    family = family_of(model)
    out = []
    for i in layers:
        block = model.blocks[i]
        for pos in positions:
            name = family.sublayer(pos)
            try:
                sub = block.get_submodule(name)
            except AttributeError:
                sub = None
            if not isinstance(sub, torch.nn.Module) or isinstance(sub, (torch.nn.LayerNorm, torch.nn.ModuleList)):
                have = [n for n, m in block.named_children() if "norm" not in type(m).__name__.lower()]
                raise ConfigError(f"adapter: positions={pos}: a block of this {family.name} model has no sub-layer "
                                  f"of that name; it has {', '.join(have)} (roles: {', '.join(family.positions)})")
            out.append((f"{family.blocks}.{i}.{name}", sub))
    return out


def add_adapter(model, name: str = "default", *, placement: str = "serial", positions=("attn", "mlp"),
                layers=("all",), reduction: int = 16, size: int | None = None, activation: str = "gelu",
                scale: float = 1.0, seed: int = 0) -> list[str]:
    """Add a new bottleneck adapter ``name`` (up = 0: the identity) at ``positions`` of the blocks ``layers``;
    returns the sub-layer paths. Options as for ``adapter:`` runs."""
    d = model.config.d_model
    width = size or max(1, d // reduction)
    g = part_generator(seed, name)
    w = model.tok_emb.weight  # adapters take the model's device and dtype (bf16 models get bf16 adapters)
    points = insertion_points(model, list(positions), parse_layers(list(layers), len(model.blocks), owner="adapter"))
    for _, sub in points:
        AdapterPoint.on(sub)[name] = Bottleneck(d, width, placement=placement, activation=activation, scale=scale,
                                               generator=g).to(w.device, w.dtype)
    return [p for p, _ in points]


def load_adapters(model, *specs: str) -> list[str]:
    """Load saved adapters onto ``model`` (frozen): adapter folders, checkpoint or run folders. Returns their
    names; route rows with :func:`tuneforge.models.routing.rows` or choose with :func:`tuneforge.parts.modules.set_active`."""
    return Adapter.load_frozen(model, *specs)


class Adapter(PartMechanism):
    """Bottleneck adapters, serial or parallel, at chosen positions; the base model stays frozen."""

    mechanism = "adapter"
    subdir = "adapters"
    point_fields = POINT_FIELDS

    @dataclasses.dataclass
    class Options(PartOptions):
        placement: Literal["serial", "parallel"] = "serial"  # serial: on the output; parallel: beside, on the input
        positions: list[str] = dataclasses.field(default_factory=lambda: ["attn", "mlp"])
        reduction: int = 16  # hidden width / bottleneck width
        size: Optional[int] = None  # the bottleneck width itself (overrides reduction)
        activation: str = "gelu"
        scale: float = 1.0  # multiplies the adapter's output (parallel adapters often use > 1)

        def __post_init__(self):
            super().__post_init__()
            if self.reduction < 1:
                raise ValueError(f"reduction must be at least 1, got {self.reduction}")
            if self.size is not None and self.size < 1:
                raise ValueError(f"size must be at least 1, got {self.size}")
            if self.activation not in kernels.ACTIVATIONS:
                raise ValueError(f"activation must be one of {', '.join(kernels.ACTIVATIONS)}, got {self.activation!r}")
            if not self.positions:
                raise ValueError("positions must name at least one sub-layer, e.g. positions=attn,mlp")

    def part_modules(self, model):
        return [m for _, m in adapter_points(model)]

    def create(self, model, run, name):
        o = self.options
        add_adapter(model, name, placement=o.placement, positions=o.positions, layers=o.layers,
                    reduction=o.reduction, size=o.size, activation=o.activation, scale=o.scale, seed=run.seed)

    def export(self, model, name):
        tensors, points = {}, {}
        for path, point in adapter_points(model):
            if name in point:
                a, sub = point[name], path.rpartition(".")[0]  # blocks.0.attn.adapters -> blocks.0.attn
                for key, t in a.state_dict().items():
                    tensors[f"{sub}.{key}"] = t
                points[sub] = {"d_model": a.up.out_features, "size": a.size, "placement": a.placement,
                               "activation": a.activation, "scale": a.scale}
        return tensors, points

    def install(self, model, name, manifest, tensors, where):
        d = model.config.d_model
        found = []
        # Every point is checked and its adapter built (tensors loaded) before the first is attached, so a part
        # that does not fit leaves the model as it was.
        for sub_path, p in manifest["points"].items():
            try:
                sub = model.get_submodule(sub_path)
            except AttributeError:
                raise ConfigError(f"adapter '{name}' from {where} goes on {sub_path}, which this model does not have "
                                  f"({len(model.blocks)} blocks): it was trained on another base") from None
            if p["d_model"] != d:
                raise ConfigError(f"adapter '{name}' from {where} is {p['d_model']} wide; this model's hidden width "
                                  f"is {d}: it was trained on another base")
            point = getattr(sub, "adapters", None)
            if isinstance(point, AdapterPoint) and name in point:
                raise ConfigError(f"adapter '{name}' from {where}: {sub_path} already has an adapter of that name")
            state = {k[len(sub_path) + 1:]: t for k, t in tensors.items() if k.startswith(sub_path + ".")}
            try:
                a = Bottleneck(p["d_model"], p["size"], placement=p["placement"], activation=p["activation"],
                               scale=p["scale"])
                a.load_state_dict(state)
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(f"adapter '{name}' from {where}: its point {sub_path} does not match its "
                                  f"tensors or options ({exc}); save the adapter again") from None
            found.append((sub, a))
        w = model.tok_emb.weight
        for sub, a in found:
            AdapterPoint.on(sub)[name] = a.to(w.device, w.dtype)
