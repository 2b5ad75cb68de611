"""The module in a model's ``kv_prefix`` slot: named per-task prefixes of keys and values, one per layer.

A prefix (Li & Liang 2021) is P learned key/value pairs in front of every attention layer's own: each query of the
input may attend to them as to P tokens it never sees as input. The model keeps them out of its positions and its KV
cache (``tuneforge.sdk.LanguageModel``, ``kv_prefix``), so generation with a cache sees them at every step.

One :class:`Prefixes` holds several named prefixes (``sentiment``, ``topic``...) like tuneforge's soft prompts:
rows routed to a task (``tuneforge.sdk.routing.rows``) get that task's prefix, rows of no task none; several active
prefixes on unrouted rows are concatenated.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge.sdk import ConfigError, KVPrefix, TaskModule

__all__ = ["Prefix", "Prefixes"]


class Prefix(nn.Module):
    """One task's prefix: keys and values (L', H_kv, P, D) for the blocks ``layers`` (L' of them, in order)."""

    def __init__(self, layers: list[int], keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        if keys.shape != values.shape or keys.dim() != 4 or keys.size(0) != len(layers):
            raise ConfigError(f"prefix: keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be "
                              f"(layers = {len(layers)}, heads, tokens, head width)")
        self.layers = list(layers)
        self.keys = nn.Parameter(keys.detach().clone())  # (L', H_kv, P, D)
        self.values = nn.Parameter(values.detach().clone())
        self._row = {layer: i for i, layer in enumerate(self.layers)}

    @property
    def length(self) -> int:
        return self.keys.size(2)

    def at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) (H_kv, P, D) of block ``layer``, or None when this prefix leaves that block alone."""
        i = self._row.get(layer)
        return None if i is None else (self.keys[i], self.values[i])


class Prefixes(nn.Module, TaskModule):
    """Named :class:`Prefix` parts; as ``model.kv_prefix`` it gives each row its task's keys and values."""

    kind = "key/value prefixes"

    def __init__(self, kv_shape: tuple[int, int]):
        super().__init__()
        self.kv_shape = tuple(kv_shape)  # (H_kv, D) of the model's attention
        self.parts = nn.ModuleDict()
        self.active = None  # the prefixes of rows the caller did not route (None: the only one, if one)

    def add(self, name: str, part: Prefix) -> None:
        if tuple(part.keys.shape[1:2]) + tuple(part.keys.shape[3:]) != self.kv_shape:
            raise ConfigError(f"prefix '{name}' has keys {tuple(part.keys.shape)}; this model's attention needs "
                              f"(layers, {self.kv_shape[0]}, tokens, {self.kv_shape[1]})")
        self.parts[name] = part

    @property
    def names(self) -> list[str]:
        return list(self.parts.keys())

    def task_names(self) -> list[str]:
        return self.names

    def part_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.parts[name].parameters())

    def forward(self, layer: int, batch_size: int) -> KVPrefix | None:
        device = next(self.parameters()).device if self.parts else None
        sel = self.selection(batch_size, device)
        if not sel.per_row:  # every row the same prefixes: (1, H, P, D), which the model gives every row
            held = [kv for kv in (self.parts[self.names[i]].at(layer) for i in sel.shared) if kv is not None]
            if not held:
                return None
            return KVPrefix(torch.cat([k for k, _ in held], 1)[None], torch.cat([v for _, v in held], 1)[None])
        rows = [self.parts[self.names[i]].at(layer) if i >= 0 else None for i in sel.row_ids]
        longest = max((k.size(1) for k, _ in filter(None, rows)), default=0)
        if longest == 0:
            return None
        H, D = self.kv_shape
        ref = next(k for k, _ in filter(None, rows))
        empty = ref.new_zeros(H, 0, D)
        # each row's prefix in the first columns, the rest masked off (no positions: where a column sits is moot)
        keys = torch.stack([F.pad(r[0] if r else empty, (0, 0, 0, longest - (r[0].size(1) if r else 0))) for r in rows])
        values = torch.stack([F.pad(r[1] if r else empty, (0, 0, 0, longest - (r[1].size(1) if r else 0)))
                              for r in rows])  # (B, H, P, D)
        lengths = torch.tensor([r[0].size(1) if r else 0 for r in rows], device=ref.device)
        mask = torch.arange(longest, device=ref.device)[None, :] < lengths[:, None]  # (B, P)
        return KVPrefix(keys, values, mask)
