"""``lora``: low-rank updates ``(alpha / rank) * B A`` beside chosen linear layers of a frozen model.

``targets=`` picks layers by role (``q,v``; ``attn`` = q,k,v,o; ``mlp`` = the MLP's layers; ``all``), which each
architecture family maps onto its own layers (:mod:`tuneforge.models.families`: GPT-2's fused ``c_attn`` for q/k/v,
Llama's ``q_proj``...), or by module path pattern (``self_attn.q_proj``, ``attn.*``); ``layers=`` the blocks. Several named LoRAs live on one model (``tasks=a,b`` trains
them side by side on mixed data; ``load=`` brings saved ones, PEFT folders included); rows of a batch choose
theirs with :func:`tuneforge.models.routing.rows`. Each LoRA is saved as ``lora/<name>/`` in every checkpoint, and
:func:`tuneforge.plugins.lora.peft.export_peft` writes PEFT's layout. :func:`tuneforge.plugins.lora.layer.merge` folds one into the
weights for serving.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tuneforge.sdk import (ConfigError, PartMechanism, PartOptions, expand_targets, family_of, match_linears,
    parse_layers, part_generator)

from .layer import POINT_FIELDS, LoRALinear, lora_layers, lora_state, merge, unmerge
from .peft import export_peft, is_peft, read_peft

__all__ = ["Lora", "add_lora", "load_lora", "install_lora"]


def _set_module(model, path: str, module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


class Lora(PartMechanism):
    """Low-rank adapters beside chosen linear layers; the base model stays frozen (see the module docstring)."""

    mechanism = "lora"
    subdir = "lora"
    point_fields = POINT_FIELDS

    # A LoRA is a change of weights, so a model holding one is still a plain causal LM: export-hf
    # (tuneforge.tools.hf_export) folds the parts of this module kind in, naming them fold_noun in its messages.
    fold_kind = LoRALinear.kind
    fold_noun = "LoRA"
    fold_into_base = staticmethod(merge)  # (model, names or None = all) -> names folded
    unfold_from_base = staticmethod(unmerge)
    # `tuneforge export-peft` writes PEFT's LoRA layout with this (tuneforge.tools.cli finds it by the attribute)
    export_peft = staticmethod(export_peft)

    @dataclasses.dataclass
    class Options(PartOptions):
        targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])  # module path patterns
        rank: int = 8  # r: the update's rank
        alpha: float = 16.0  # the update is scaled by alpha / rank
        dropout: float = 0.0  # dropout on the update's input while training

        def __post_init__(self):
            super().__post_init__()
            if self.rank < 1:
                raise ValueError(f"rank must be at least 1, got {self.rank}")
            if not 0 <= self.dropout < 1:
                raise ValueError(f"dropout must be within [0, 1), got {self.dropout}")
            if not self.targets:
                raise ValueError("targets must name at least one layer, e.g. targets=q,v")

    def part_modules(self, model):
        return [m for _, m in lora_layers(model)]

    def create(self, model, run, name):
        o = self.options
        add_lora(model, name, targets=o.targets, rank=o.rank, alpha=o.alpha, dropout=o.dropout, layers=o.layers,
                 seed=run.seed)

    def export(self, model, name):
        return lora_state(model, name)

    def install(self, model, name, manifest, tensors, where):
        install_lora(model, name, manifest["points"], tensors, where)

    def read_foreign(self, path: Path):
        if not is_peft(path):
            return None
        name, points, tensors = read_peft(path)
        manifest = {"name": name, "points": points, "mechanism": "lora"}
        return [(name, manifest, tensors, path)]


def add_lora(model, name: str = "default", *, targets=("q", "v"), rank: int = 8, alpha: float = 16.0,
             dropout: float = 0.0, layers=("all",), seed: int = 0) -> list[str]:
    """Add a new LoRA ``name`` (B = 0: the model's output is unchanged) to the linear layers ``targets`` of the
    blocks ``layers``; returns the adapted module paths. Options as for ``lora:`` runs."""
    found = match_linears(model, expand_targets(list(targets), family_of(model)),
                          parse_layers(list(layers), len(model.blocks), owner="lora"), owner="lora")
    g = part_generator(seed, name)
    for path, linear in found:
        wrapped = LoRALinear.wrap(linear)
        if wrapped is not linear:
            _set_module(model, path, wrapped)
        wrapped.add(name, rank, alpha, dropout, generator=g)
    return [p for p, _ in found]


def load_lora(model, *specs: str) -> list[str]:
    """Load saved LoRAs onto ``model`` (frozen): tuneforge LoRA folders, PEFT folders, checkpoint or run folders.
    Returns their names; route rows to them with :func:`tuneforge.models.routing.rows` or choose with
    :func:`tuneforge.parts.modules.set_active`."""
    return Lora.load_frozen(model, *specs)


def install_lora(model, name: str, points: dict, tensors: dict[str, torch.Tensor], where) -> None:
    """Add LoRA ``name`` (its points: path -> in/out/rank/scaling) to ``model``; every point is checked first."""
    found = []
    for path, p in points.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"lora '{name}' from {where} goes on {path}, which this model does not have "
                              f"({len(model.blocks)} blocks): it was trained on another base") from None
        if not isinstance(module, torch.nn.Linear):
            raise ConfigError(f"lora '{name}' from {where}: {path} is a {type(module).__name__} here, not a linear "
                              "layer: it was trained on another base")
        if (module.in_features, module.out_features) != (p["in"], p["out"]):
            raise ConfigError(f"lora '{name}' from {where}: {path} is {module.in_features} -> {module.out_features} "
                              f"here, but {p['in']} -> {p['out']} in the model it was trained on")
        a, b = tensors.get(f"{path}.lora_a"), tensors.get(f"{path}.lora_b")
        if a is None or b is None:
            raise ConfigError(f"lora '{name}' from {where}: the tensors of {path} are missing")
        r = p.get("rank", a.size(0) if a.dim() == 2 else 0)
        if tuple(a.shape) != (r, p["in"]) or tuple(b.shape) != (p["out"], r):
            raise ConfigError(f"lora '{name}' from {where}: {path} has tensors A {tuple(a.shape)}, B "
                              f"{tuple(b.shape)}; its point says rank {r}, {p['in']} -> {p['out']} (A: (rank, in), "
                              "B: (out, rank)): save the LoRA again")
        dropout = p.get("dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(f"lora '{name}' from {where}: {path} has dropout {dropout!r}; it must be a number "
                              "within [0, 1)")
        if isinstance(module, LoRALinear) and name in module.lora_a:
            raise ConfigError(f"lora '{name}' from {where}: {path} already has a LoRA of that name")
        found.append((path, module, a, b, p))
    for path, module, a, b, p in found:
        wrapped = LoRALinear.wrap(module)
        if wrapped is not module:
            _set_module(model, path, wrapped)
        wrapped.add(name, a.size(0), 0.0, float(p.get("dropout", 0.0)), a=a, b=b, scaling=float(p["scaling"]))
