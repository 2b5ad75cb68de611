"""Architecture families: where a model keeps its blocks, sub-layers and linear layers.

Adapters go on a block's attention and MLP sub-layers and LoRA beside its linear layers, but each family names
them its own way: the embedded model's ``blocks.0.attn.q`` is GPT-2's fused ``transformer.h.0.attn.c_attn`` and
Llama's ``model.layers.0.self_attn.q_proj``. A :class:`Family` maps the role names users write (``attn``,
``mlp``; LoRA's ``q``, ``v``, ``attn``, ``all``...) onto those paths, so ``lora:targets=q,v`` or
``adapter:positions=attn,mlp`` mean the same thing on every model. Anything that is not a role name is used as
written (a sub-layer's name, or a module path pattern such as ``self_attn.q_proj`` or ``mlp.*``), which is how a
user overrides the table or reaches a family it does not know.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

__all__ = ["Family", "EMBEDDED", "GPT2", "LLAMA", "FAMILIES", "family_of", "family_for", "expand_targets"]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    blocks: str  # module path of the ModuleList of blocks
    positions: dict  # adapter role -> the sub-layer's name inside a block
    aliases: dict  # LoRA role -> module path patterns inside a block
    fan_in_fan_out: bool = False  # PEFT's flag: the original layers store weights as (in, out) (GPT-2's Conv1D)

    def sublayer(self, position: str) -> str:
        """The sub-layer a block keeps at ``position`` (a role, or a name used as written)."""
        return self.positions.get(position, position)


_EMBEDDED_LINEARS = {"q": ["attn.q"], "k": ["attn.k"], "v": ["attn.v"], "o": ["attn.o"],
                     "up": ["mlp.up"], "down": ["mlp.down"]}
EMBEDDED = Family(
    "tuneforge", "blocks", {"attn": "attn", "mlp": "mlp"},
    {**_EMBEDDED_LINEARS, "attn": ["attn.q", "attn.k", "attn.v", "attn.o"], "mlp": ["mlp.up", "mlp.down"],
     "all": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]},
)
# GPT-2 projects q, k and v with one fused layer, so q, k and v all name it (PEFT's default GPT-2 target).
GPT2 = Family(
    "gpt2", "transformer.h", {"attn": "attn", "mlp": "mlp"},
    {"q": ["attn.c_attn"], "k": ["attn.c_attn"], "v": ["attn.c_attn"], "o": ["attn.c_proj"],
     "up": ["mlp.c_fc"], "down": ["mlp.c_proj"], "attn": ["attn.c_attn", "attn.c_proj"],
     "mlp": ["mlp.c_fc", "mlp.c_proj"], "all": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]},
    fan_in_fan_out=True,
)
_LLAMA_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
_LLAMA_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# Llama, Mistral, Qwen2/3 and their kin share these names.
LLAMA = Family(
    "llama", "model.layers", {"attn": "self_attn", "mlp": "mlp"},
    {"q": [_LLAMA_ATTN[0]], "k": [_LLAMA_ATTN[1]], "v": [_LLAMA_ATTN[2]], "o": [_LLAMA_ATTN[3]],
     "gate": [_LLAMA_MLP[0]], "up": [_LLAMA_MLP[1]], "down": [_LLAMA_MLP[2]],
     "attn": _LLAMA_ATTN, "mlp": _LLAMA_MLP, "all": _LLAMA_ATTN + _LLAMA_MLP},
)

#: transformers ``model_type`` -> family
FAMILIES = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA}


def family_for(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def family_of(model: nn.Module) -> Family:
    """The family of a tuneforge model (the embedded ``Transformer`` or a Hugging Face model it wraps)."""
    return getattr(model, "family", None) or EMBEDDED


def expand_targets(targets: list[str], family: Family = EMBEDDED) -> list[str]:
    """LoRA ``targets`` with role names replaced by the family's module path patterns, in order, once each."""
    out: list[str] = []
    for t in targets:
        for p in family.aliases.get(t, [t]):
            if p not in out:
                out.append(p)
    return out
