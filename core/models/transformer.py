"""The embedded default model: a small GPT-style decoder-only transformer, to be read in one sitting.

Pre-LayerNorm blocks (attention, then MLP, each added to the residual stream), learned absolute positions,
and an output head tied to the token embedding. Submodules have stable names (``blocks.N.attn.q``,
``blocks.N.mlp.up``...) because mechanisms insert adapters and LoRA around them by path, and every block
calls its sub-layers as modules so a plugin can wrap or replace ``block.attn`` / ``block.mlp``.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge.errors import ConfigError
from tuneforge.kernels import flash_attention
from tuneforge.models.checkpointing import Checkpointable
from tuneforge.common.options import build_options, check_range, parse_spec, suggest
from tuneforge.models.generation import Generates, plan_input, repeat_prefix
from tuneforge.models.kv_slot import check_unpacked, layer_prefixes, prepend
from tuneforge.models.protocol import Prefix

__all__ = ["ModelConfig", "PRESETS", "model_config", "Transformer", "KVCache", "Prefix"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 259  # 256 bytes + bos, eos, pad (see tokenizer.py)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 0  # 0 = 4 * d_model
    max_seq_len: int = 128
    dropout: float = 0.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if min(self.vocab_size, self.d_model, self.n_layers, self.n_heads, self.max_seq_len) < 1:
            raise ValueError("vocab_size, d_model, n_layers, n_heads and max_seq_len must be positive")
        check_range(self, "dropout", "[0, 1)")
        check_range(self, "norm_eps", "(0, inf)", " (LayerNorm's epsilon, e.g. 1e-5)")
        if self.d_ff < 0:
            raise ValueError(f"d_ff must be 0 (4 * d_model) or more, got {self.d_ff}")

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ConfigError(f"unknown model config key '{key}'{suggest(key, names)}; keys: {', '.join(names)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # ~0.8M parameters: learns the embedded world's text in about a minute on 2 CPU cores.
    "tiny": ModelConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=128),
    # ~4.8M parameters: for runs of tens of minutes, or a GPU.
    "small": ModelConfig(d_model=256, n_layers=6, n_heads=8, max_seq_len=256),
}


def model_config(spec: "str | ModelConfig | dict", **overrides) -> ModelConfig:
    """A preset by name with optional overrides: ``"tiny"``, ``"tiny:n_layers=2,d_model=64"``, a dict or a config."""
    if isinstance(spec, ModelConfig):
        base, values = spec, {}
    elif isinstance(spec, dict):
        base, values = ModelConfig(), dict(spec)
    else:
        name, values = parse_spec(spec)
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset '{name}'{suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
        base = PRESETS[name]
    values.update(overrides)
    if not values:
        return base
    return build_options(ModelConfig, {**base.to_dict(), **values}, owner=f"model '{spec}'")


def _dropout(module: nn.Module, x):
    """``module(x)`` where it can change x: an ``nn.Dropout`` is the identity in eval mode or at p = 0, and skipping
    the call there saves a module call and an op per use (nine per token in a decode step of the tiny model)."""
    return module(x) if module.training and getattr(module, "p", 1.0) > 0 else x


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; the math itself is ``tuneforge.kernels.flash_attention``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        # Separate q, k, v, o projections (not one fused qkv) so LoRA/adapters can target each by name.
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, key_padding_mask=None, cache=None, layer: int = 0, cu_seqlens=None, kv_prefix=None):
        """``kv_prefix``: this layer's extra keys and values (a ``KVPrefix`` from the model's slot), put in front of
        the keys after the cache's, never written into it."""
        B, T, C = x.shape
        H, D = self.n_heads, self.head_dim
        if T == 1:  # a decode step: (B, 1, C) already lies in memory as (B, H, 1, D), so a view does it
            split = lambda t: t.view(B, H, 1, D)  # noqa: E731
        else:
            split = lambda t: t.view(B, T, H, D).transpose(1, 2)  # noqa: E731  (B, H, T, D)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if cache is not None:  # attend to every cached key, then the new ones
            k, v = cache.append(layer, k, v)  # (B, H, L + T, D): views of the cache, read in place
        if kv_prefix is not None:  # (B, H, P + L + T, D); the causal mask is bottom-right: every query sees them
            k, v, key_padding_mask = prepend(kv_prefix, k, v, key_padding_mask)
        y = flash_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                            cu_seqlens=cu_seqlens)  # (B, H, T, D)
        # (B, T, C): heads side by side again (with T == 1 the kernel's contiguous output is that already)
        y = y.reshape(B, T, C) if T == 1 else y.transpose(1, 2).reshape(B, T, C)
        return _dropout(self.dropout, self.o(y))


