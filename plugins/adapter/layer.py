"""Bottleneck adapters: down-project, activate, up-project, added to a sub-layer's output; many named per point.

An :class:`AdapterPoint` sits on one sub-layer (a block's attention or MLP) as its child ``adapters`` and a
forward hook, so the sub-layer's own code and parameter names stay as they were. Each named
:class:`Bottleneck` in it is placed

- ``serial``: on the sub-layer's output, ``out + scale * f(out)`` (Houlsby et al.), or
- ``parallel``: beside the sub-layer, on its input, ``out + scale * f(x)`` (He et al.),

before the block adds the result to the residual stream. ``up`` starts at zero, so a new adapter is the
identity. The math runs in ``tuneforge.kernels`` (``bottleneck_adapter``; ``multi_bottleneck_adapter`` for
a mixed batch, where each row uses its own task's adapter).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge.sdk import NUMBER, WHOLE, TaskModule, kernels, one_of, task_modules

__all__ = ["Bottleneck", "AdapterPoint", "adapter_points", "PLACEMENTS", "POINT_FIELDS"]

PLACEMENTS = ("serial", "parallel")
# What each insertion point of a saved adapter says (checked when a part folder is read)
POINT_FIELDS = {"d_model": WHOLE, "size": WHOLE, "scale": NUMBER, "placement": one_of(PLACEMENTS),
                "activation": one_of(kernels.ACTIVATIONS)}


class Bottleneck(nn.Module):
    """One adapter: ``up(act(down(z)))`` with z = the sub-layer's output (serial) or input (parallel)."""

    def __init__(self, d_model: int, size: int, *, placement: Literal["serial", "parallel"] = "serial",
                 activation: str = "gelu", scale: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be serial or parallel, got {placement!r}")
        if activation not in kernels.ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(kernels.ACTIVATIONS)}, got {activation!r}")
        self.placement, self.activation, self.scale = placement, activation, float(scale)
        self.down = nn.Linear(d_model, size)  # (m, C)
        self.up = nn.Linear(size, d_model)  # (C, m)
        with torch.no_grad():
            # down like nn.Linear's default but seeded by the caller; up zero: the adapter starts as the identity
            bound = 1.0 / d_model ** 0.5
            self.down.weight.copy_((torch.rand(size, d_model, generator=generator) * 2 - 1) * bound)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    @property
    def size(self) -> int:
        return self.down.out_features

    def delta(self, z):  # (..., C) -> (..., C), scaled
        if self.scale == 1.0:
            return kernels.bottleneck_adapter(z, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                                              self.activation, residual=False)
        return self.scale * kernels.bottleneck_adapter(z, self.down.weight, self.down.bias, self.up.weight,
                                                       self.up.bias, self.activation, residual=False)

    def extra_repr(self) -> str:
        return f"placement={self.placement}, activation={self.activation}, scale={self.scale}"


class AdapterPoint(nn.ModuleDict, TaskModule):
    """The named adapters on one sub-layer; see the module docstring. Attach with :meth:`attach`."""

    kind = "adapters"

    def __init__(self):
        super().__init__()
        self.active = None

    @classmethod
    def on(cls, sublayer: nn.Module) -> "AdapterPoint":
        """The sub-layer's point, created and hooked on first use."""
        point = getattr(sublayer, "adapters", None)
        if isinstance(point, AdapterPoint):
            return point
        if point is not None:
            raise ValueError(f"{type(sublayer).__name__} already has an attribute 'adapters'")
        point = cls()
        sublayer.adapters = point
        sublayer.register_forward_hook(point._hook, with_kwargs=True)
        return point

    def task_names(self) -> list[str]:
        return list(self.keys())

    def part_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self[name].parameters())

    def _hook(self, module, args, kwargs, output):
        # the sub-layer's input: positional, or (transformers' Llama-style layers) the keyword hidden_states
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
        out = output[0] if isinstance(output, tuple) else output
        out = self.apply_to(x, out)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def apply_to(self, x, out):  # x: the sub-layer's input (B, T, C); out: its output (B, T, C)
        if not len(self):
            return out
        sel = self.selection(out.size(0), out.device)
        adapters = [self[n] for n in self.task_names()]
        if sel.per_row:
            return out + self._mixed(x, out, adapters, sel)
        for i in sel.shared:  # serial ones stack, parallel ones add up
            a = adapters[i]
            if a.placement == "serial" and a.scale == 1.0:
                out = kernels.bottleneck_adapter(out, a.down.weight, a.down.bias, a.up.weight, a.up.bias,
                                                 a.activation, residual=True)
            else:
                out = out + a.delta(out if a.placement == "serial" else x)
        return out

    def _mixed(self, x, out, adapters: list[Bottleneck], sel):
        """Each row's own adapter in one pass: weights gathered per row (bottlenecks zero-padded to the widest)."""
        used = {i for i in sel.row_ids if i >= 0}
        m = max(a.size for a in adapters)
        def pad(a):  # narrower bottlenecks padded to m (no copies in the usual case of one width)
            if a.size == m:
                return a.down.weight, a.down.bias, a.up.weight, a.up.bias
            extra = m - a.size
            return (F.pad(a.down.weight, (0, 0, 0, extra)), F.pad(a.down.bias, (0, extra)),
                    F.pad(a.up.weight, (0, extra)), a.up.bias)

        w_down, b_down, w_up, b_up = (torch.stack(t) for t in zip(*(pad(a) for a in adapters)))
        scales = torch.tensor([a.scale for a in adapters], device=out.device, dtype=out.dtype)
        placements = {adapters[i].placement for i in used}
        if placements == {"serial"}:
            z = out
        elif placements == {"parallel"}:
            z = x
        else:  # rows of serial adapters read the output, rows of parallel ones the input
            parallel = torch.tensor([a.placement == "parallel" for a in adapters], device=out.device)
            z = torch.where(parallel.index_select(0, sel.ids.clamp(min=0)).view(-1, *([1] * (out.dim() - 1))), x, out)
        delta = 0
        for act in sorted({adapters[i].activation for i in used}):  # one pass per activation (usually one)
            ids = sel.ids if len({a.activation for a in adapters}) == 1 else torch.where(
                torch.tensor([a.activation == act for a in adapters], device=out.device)
                .index_select(0, sel.ids.clamp(min=0)), sel.ids, -1)
            delta = delta + kernels.multi_bottleneck_adapter(z, w_down, b_down, w_up, b_up, scales, ids, act)
        return delta


def adapter_points(model: nn.Module) -> list[tuple[str, AdapterPoint]]:
    return [(p, m) for p, m in task_modules(model) if isinstance(m, AdapterPoint)]
