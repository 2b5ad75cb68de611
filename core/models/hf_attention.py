"""tuneforge's fused attention op as a Hugging Face transformers attention implementation.

Why: transformers models pick their attention kernel by name (``attn_implementation="sdpa"``, ``"eager"``, ...)
through ``transformers.AttentionInterface``. Registering tuneforge's ``flash_attention`` there under the name
``"tuneforge"`` lets any HF model that follows that interface (Llama, Qwen2, GPT-2, ...) run on tuneforge's kernel,
training and KV-cache generation alike, without touching the model code::

    from tuneforge.models import hf_attention
    hf_attention.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=hf_attention.attention_implementation_name)
    # or, on a model already built: model.set_attn_implementation("tuneforge")

The fused op knows two masks: causal (bottom-right aligned, so queries after a KV cache see every cached key) and a
per-key padding mask. So the registered *mask* function hands the attention function just that: the 2-D padding
mask (B, Tk), bool, True = real token, or None when nothing is padded. It is transformers' own flash-attention mask
function, which builds exactly this, used only for the plain causal / bidirectional patterns; any other pattern
(packed sequences, sliding windows, image-token overlays) is materialised as transformers' 4-D bool sdpa mask, which
the attention function recognises and hands on (below).

Fallbacks. The fused op cannot do everything a model may ask for. These cases run transformers' own
``sdpa_attention_forward`` instead (or the model's own eager attention where sdpa cannot), warning once per reason:

* attention dropout (``module.training`` and ``dropout > 0``): the kernel has no dropout;
* a 4-D mask, bool or float/additive, from a caller or from a mask pattern beyond causal + padding;
* ``sliding_window`` or ``position_bias`` passed by the model: masks/biases the kernel cannot express;
* ``softcap`` or ``output_attentions``: sdpa cannot do them either, so these use the model's eager attention
  (the module-level ``eager_attention_forward`` of the model's file), which also returns the attention weights.

Outputs of the fused path match eager attention on every real (non-padding) query; a query that sees no key at all
(a left-padding position) gets zeros, where eager gets an average of the values: no real token ever reads it.

Packed rows. ``HFCausalLM.forward_hidden(cu_seqlens=...)`` hands the documents' offsets to every attention call
through transformers' ``**kwargs`` as :data:`PACKED_KWARG` (a :class:`PackedRows`); :func:`attention` gives them to
the kernel, or, on a fallback, turns them into a block-diagonal 4-D mask combined with the other masks. Each call
counts itself on the ``PackedRows``, so a model whose layers do not forward the kwargs is caught, not run unpacked.

Extra keys and values. The model's ``kv_prefix`` slot (:mod:`tuneforge.models.kv_slot`) travels the same way, as
:data:`KV_PREFIX_KWARG` (an :class:`ExtraKeys` holding every layer's :class:`~tuneforge.models.protocol.KVPrefix`):
:func:`attention` picks the one of ``module.layer_idx`` and puts it in front of the keys and values, after the
cache's (a static cache's empty slots dropped first), with the masks widened to match: True columns in a padding
mask or a 4-D bool one, zeros in an additive one. The fallbacks get the widened keys and masks, so they honour it.

This module imports without transformers; only :func:`register` (and the functions it registers) need it.
"""
from __future__ import annotations

import dataclasses
import sys
import warnings

import torch

from tuneforge.errors import ConfigError
from tuneforge.kernels import flash_attention
from tuneforge.models.kv_slot import check_unpacked, prepend
from tuneforge.models.packing import document_mask

__all__ = ["attention_implementation_name", "register", "attention", "padding_mask", "PACKED_KWARG", "PackedRows",
           "KV_PREFIX_KWARG", "ExtraKeys", "carried", "check_reached", "kv_shape"]

#: the ``attn_implementation`` name that :func:`register` makes available
attention_implementation_name = "tuneforge"

