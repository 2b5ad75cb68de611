"""LoRA: a low-rank update ``scaling * B A`` beside a frozen linear layer, many named ones per layer.

:class:`LoRALinear` takes the place of an ``nn.Linear`` and keeps its very ``weight`` and ``bias`` parameters
(same names in the state dict, so base checkpoints load unchanged); each named adapter adds ``lora_a.<name>``
(r, in) and ``lora_b.<name>`` (out, r). B starts at zero, so a new adapter leaves the output unchanged.

The math runs in ``tuneforge.kernels`` (``lora_linear`` for one adapter, ``multi_lora_linear`` for a mixed
batch). :func:`merge` folds an adapter into the weight for serving at base-model speed; :func:`unmerge` takes
it out again (the same product subtracted: equal within float rounding).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge.sdk import NUMBER, WHOLE, ConfigError, TaskModule, kernels, routing, task_modules


__all__ = ["LoRALinear", "lora_layers", "lora_state", "merge", "unmerge", "POINT_FIELDS"]

# What each insertion point of a saved LoRA says (checked when a part folder is read)
POINT_FIELDS = {"in": WHOLE, "out": WHOLE, "rank": WHOLE, "scaling": NUMBER}


class LoRALinear(nn.Linear, TaskModule):
    """An ``nn.Linear`` (the same parameters) plus named low-rank adapters; see the module docstring."""

    kind = "LoRA adapters"

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's own parameters are kept, not new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_a = nn.ParameterDict()  # name -> (r, in)
        self.lora_b = nn.ParameterDict()  # name -> (out, r)
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.merged: list[str] = []  # adapters folded into weight, in merge order
        self.active = None
        self.train(base.training)

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "LoRALinear":
        return linear if isinstance(linear, LoRALinear) else cls(linear)

    # -- parts ----------------------------------------------------------------------------------------------

    def task_names(self) -> list[str]:
        return list(self.lora_a.keys())

    def part_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_a[name], self.lora_b[name]]

    def add(self, name: str, rank: int, alpha: float, dropout: float = 0.0, *,
            generator: torch.Generator | None = None, a: torch.Tensor | None = None,
            b: torch.Tensor | None = None, scaling: float | None = None) -> None:
        """Add adapter ``name``: given tensors, or A ~ U(+-1/sqrt(in)) (nn.Linear's own init) and B = 0."""
        if name in self.lora_a:
            raise ConfigError(f"a LoRA adapter named '{name}' is already on this layer")
        w = self.weight
        if a is None:
            bound = 1.0 / math.sqrt(self.in_features)
            a = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound
        if b is None:
            b = torch.zeros(self.out_features, rank)
        if tuple(a.shape) != (a.size(0), self.in_features) or tuple(b.shape) != (self.out_features, a.size(0)):
            raise ConfigError(f"LoRA tensors of shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                             f"{self.in_features} -> {self.out_features} layer (A: (r, in), B: (out, r))")
        self.lora_a[name] = nn.Parameter(a.detach().to(w.device, w.dtype).clone())
        self.lora_b[name] = nn.Parameter(b.detach().to(w.device, w.dtype).clone())
        self.scaling[name] = float(alpha / a.size(0) if scaling is None else scaling)
        self.dropout[name] = float(dropout)

    def check_active(self, active) -> None:
        off = [n for n in self.merged if active is not None and n not in active]
        if off:
            raise ConfigError(f"LoRA adapter(s) {', '.join(off)} are merged into the weights and apply to every "
                             "row; unmerge them first (tuneforge.plugins.lora.layer.unmerge(model))")

    # -- forward --------------------------------------------------------------------------------------------

    def _drop(self, x, p: float):
        return F.dropout(x, p, training=True) if self.training and p > 0 else x

    def forward(self, x):  # (..., in) -> (..., out)
        if not self.lora_a:
            return F.linear(x, self.weight, self.bias)
        if self.merged and routing.current() is not None:
            raise ConfigError(f"LoRA adapter(s) {', '.join(self.merged)} are merged into the weights, so they apply "
                             "to every row: unmerge them (tuneforge.plugins.lora.layer.unmerge(model)) before routing rows or "
                             "running the base model")
        sel = self.selection(x.size(0) if x.dim() > 1 else 1, x.device)
        names = self.task_names()
        if sel.per_row:
            return self._mixed(x, names, sel)
        used = [names[i] for i in sel.shared if names[i] not in self.merged]
        if not used:
            return F.linear(x, self.weight, self.bias)
        first, rest = used[0], used[1:]
        if self.training and self.dropout[first] > 0:  # dropout on the update's input only, not the base's
            out = F.linear(x, self.weight, self.bias)
            rest = used
        else:
            out = kernels.lora_linear(x, self.weight, self.bias, self.lora_a[first], self.lora_b[first],
                                      self.scaling[first])
        for n in rest:  # several active adapters add up
            out = out + kernels.lora_linear(self._drop(x, self.dropout[n]), None, None, self.lora_a[n],
                                            self.lora_b[n], self.scaling[n])
        return out

    def _stacked(self, names: list[str]):
        """A (A, r, in), B (A, out, r) and scalings (A,) of every adapter, lower ranks zero-padded to the largest."""
        ranks = [self.lora_a[n].size(0) for n in names]
        r = max(ranks)
        if min(ranks) == r:  # the usual case: no padding copies
            a = torch.stack([self.lora_a[n] for n in names])
            b = torch.stack([self.lora_b[n] for n in names])
        else:
            a = torch.stack([F.pad(self.lora_a[n], (0, 0, 0, r - self.lora_a[n].size(0))) for n in names])
            b = torch.stack([F.pad(self.lora_b[n], (0, r - self.lora_b[n].size(1))) for n in names])
        s = torch.tensor([self.scaling[n] for n in names], device=a.device, dtype=a.dtype)
        return a, b, s

    def _mixed(self, x, names: list[str], sel: routing.Selection):
        a, b, s = self._stacked(names)
        ps = {self.dropout[names[i]] for i in set(sel.row_ids) if i >= 0}
        if not (self.training and max(ps, default=0.0) > 0):
            return kernels.multi_lora_linear(x, self.weight, self.bias, a, b, s, sel.ids)
        # dropout on each row's update input at its own adapter's rate
        rates = torch.tensor([self.dropout[n] for n in names], device=x.device, dtype=x.dtype)
        p = rates.index_select(0, sel.ids.clamp(min=0)).view(-1, *([1] * (x.dim() - 1)))  # (N, 1, ..., 1)
        keep = (torch.rand_like(x) >= p).to(x.dtype) / (1 - p)
        return F.linear(x, self.weight, self.bias) + kernels.multi_lora_linear(x * keep, None, None, a, b, s, sel.ids)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}: r={self.lora_a[n].size(0)}" for n in self.task_names())
        return f"{super().extra_repr()}, lora=[{parts}]" + (f", merged={self.merged}" if self.merged else "")

    # -- merging --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _delta(self, name: str) -> torch.Tensor:
        a, b = self.lora_a[name], self.lora_b[name]
        return (b.float() @ a.float()) * self.scaling[name]  # (out, in), in float32 for a faithful fold

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        self.weight.copy_((self.weight.float() + self._delta(name)).to(self.weight.dtype))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        self.weight.copy_((self.weight.float() - self._delta(name)).to(self.weight.dtype))
        self.merged.remove(name)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(p, m) for p, m in task_modules(model) if isinstance(m, LoRALinear)]


