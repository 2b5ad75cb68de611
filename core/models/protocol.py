"""The model interface every mechanism relies on, as a :class:`typing.Protocol`.

The embedded :class:`tuneforge.models.transformer.Transformer` and the Hugging Face wrapper
(:class:`tuneforge.models.hf.HFModel`) both satisfy :class:`LanguageModel`; a mechanism that uses only these
names works on both, and on any model a later issue adds. Plugins never see transformers' own classes.

Where each name lives on a Hugging Face model (GPT-2's ``transformer.h``, Llama's ``model.layers``...) is in
``docs/hf.md``; how adapters and LoRA find their insertion points is :mod:`tuneforge.models.families`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["LanguageModel", "ModelConfig", "Tokenizer", "Prefix", "KVPrefix", "prefix_length"]


@runtime_checkable
class ModelConfig(Protocol):
    """The sizes every mechanism may read: ``model.config``."""

    vocab_size: int
    d_model: int  # width of the residual stream, C
    n_layers: int  # len(model.blocks)
    max_seq_len: int  # the context, soft-prompt tokens included

    def to_dict(self) -> dict: ...


@runtime_checkable
class Tokenizer(Protocol):
    """``model.tokenizer``: text <-> ids, with the special tokens the objectives lay rows out with."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


@runtime_checkable
class LanguageModel(Protocol):
    """A causal language model as tuneforge's mechanisms see it.

    ``blocks`` hold the layers (adapters and LoRA go inside them), ``tok_emb`` the input embeddings, ``ln_f`` the
    final norm and ``lm_head`` the output layer (``finetune:head=classify`` and ``reward-model`` replace it).
    ``prefix`` is a slot for a module that returns a :class:`Prefix` (soft prompts) or ``None``; its ``max_length``
    (an int attribute or property) is the most positions it prepends, which objectives keep free in the context
    (:func:`prefix_length`).

    ``kv_prefix`` is a slot for a module that gives attention extra keys and values (prefix tuning, memory tokens):
    called as ``kv_prefix(layer, batch_size)`` once per layer and forward, it returns a :class:`KVPrefix` for that
    layer, or ``None`` (nothing extra there). Every attention call of the layer puts them in front of its keys and
    values: after a KV cache's (never stored in it, so a cached decode step sees them again), visible to every
    query (the causal mask is bottom-right aligned) and used as given (no position, no rotary embedding is applied
    to them); the tokens' positions do not change. ``kv_shape`` is (H_kv, D), the key/value heads and head width of
    every layer, which the keys and values must have. Refused (ValueError) with packed rows (``cu_seqlens``); a
    Hugging Face model needs tuneforge's attention (``attn=tuneforge``, the default; ConfigError otherwise).
    """

    config: ModelConfig
    tokenizer: Tokenizer
    blocks: nn.ModuleList
    tok_emb: nn.Embedding
    ln_f: nn.Module
    lm_head: nn.Module
    prefix: nn.Module | None
    kv_prefix: nn.Module | None
    kv_shape: tuple[int, int]  # (H_kv, D): key/value heads and head width of every attention layer

    def forward_hidden(self, idx: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None, cache: Any = None,
                       cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after ``ln_f``, (B, T, C), for ids (B, T); the prefix's K positions are not returned.

        ``cu_seqlens``: packed rows, several documents back to back in each row, as int (S + 1,) offsets shared by
        every row or (B, S + 1) per row (:mod:`tuneforge.models.packing`). Each document then gives the hidden
        states it would alone: attention never crosses a boundary, positions restart at 0 per document (unless
        ``positions`` says otherwise), and positions past the last offset are padding. Refused (ValueError) with a
        ``cache``, a soft-prompt ``prefix`` or extra keys from ``kv_prefix``.
        """
        ...

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (B, T, V): ``lm_head(forward_hidden(idx, **kwargs))``."""
        ...

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Any:
        """An empty key/value cache for ``generate`` and incremental ``forward_hidden`` calls."""
        ...

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor: ...


@dataclasses.dataclass
class Prefix:
    """Embeddings a module prepends to every row's input (soft prompts); see ``Transformer.prefix``.

    Rows may carry prompts of different lengths: each row's prompt is right-aligned in the K columns (left
    padding), ``mask`` marks its real columns, and the row's own tokens then start at position ``count``.
    """

    emb: torch.Tensor  # (B, K, C)
    mask: torch.Tensor | None = None  # (B, K) bool, True = a real prompt token; None = every column is real

    @property
    def length(self) -> int:
        return self.emb.size(1)

    def count(self) -> torch.Tensor | int:
        """Real prompt tokens per row, (B,), or K for every row when there is no padding."""
        return self.length if self.mask is None else self.mask.sum(-1)

    def positions(self) -> torch.Tensor:
        """(B, K) or (K,) positions of the prompt tokens: each row's first real one is position 0."""
        if self.mask is None:
            return torch.arange(self.length, device=self.emb.device)
        return (self.mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclasses.dataclass
class KVPrefix:
    """Extra keys and values for one attention layer, what ``model.kv_prefix(layer, batch_size)`` returns.

    P extra positions, in front of the layer's own keys: each head's keys (H_kv of them, grouped-query models have
    fewer than query heads) and values. A batch dimension of 1 serves every row. ``mask`` marks the real columns
    when rows have different extras (a row routed to no prefix: all False); None = every column is real.
    """

    keys: torch.Tensor  # (B or 1, H_kv, P, D)
    values: torch.Tensor  # (B or 1, H_kv, P, D)
    mask: torch.Tensor | None = None  # (B or 1, P) bool, True = a real column

    @property
    def length(self) -> int:
        return self.keys.size(2)


def prefix_length(model) -> int:
    """Context positions ``model.prefix`` may take before a row's own tokens (0 without a prefix module, or for one
    that does not say: ``max_length``)."""
    prefix = getattr(model, "prefix", None)
    return int(getattr(prefix, "max_length", 0) or 0) if prefix is not None else 0