#: the keyword the packed documents travel under, from the model's forward to :func:`attention`. Not transformers'
#: own ``cu_seq_lens_q``: that is flash-attention's varlen layout (one flattened row, batch 1), which some model code
#: reads itself (linear-attention and state-space layers); our offsets are per row, (S + 1,) or (B, S + 1).
PACKED_KWARG = "tuneforge_packed_rows"


@dataclasses.dataclass
class PackedRows:
    """Packed documents on their way to the attention layers (the value of :data:`PACKED_KWARG`)."""

    cu_seqlens: torch.Tensor  # (S + 1,) or (B, S + 1) int offsets, as tuneforge.kernels.flash_attention takes them
    calls: int = 0  # attention calls that applied them: the model checks that every layer's did


#: the keyword the model's extra keys and values travel under, from its forward to :func:`attention`
KV_PREFIX_KWARG = "tuneforge_kv_prefix"


@dataclasses.dataclass
class ExtraKeys:
    """Every layer's extra keys and values on their way to attention (the value of :data:`KV_PREFIX_KWARG`)."""

    layers: list  # one KVPrefix or None per layer, indexed by the attention module's layer_idx
    calls: int = 0  # attention calls that saw them: the model checks that every layer's did

    def take(self, module):
        """The extras of ``module``'s layer (None: none there); counts the call."""
        index = getattr(module, "layer_idx", None)
        if not isinstance(index, int) or not 0 <= index < len(self.layers):
            raise ValueError(f"extra attention keys (model.kv_prefix) go to each layer by its layer_idx, and this "
                             f"{type(module).__name__} has layer_idx={index!r} (the model has {len(self.layers)} "
                             "layers); this model cannot take them")
        self.calls += 1
        return self.layers[index]

# Reasons already warned about: a fallback is usually hit by every layer on every step, one warning is enough.
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"tuneforge attention falls back to transformers' attention: {reason}", stacklevel=3)


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """The mask function registered for ``"tuneforge"`` (transformers' ``AttentionMaskInterface`` signature).

    Plain causal or bidirectional patterns: transformers' flash-attention mask, i.e. the 2-D padding mask
    (B, kv_length) bool with True = real token, or None when nothing is padded (causality itself is the kernel's
    ``causal`` flag, not a mask). Any other pattern: transformers' 4-D bool sdpa mask, which makes
    :func:`attention` fall back to sdpa rather than silently drop the pattern.
    """
    from transformers.masking_utils import (
        bidirectional_mask_function, causal_mask_function, flash_attention_mask, sdpa_mask,
    )

    if mask_function is None or mask_function in (causal_mask_function, bidirectional_mask_function):
        if attention_mask is None and mask_function is not bidirectional_mask_function:
            # A static cache's q_offset is a tensor: read it (a host sync on a GPU) only when there is no mask to
            # say how many slots are filled (tuneforge's own forward always passes one).
            filled = int(q_offset) + q_length  # cached keys so far plus the new ones
            if filled < kv_length:
                # A static cache, preallocated to kv_length: mark the slots filled so far, so that attention() drops
                # the empty ones instead of treating them as real keys.
                attention_mask = torch.ones(batch_size, filled, dtype=torch.bool, device=kwargs.get("device"))
        return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                    attention_mask=attention_mask)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, **kwargs)


def _allowed(attention_mask, q_len: int, k_len: int, causal: bool, device) -> torch.Tensor:
    """The 2-D padding mask (or None) plus causality as a 4-D bool mask (B or 1, 1, Tq, Tk), True = may attend:
    the form transformers' sdpa and eager functions take. Causal is bottom-right aligned, like the kernel."""
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)  # (Tq, Tk)
    if causal:
        allowed = allowed.tril(diagonal=k_len - q_len)
    allowed = allowed[None, None]  # (1, 1, Tq, Tk)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, Tq, Tk)
    return allowed


