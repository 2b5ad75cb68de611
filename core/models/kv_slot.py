"""The attention slot for extra keys and values (``model.kv_prefix``), shared by both model kinds.

A module in a model's ``kv_prefix`` slot (prefix tuning, memory tokens) is asked once per layer and forward,
``kv_prefix(layer, batch_size)``, for a :class:`~tuneforge.models.protocol.KVPrefix` or None. The model's forward
asks through :func:`layer_prefixes` (which checks the shapes and gives every row its own batch entry), and each
attention call puts the layer's extras in front of its keys and values with :func:`prepend`, after the KV cache's
keys (never stored in the cache) and visible to every query: the fused kernel's causal mask is bottom-right
aligned, so with Tk = P + L keys the first query already sees all P extra ones.

:func:`token_keys_values` gives the keys and values a model computes for real tokens, in the same form: what a
prefix initialised from real token activations starts from, and the reference the tests compare against.
"""
from __future__ import annotations

import torch

from tuneforge.models.protocol import KVPrefix

__all__ = ["layer_prefixes", "prepend", "token_keys_values", "check_unpacked"]


def layer_prefixes(model, batch_size: int, device=None) -> list[KVPrefix | None] | None:
    """The slot's extras for every layer (``None`` where it gives none), each with ``batch_size`` rows; None when the
    model has no slot or the slot gives nothing at all (so the forward runs exactly as without one)."""
    slot = getattr(model, "kv_prefix", None)
    if slot is None:
        return None
    heads, width = model.kv_shape
    out: list[KVPrefix | None] = []
    for layer in range(len(model.blocks)):
        extra = slot(layer, batch_size)
        if extra is not None:
            extra = _checked(extra, layer, batch_size, heads, width, type(slot).__name__)
        out.append(extra)
    return out if any(e is not None for e in out) else None


def _checked(extra, layer: int, batch_size: int, heads: int, width: int, owner: str) -> KVPrefix:
    if not isinstance(extra, KVPrefix):
        raise TypeError(f"model.kv_prefix ({owner}) returned {type(extra).__name__} for layer {layer}; it must "
                        "return a tuneforge KVPrefix(keys, values, mask=None) or None")
    k, v, mask = extra.keys, extra.values, extra.mask
    expect = f"(B or 1, {heads}, P, {width}) with B = {batch_size}"
    for name, t in (("keys", k), ("values", v)):
        if t.dim() != 4 or t.size(0) not in (1, batch_size) or t.size(1) != heads or t.size(3) != width \
                or t.size(2) != k.size(2):
            raise ValueError(f"model.kv_prefix ({owner}), layer {layer}: {name} are {tuple(t.shape)}, this model "
                             f"needs {expect} (model.kv_shape is (H_kv, D)) and keys and values of one length P")
    if mask is not None and (mask.dim() != 2 or mask.size(0) not in (1, batch_size) or mask.size(1) != k.size(2)
                             or mask.dtype != torch.bool):
        raise ValueError(f"model.kv_prefix ({owner}), layer {layer}: mask is {tuple(mask.shape)} {mask.dtype}; it "
                         f"must be bool (B or 1, P) = ({batch_size}, {k.size(2)}), True = a real column")
    expand = lambda t: t if t is None or t.size(0) == batch_size else t.expand(batch_size, *t.shape[1:])  # noqa: E731
    return KVPrefix(expand(k), expand(v), expand(mask))


def prepend(extra: KVPrefix | None, k, v, key_padding_mask=None):
    """(keys, values, padding mask) with ``extra`` in front: k, v (B, H_kv, L, D) -> (B, H_kv, P + L, D); the mask,
    bool (B, L) or None, gains the extras' P columns (True, or theirs), and stays None when every key is real."""
    if extra is None:
        return k, v, key_padding_mask
    k = torch.cat([extra.keys.to(k.dtype), k], dim=2)  # (B, H_kv, P + L, D)
    v = torch.cat([extra.values.to(v.dtype), v], dim=2)
    if key_padding_mask is not None or extra.mask is not None:
        B, P, L = k.size(0), extra.length, k.size(2) - extra.length
        own = extra.mask if extra.mask is not None else torch.ones(B, P, dtype=torch.bool, device=k.device)
        rest = key_padding_mask.bool() if key_padding_mask is not None else \
            torch.ones(B, L, dtype=torch.bool, device=k.device)
        key_padding_mask = torch.cat([own, rest], dim=1)  # (B, P + L)
    return k, v, key_padding_mask


def check_unpacked(cu_seqlens) -> None:
    """Extra keys cannot go with packed rows: the kernel's documents need as many keys as queries."""
    if cu_seqlens is not None:
        raise ValueError("packed rows (cu_seqlens) cannot be combined with extra attention keys (model.kv_prefix, "
                         "e.g. prefix tuning): set packing=false, or train without the prefix")


@torch.no_grad()
def token_keys_values(model, ids: torch.Tensor) -> list[KVPrefix]:
    """The keys and values every layer of ``model`` computes for the tokens ``ids`` (B, P), read from a KV cache after
    one forward: a list of one :class:`KVPrefix` (B, H_kv, P, D) per layer. Rotary models' keys carry the rotation of
    positions 0..P-1, so given back through ``kv_prefix`` in front of an input at positions P.., they act exactly as
    those tokens would in front of it. The model's own ``kv_prefix`` and soft prompt are not applied; dropout is off."""
    prefix, slot, training = model.prefix, model.kv_prefix, model.training
    model.prefix = model.kv_prefix = None
    try:
        cache = model.new_cache(ids.size(0), ids.size(1))
        model.eval().forward_hidden(ids, cache=cache)
    finally:
        model.prefix, model.kv_prefix = prefix, slot
        model.train(training)
    P = ids.size(1)
    out = []
    for layer in range(len(model.blocks)):
        if hasattr(cache, "kv"):  # a Hugging Face model's: transformers' cache layers, (B, H_kv, >= P, D)
            held = cache.kv.layers[layer]
            k, v = held.keys, held.values
        else:  # the embedded model's KVCache: preallocated per layer
            k, v = cache.k[layer], cache.v[layer]
        out.append(KVPrefix(k[:, :, :P].clone(), v[:, :, :P].clone()))
    return out
