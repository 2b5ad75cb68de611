"""SwiGLU MLPs of Hugging Face models (Llama, Mistral, Qwen: ``down(silu(gate(x)) * up(x))``) with the gate's
product through :func:`tuneforge.kernels.silu_mul`, which keeps two of the three (tokens, ffn) tensors autograd
would keep. Only for models loaded with tuneforge's attention (``attn=tuneforge``, the default): ``?attn=eager`` or
``sdpa`` runs transformers' own code, untouched, for comparisons.

The MLP is found by structure: a block's MLP sub-layer (:class:`tuneforge.models.families.Family`) whose family
names gate, up and down projections, with a SiLU activation. Its projections are still called as modules, so LoRA
or adapters placed on them keep working.
"""
from __future__ import annotations

import types

import torch.nn as nn

from tuneforge.kernels import silu_mul
from tuneforge.models.families import Family

__all__ = ["fuse_gated_mlps"]


def _is_silu(act) -> bool:
    # transformers' SiLUActivation is F.silu under a class of its own
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _gated_forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))  # (B, T, C)


def fuse_gated_mlps(blocks: nn.ModuleList, family: Family) -> int:
    """Route each block's SwiGLU MLP through ``silu_mul``; returns how many MLPs now do."""
    paths = [family.aliases.get(role, [None])[0] for role in ("gate", "up", "down")]
    if None in paths:  # a family without gated MLPs (GPT-2)
        return 0
    prefix = family.sublayer("mlp") + "."
    if not all(p.startswith(prefix) for p in paths):
        return 0
    names = [p[len(prefix):] for p in paths]
    if names != ["gate_proj", "up_proj", "down_proj"]:  # the one layout _gated_forward is written for
        return 0
    fused = 0
    for block in blocks:
        mlp = block.get_submodule(family.sublayer("mlp"))
        if all(isinstance(getattr(mlp, n, None), nn.Module) for n in names) and _is_silu(getattr(mlp, "act_fn", None)):
            mlp.forward = types.MethodType(_gated_forward, mlp)
            fused += 1
    return fused