def _within_documents(attention_mask, cu_seqlens, query, key) -> torch.Tensor:
    """A 4-D mask (bool: True = may attend; float: additive) narrowed to pairs inside one packed document."""
    B, T = query.size(0), query.size(-2)
    if key.size(-2) != T:
        raise ValueError(f"packed rows need as many keys as queries (no cache), got {key.size(-2)} keys for {T}")
    same = document_mask(cu_seqlens, B, T, causal=False)  # (B, 1, T, T); causality is already in the mask
    if attention_mask.dtype == torch.bool:
        return attention_mask & same
    return torch.where(same, attention_mask, torch.finfo(attention_mask.dtype).min)


def kv_shape(config) -> tuple[int, int]:
    """(H_kv, D): the key/value heads and head width of a transformers config's attention layers."""
    heads = int(config.num_attention_heads)
    return (int(getattr(config, "num_key_value_heads", None) or heads),
            int(getattr(config, "head_dim", None) or config.hidden_size // heads))


def carried(cu_seqlens=None, extras=None) -> dict:
    """The keyword arguments a model's forward hands transformers for every attention call: packed rows' offsets
    (a :class:`PackedRows`) and the ``kv_prefix`` slot's extras (an :class:`ExtraKeys`), those it has."""
    out = {}
    if cu_seqlens is not None:
        out[PACKED_KWARG] = PackedRows(cu_seqlens)
    if extras is not None:
        out[KV_PREFIX_KWARG] = ExtraKeys(extras)
    return out


def check_reached(carried: dict, layers: int, model_type: str) -> None:
    """After the forward: refuse a model whose layers did not hand the kwargs on to every attention call (ConfigError),
    which would otherwise have run without them (documents seeing each other, a prefix ignored)."""
    packed, extras = carried.get(PACKED_KWARG), carried.get(KV_PREFIX_KWARG)
    if packed is not None and packed.calls < layers:
        raise ConfigError(
            f"packed rows reached the attention of {packed.calls} of this {model_type} model's {layers} layers: its "
            "layers do not pass transformers' attention kwargs on, so documents would see each other; set "
            "packing=false for this model")
    if extras is not None and extras.calls < layers:
        raise ConfigError(
            f"extra attention keys (model.kv_prefix) reached {extras.calls} of this {model_type} model's {layers} "
            "layers: its layers do not pass transformers' attention kwargs on, so it cannot take a prefix of keys "
            "and values")


def _widened(attention_mask, extra):
    """A mask with the P columns of ``extra`` (a KVPrefix, or None) in front, in the mask's own form: 2-D or None
    (:func:`~tuneforge.models.kv_slot.prepend` does those), 4-D bool (True), 4-D additive float (0 = attend)."""
    if extra is None or attention_mask is None or attention_mask.dim() != 4:
        return attention_mask
    B, _, Tq, _ = attention_mask.shape
    own = extra.mask if extra.mask is not None else torch.ones(1, extra.length, dtype=torch.bool,
                                                                device=attention_mask.device)
    own = own[:, None, None, :].expand(max(B, own.size(0)), 1, Tq, extra.length)  # (B, 1, Tq, P)
    if attention_mask.dtype != torch.bool:  # additive: 0 where it may attend, the most negative value elsewhere
        own = torch.zeros_like(own, dtype=attention_mask.dtype).masked_fill(
            ~own, torch.finfo(attention_mask.dtype).min)
    return torch.cat([own, attention_mask.expand(own.size(0), -1, -1, -1)], dim=-1)  # (B, 1, Tq, P + Tk)


def _fallback(module, query, key, value, attention_mask, causal: bool, use_eager: bool, cu_seqlens=None, **kwargs):
    """transformers' sdpa (or the model's own eager) attention, given a mask in the form that function takes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or attention_mask.dim() == 2:
        # Our mask function gave a padding mask (or none); the 4-D mask makes causality explicit too, as eager never
        # applies it on its own and sdpa's own is_causal is top-left aligned.
        attention_mask = _allowed(attention_mask, query.size(-2), key.size(-2), causal, query.device)
    if cu_seqlens is not None:  # packed rows: never dropped, whichever attention runs
        attention_mask = _within_documents(attention_mask, cu_seqlens, query, key)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if not use_eager or eager is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=causal, **kwargs)
    if attention_mask.dtype == torch.bool:  # eager adds the mask to the scores: 0 = attend, most negative = not
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, **kwargs)


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The attention function registered as ``"tuneforge"`` (transformers' ``AttentionInterface`` contract).

    query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query attention);
    attention_mask: what :func:`padding_mask` built, (B, Tk') bool or None, or a caller's 4-D mask.
    Returns ``(output (B, Tq, H, D) contiguous, None)``; no attention weights, like sdpa. Packed rows come as
    ``kwargs[PACKED_KWARG]`` (see the module docstring).
    """
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packed = kwargs.pop(PACKED_KWARG, None)
    extras = kwargs.pop(KV_PREFIX_KWARG, None)
    cu_seqlens = None
    if packed is not None:
        packed.calls += 1
        cu_seqlens = packed.cu_seqlens
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.size(-1) < key.size(-2):
        # A static cache's keys run to its full length; the padding mask covers only the slots filled so far,
        # and the queries are the last of those. Drop the empty slots (as transformers' flash attention does).
        key, value = key[:, :, :attention_mask.size(-1)], value[:, :, :attention_mask.size(-1)]
    extra = extras.take(module) if extras is not None else None
    if extra is not None:  # in front of the (cached and new) keys; every query sees them (bottom-right causal)
        check_unpacked(cu_seqlens)
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = _widened(attention_mask, extra)
            key, value, _ = prepend(extra, key, value)
        else:
            key, value, attention_mask = prepend(extra, key, value, attention_mask)

    reason = None
    if kwargs.get("softcap") is not None:
        reason, use_eager = "softcap (logit soft-capping) is not supported by the fused kernel", True
    elif kwargs.get("output_attentions") or getattr(getattr(module, "config", None), "output_attentions", False):
        reason, use_eager = "output_attentions needs the attention weights, which the fused kernel never forms", True
    elif module.training and dropout > 0:
        reason, use_eager = "attention dropout in training is not supported by the fused kernel", False
    elif attention_mask is not None and attention_mask.dim() != 2:
        reason, use_eager = ("a 4-D attention mask (a caller's own, or a pattern beyond causal + padding such as "
                             "packed sequences) cannot be expressed as the kernel's padding mask"), False
    elif kwargs.get("sliding_window") is not None:
        reason, use_eager = "sliding-window attention is not supported by the fused kernel", False
    elif kwargs.get("position_bias") is not None:
        reason, use_eager = "an additive position_bias is not supported by the fused kernel", False
    if reason is not None:
        _warn_once(reason)
        return _fallback(module, query, key, value, attention_mask, is_causal, use_eager, cu_seqlens=cu_seqlens,
                         dropout=dropout, scaling=scaling, **kwargs)

    # Grouped-query attention goes to the kernel as it is: key/value keep their Hkv heads (key head j serves query
    # heads j*n .. j*n + n - 1 with n = H // Hkv, as in HF), and a cache's keys are read where they lie, never
    # repeated into H heads (a copy of the whole cache per layer and step).
    mask = None if attention_mask is None else \
        attention_mask if attention_mask.dtype == torch.bool else attention_mask.bool()  # (B, Tk)
    out = flash_attention(query, key, value, causal=bool(is_causal), scale=scaling, key_padding_mask=mask,
                          cu_seqlens=cu_seqlens)  # (B, H, Tq, D)
    # free on the CPU kernel, whose output already lies token-major in memory; so o_proj's saved input is the very
    # storage the attention's backward keeps
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)


def register() -> None:
    """Make ``attn_implementation="tuneforge"`` available to every transformers model. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # Both registries are class-level mappings; registering the same function again just overwrites the entry.
    AttentionInterface.register(attention_implementation_name, attention)
    AttentionMaskInterface.register(attention_implementation_name, padding_mask)