class MLP(nn.Module):
    """Position-wise feed-forward: widen to ff_dim, GELU, project back. Where most parameters live."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.down = nn.Linear(cfg.ff_dim, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return _dropout(self.dropout, self.down(F.gelu(self.up(x))))  # (B, T, C)


class Block(Checkpointable, nn.Module):
    """One pre-norm layer. ``--checkpointing`` may mark it (see ``tuneforge.models.checkpointing``): its work then
    runs again in the backward instead of keeping its activations."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index  # which cache layer this block reads and writes
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, key_padding_mask=None, cache=None, cu_seqlens=None, kv_prefix=None):
        if cache is not None:  # never recomputed: a second run would append the same keys to the cache again
            return self.layers(x, key_padding_mask, cache, None, kv_prefix)
        return self.checkpointed(self.layers, x, key_padding_mask, None, cu_seqlens, kv_prefix)

    def layers(self, x, key_padding_mask=None, cache=None, cu_seqlens=None, kv_prefix=None):
        # Pre-norm: each sub-layer sees a normalised input and adds to an un-normalised residual stream,
        # which keeps gradients well-scaled without warm-up tricks at this depth.
        # cu_seqlens and kv_prefix only when given, so a plugin's attention module without them still runs the rest
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        if kv_prefix is not None:
            packed["kv_prefix"] = kv_prefix
        x = x + self.attn(self.ln1(x), key_padding_mask=key_padding_mask, cache=cache, layer=self.index, **packed)
        x = x + self.mlp(self.ln2(x))
        return x  # (B, T, C)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to ``max_len``.

    Generation then costs one new token's work per step instead of recomputing the whole prefix. Each
    attention layer appends its new keys/values during a forward; ``Transformer.forward_hidden`` calls
    ``advance()`` once all layers have, so ``length`` counts the tokens every layer holds (padding included).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_heads, max_len, cfg.d_model // cfg.n_heads)  # (B, H, L_max, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0  # tokens cached (a prefix included); advanced by advance() once every layer has appended
        self.prefix: Prefix | None = None  # the prefix cached with the first tokens, if the model has one
        self.prefix_layout = None  # what that prefix adds to each later call (see generation.plan_input)
        self._pending = 0

    def append(self, layer: int, k, v):
        """Write the T new keys/values (B, H, T, D) of ``layer`` after the cached ones; return views of the filled
        part, (B, H, L + T, D), which attention reads in place (strided: the rows run to ``max_len``)."""
        T, start = k.size(2), self.length
        end = start + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested: make it with "
                             f"new_cache(batch_size, max_len) of at least {end}")
        keys, values = self.k[layer], self.v[layer]
        keys.narrow(2, start, T).copy_(k)  # in place: the cache never moves or grows
        values.narrow(2, start, T).copy_(v)
        self._pending = T
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)  # (B, H, L + T, D)

    def advance(self) -> None:
        self.length += self._pending
        self._pending = 0

    def repeat_rows(self, times: int) -> "KVCache":
        """Make each row ``times`` rows, in place: row i becomes rows i * times .. i * times + times - 1 (prompt-major,
        as ``repeat_interleave``), each holding row i's cached keys/values and prefix. ``generate(num_samples=)`` runs
        each prompt through the model once and then this, instead of once per sample. Copies only the filled slots
        (the rest are written before attention reads them); returns the cache."""
        if self._pending:
            raise RuntimeError("repeat_rows during a forward: some layers have appended tokens the others have not")
        L = self.length
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                B, H, M, D = old.shape  # (B, H, L_max, D)
                new = old.new_empty(B * times, H, M, D)
                # (B, times, H, L, D): each prompt's filled slots written to its `times` rows, no intermediate copy
                new.view(B, times, H, M, D)[:, :, :, :L].copy_(old[:, None, :, :L].expand(B, times, H, L, D))
                store[i] = new
        self.prefix, self.prefix_layout = repeat_prefix(self.prefix, self.prefix_layout, times)
        return self