def lora_state(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """LoRA ``name`` as (tensors ``<path>.lora_a`` / ``<path>.lora_b``, points: path -> in/out/rank/scaling/dropout),
    the form its files are written from."""
    tensors, points = {}, {}
    for path, m in lora_layers(model):
        if name in m.lora_a:
            tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"] = m.lora_a[name], m.lora_b[name]
            points[path] = {"in": m.in_features, "out": m.out_features, "rank": m.lora_a[name].size(0),
                            "scaling": m.scaling[name], "dropout": m.dropout[name]}
    return tensors, points


def _which(model, names) -> list[str]:
    held = sorted({n for _, m in lora_layers(model) for n in m.task_names()})
    if names is None:
        return held
    missing = [n for n in names if n not in held]
    if missing:
        raise ConfigError(f"no LoRA adapter named {', '.join(missing)}; this model holds {', '.join(held) or 'none'}")
    return list(names)


def merge(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Fold LoRA adapters (default: all) into their layers' weights; forwards then cost what the base model's
    do. Merged adapters apply to every row: routing rows or disabling them raises until :func:`unmerge`."""
    chosen = _which(model, names)
    for _, m in lora_layers(model):
        for n in chosen:
            if n in m.lora_a:
                m.merge(n)
    return chosen


def unmerge(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Take merged adapters (default: all) out of the weights again (newest first)."""
    chosen = _which(model, names)
    for _, m in lora_layers(model):
        for n in reversed(list(m.merged)):
            if n in chosen:
                m.unmerge(n)
    return chosen
