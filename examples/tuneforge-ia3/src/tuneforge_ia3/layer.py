"""The IA³ layer: a linear layer whose output or input is rescaled element-wise by learned vectors.

:class:`IA3Linear` takes the place of an ``nn.Linear`` and keeps that layer's very ``weight`` and ``bias``
parameters, so their names in the state dict do not change (``blocks.0.attn.k.weight`` stays what it was, and a
Hugging Face model's frozen weights are still recognised as its folder's). It adds one vector per role, named
after it: ``blocks.0.attn.k.ia3.k`` (C,), ``blocks.0.mlp.down.ia3.mlp`` (ff,).

- ``side="out"`` (keys, values): ``y = (W x + b) * l``. A fused projection (GPT-2's ``c_attn``, whose output is
  q, k and v side by side) holds ``k`` and ``v`` vectors that cover only their thirds of the output; the query
  third is multiplied by exactly 1.
- ``side="in"`` (the MLP's down projection): ``y = W (x * l) + b``, i.e. the activation between the MLP's two
  projections is rescaled, as in the paper.

Vectors start at ones, and ``t * 1.0 == t`` in floating point, so a new layer computes bit-for-bit what the
plain layer did. Both forms fold into the weight (:meth:`IA3Linear.merged`): rows of ``W`` (and ``b``) for
``out``, columns of ``W`` for ``in``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge.sdk import ConfigError, routing

__all__ = ["IA3Linear", "SIDES"]

SIDES = ("out", "in")


class IA3Linear(nn.Module):
    """A linear layer with IA³ vectors on its output (``side="out"``) or input (``side="in"``); see the module
    docstring. Not an ``nn.Linear`` subclass on purpose: code that calls ``F.linear(x, m.weight, m.bias)`` on
    anything linear-looking (or wraps it, keeping only weight and bias) would silently drop the scaling."""

    def __init__(self, base: nn.Linear, side: str):
        super().__init__()
        if type(base) is not nn.Linear:
            raise TypeError(f"IA3Linear wraps a plain nn.Linear, got {type(base).__name__}")
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base layer's own parameters: same names, same tensors, still frozen
        self.bias = base.bias
        self.side = side
        self.ia3 = nn.ParameterDict()  # role -> (stop - start,)
        self.spans: dict[str, tuple[int, int]] = {}  # role -> [start, stop) of the features it scales
        self.train(base.training)

    @property
    def features(self) -> int:
        """How many features the vectors scale: the output's for ``out``, the input's for ``in``."""
        return self.out_features if self.side == "out" else self.in_features

    def add(self, role: str, start: int, stop: int, init: float = 1.0) -> nn.Parameter:
        """A new vector for ``role`` over features ``[start, stop)``, every entry ``init``; returns it."""
        if role in self.ia3:
            raise ConfigError(f"this layer holds an IA³ vector for '{role}' already")
        if not 0 <= start < stop <= self.features:
            raise ConfigError(f"IA³ '{role}': features [{start}, {stop}) do not fit a layer of {self.features}")
        for other, (a, b) in self.spans.items():
            if start < b and a < stop:
                raise ConfigError(f"IA³ '{role}' [{start}, {stop}) overlaps '{other}' [{a}, {b}) on one layer")
        w = self.weight
        self.ia3[role] = nn.Parameter(torch.full((stop - start,), float(init), device=w.device, dtype=w.dtype))
        self.spans[role] = (start, stop)
        return self.ia3[role]

    def scale(self) -> torch.Tensor:
        """The whole vector ``(features,)``: each role's vector on its span, exactly 1 elsewhere."""
        n = self.features
        order = sorted(self.spans, key=lambda r: self.spans[r])
        if len(order) == 1 and self.spans[order[0]] == (0, n):  # the usual case: one vector over everything
            return self.ia3[order[0]]
        pieces, at = [], 0
        for role in order:
            start, stop = self.spans[role]
            if start > at:
                pieces.append(self.weight.new_ones(start - at))
            pieces.append(self.ia3[role])
            at = stop
        if at < n:
            pieces.append(self.weight.new_ones(n - at))
        return torch.cat(pieces)  # (features,)

    def forward(self, x):  # (..., in) -> (..., out)
        if not self.ia3 or routing.current() == ():  # inside routing.base(): the base model, no IA³
            return F.linear(x, self.weight, self.bias)
        s = self.scale()
        if self.side == "in":
            return F.linear(x * s.to(x.dtype), self.weight, self.bias)  # (..., in) * (in,): the activation
        return F.linear(x, self.weight, self.bias) * s.to(x.dtype)  # (..., out) * (out,)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes (within rounding), with new weight tensors:
        the base's stay as they were (a Hugging Face model's folder weights, say)."""
        s = self.scale().float()
        w = self.weight.float()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        if self.side == "out":
            linear.weight.copy_(w * s[:, None])  # (out, in): row i times s[i]
            if self.bias is not None:
                linear.bias.copy_(self.bias.float() * s)
        else:
            linear.weight.copy_(w * s[None, :])  # (out, in): column j times s[j]
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear.train(self.training)

    def extra_repr(self) -> str:
        roles = ", ".join(f"{r}: [{a}, {b})" for r, (a, b) in self.spans.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, side={self.side}, ia3=[{roles}]"