class Transformer(Generates, nn.Module):
    """tokens (B, T) -> embeddings + positions -> n_layers Blocks -> final LayerNorm -> logits (B, T, V).

    ``forward_hidden`` stops before the output head (classification heads read it); ``forward`` adds the head.

    ``prefix`` is an empty slot for a module that prepends embeddings to every input (prompt tuning puts its
    soft prompts there): called as ``prefix(batch_size)`` it returns a :class:`Prefix` or ``None``. The model
    gives the prefix positions 0..K-1 and shifts the input's positions after it, extends the padding mask over it,
    keeps it in the KV cache, and strips it from the output, so callers see (B, T, ...) as without one.

    ``kv_prefix`` is an empty slot for a module that gives attention extra keys and values (prefix tuning): called
    as ``kv_prefix(layer, batch_size)`` for every block it returns a :class:`KVPrefix` (B or 1, H, P, D) or
    ``None``; ``kv_shape`` is (H, D). Each attention call puts them in front of its keys (after the cache's, never
    cached), every query sees them, and no position is given to them (see ``tuneforge.models.protocol``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.prefix: nn.Module | None = None
        self.kv_prefix: nn.Module | None = None
        self.kv_shape = (cfg.n_heads, cfg.d_model // cfg.n_heads)  # (H, D) of every layer's keys and values
        if cfg.tie_embeddings:
            # One matrix to read tokens in and write them out: fewer parameters, and better small models.
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init)
        # Residual projections scaled down so the residual stream's variance does not grow with depth.
        for block in self.blocks:
            for proj in (block.attn.o, block.mlp.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        w = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, w.device, w.dtype)

    def forward_hidden(self, idx, *, key_padding_mask=None, positions=None, cache=None, cu_seqlens=None):
        """Final-normed hidden states (B, T, C) of token ids ``idx`` (B, T).

        past = the tokens of this input already in ``cache`` (0 without a cache), padding included; a prefix the
            model prepended is not counted (callers never see it).
        key_padding_mask: bool (B, past + T), True = real token; with a cache it covers the cached tokens too.
        positions: (B, T) position ids; default past + 0..T-1 for every row. Left-padded batches pass their
            own (``generate`` uses cumsum(mask) - 1, so each row's first real token is position 0). With a prefix,
            each row's positions are shifted by its real prefix tokens.
        cache: a ``KVCache`` from ``new_cache``; this call appends the T new tokens (and the prefix, first) to it.
        cu_seqlens: packed rows, int (S + 1,) or (B, S + 1) document offsets (``tuneforge.models.packing``):
            attention stays within each document, positions default to restarting at 0 per document. Not with a
            cache, a prefix or extra keys from ``kv_prefix`` (ValueError).
        """
        plan = plan_input(self, idx, key_padding_mask, positions, cache, cu_seqlens)
        extras = layer_prefixes(self, idx.size(0))  # (B, H, P, D) keys and values per block, or None
        if extras is not None:
            check_unpacked(cu_seqlens)
        pre, K, key_padding_mask, positions = plan.prefix, plan.length, plan.key_padding_mask, plan.positions
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (B, T, C)
        if plan.fresh:
            x = torch.cat([pre.emb.to(x.dtype) + self.pos_emb(pre.positions()), x], dim=1)  # (B, K + T, C)
        x = _dropout(self.drop, x)
        for i, block in enumerate(self.blocks):
            extra = {} if extras is None or extras[i] is None else {"kv_prefix": extras[i]}
            x = block(x, key_padding_mask=key_padding_mask, cache=cache, cu_seqlens=plan.cu_seqlens, **extra)
        if cache is not None:
            cache.advance()
        if plan.fresh:
            x = x[:, K:]  # (B, T, C): the caller's tokens only
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx, **kwargs):
        """Next-token logits (B, T, V); keyword arguments as in :meth:`forward_hidden`."""
        return self.lm_head(self.forward_hidden(idx, **kwargs))
