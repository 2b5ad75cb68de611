"""Loading the compiled kernels and giving their ops autograd and fake (meta) implementations.

``load()`` finds the ops: the ahead-of-time extension ``tuneforge._C`` when installed, else a JIT build with
ninja (cached), else nothing, with the reason kept for ``tuneforge kernels`` and said once. ``TUNEFORGE_KERNELS``
chooses: ``auto`` (default: compiled where possible), ``cpp`` (compiled or an error), ``reference`` (pure torch).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

__all__ = ["load", "status", "mode"]

_STATE: dict = {"loaded": None, "how": "", "why": ""}


def mode() -> str:
    value = os.environ.get("TUNEFORGE_KERNELS", "auto").strip().lower() or "auto"
    if value not in ("auto", "cpp", "reference"):
        raise ValueError(f"TUNEFORGE_KERNELS={value!r}: use auto, cpp or reference")
    return value


def _load_library() -> str:
    spec = importlib.util.find_spec("tuneforge._C")
    if spec is not None and spec.origin:
        torch.ops.load_library(spec.origin)
        return f"prebuilt ({spec.origin})"
    from tuneforge.kernels.build import cache_dir, jit_load

    jit_load()
    return f"JIT-compiled (cache {cache_dir()})"


def load() -> bool:
    """True when the compiled ops are usable; the first call decides (and registers autograd and fake impls)."""
    if _STATE["loaded"] is not None:
        return _STATE["loaded"]
    chosen = mode()
    if chosen == "reference":
        _STATE.update(loaded=False, why="TUNEFORGE_KERNELS=reference")
        return False
    try:
        how = _load_library()
        _register()
    except Exception as exc:  # no compiler, a failed build, an ABI mismatch: fall back and say why, once
        if chosen == "cpp":
            raise RuntimeError(f"TUNEFORGE_KERNELS=cpp, but tuneforge's kernels could not be loaded: {exc}") from exc
        reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        _STATE.update(loaded=False, why=f"compiled kernels unavailable ({reason}); attention runs torch SDPA, the "
                                        "other ops their pure-torch reference")
        warnings.warn(f"tuneforge: {_STATE['why']}", RuntimeWarning, stacklevel=3)
        return False
    _STATE.update(loaded=True, how=how)
    return True


def status() -> dict:
    load()
    return dict(_STATE)


# -- autograd and fake implementations of the compiled ops ------------------------------------------------------

def _linear_grads_fake(grad, x, weight, lora_a, lora_b, needs):
    """(dx, dweight, dbias, dA, dB) of the LoRA ops' backward: each like its input, or empty where not needed."""
    e = x.new_empty(0)
    return (x.new_empty(x.shape) if needs[0] else e,
            weight.new_empty(weight.shape) if needs[1] and weight is not None else e,
            grad.new_empty(grad.size(-1)) if needs[2] else e,
            lora_a.new_empty(lora_a.shape) if needs[3] else e,
            lora_b.new_empty(lora_b.shape) if needs[4] else e)


#: The ops given an autocast rule at registration (see the end of _register).
COMPOSED_OPS = ("lora_linear", "multi_lora_linear", "bottleneck_adapter", "multi_bottleneck_adapter")


def _register() -> None:
    lib = "tuneforge::lora_linear"

    @torch.library.register_fake(lib)
    def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scaling):
        return x.new_empty((*x.shape[:-1], lora_b.size(0)))

    @torch.library.register_fake("tuneforge::lora_linear_backward")
    def _lora_linear_backward_fake(grad, x, weight, lora_a, lora_b, scaling, needs):
        return _linear_grads_fake(grad, x, weight, lora_a, lora_b, needs)

    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, scaling = inputs
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling, ctx.has_bias = scaling, bias is not None

    def backward(ctx, grad):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:5])
        need[1] = need[1] and weight is not None
        need[2] = need[2] and ctx.has_bias
        dx, dw, db, da, dbb = torch.ops.tuneforge.lora_linear_backward(grad.contiguous(), x, weight, lora_a, lora_b,
                                                                       ctx.scaling, need)
        keep = lambda t, n: t if n else None  # noqa: E731
        return keep(dx, need[0]), keep(dw, need[1]), keep(db, need[2]), keep(da, need[3]), keep(dbb, need[4]), None

    torch.library.register_autograd(lib, backward, setup_context=setup_context)

    _register_multi_lora()
    _register_bottleneck()
    _register_attention()
    _register_multi_bottleneck()
    _register_linear_cross_entropy()
    # The CPU kernels of these ops are ATen compositions: without a rule, autocast would reach inside them and mix
    # float32 and bfloat16 matrices. With it their floating inputs are cast to bfloat16 and each op runs whole, as
    # autocast runs F.linear. (attention and linear_cross_entropy follow autocast in their Python faces.)
    for op in COMPOSED_OPS:
        for device_type in ("cpu", "cuda"):
            torch.library.register_autocast(f"tuneforge::{op}", device_type, torch.bfloat16)


def _register_linear_cross_entropy() -> None:
    lib = "tuneforge::linear_cross_entropy"

    def grads_fake(hidden, weight, bias, needs):  # an unneeded gradient is its own empty tensor (never aliased)
        return (hidden.new_empty(hidden.shape if needs[0] else 0), weight.new_empty(weight.shape if needs[1] else 0),
                weight.new_empty(weight.size(0) if needs[2] and bias is not None else 0))

    @torch.library.register_fake(lib)
    def _fake(hidden, weight, bias, target, ignore_index, label_smoothing, reduction, needs, chunk):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # the loss: float32 at least
        loss = hidden.new_empty((hidden.size(0),) if reduction == "none" else (), dtype=acc)
        return loss, *grads_fake(hidden, weight, bias, needs if reduction != "none" else [False] * 3)

    @torch.library.register_fake("tuneforge::linear_cross_entropy_backward")
    def _fake_backward(grad, hidden, weight, bias, target, ignore_index, label_smoothing, needs, chunk):
        return grads_fake(hidden, weight, bias, needs)

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, target, ignore_index, label_smoothing, reduction, needs, chunk = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # else autograd would hand the backward zeros of dW's size for output 2
        ctx.reduction, ctx.args = reduction, (ignore_index, label_smoothing)
        ctx.chunk, ctx.made = chunk, list(needs)
        if reduction == "none":  # the backward recomputes each chunk's logits with each row's upstream gradient
            ctx.save_for_backward(hidden, weight, bias, target)
        else:  # the forward made the gradients; the backward scales them
            ctx.save_for_backward(*output[1:])

    def backward(ctx, grad, *_grads_of_grads):
        wanted = list(ctx.needs_input_grad[:3])
        if grad is None:  # the loss took no part in what was differentiated
            return (None,) * 9
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            wanted[2] = wanted[2] and bias is not None
            grads = torch.ops.tuneforge.linear_cross_entropy_backward(grad.contiguous(), hidden, weight, bias, target,
                                                                      *ctx.args, wanted, ctx.chunk)
        else:
            if any(w and not m for w, m in zip(wanted, ctx.made)):
                raise RuntimeError("tuneforge::linear_cross_entropy: a gradient was asked for that the forward was "
                                   "told not to make (its `needs` flags); call it through tuneforge.kernels")
            grads = ctx.saved_tensors
            # The usual upstream gradient of a loss is exactly 1: the saved gradients are then the answer, handed on
            # as they are (autograd frees its saved copy before accumulating, so no second (V, C) buffer is made).
            # Checked in eager CPU calls only (a compiled graph's tensors have no value to read).
            if not (type(grad) is torch.Tensor and grad.device.type == "cpu" and grad.item() == 1.0):
                grads = [g * grad.to(g.dtype) for g in grads]
        return (*(g if w else None for g, w in zip(grads, wanted)), None, None, None, None, None, None)

    torch.library.register_autograd(lib, backward, setup_context=setup_context)


def _register_multi_bottleneck() -> None:
    lib = "tuneforge::multi_bottleneck_adapter"

    @torch.library.register_fake(lib)
    def _fake(h, w_down, b_down, w_up, b_up, scales, adapter_ids, activation):
        return h.new_empty(h.shape), h.new_empty((*h.shape[:-1], w_down.size(1)))

    @torch.library.register_fake("tuneforge::multi_bottleneck_adapter_backward")
    def _fake_backward(grad, h, z, w_down, w_up, scales, adapter_ids, activation):
        return (h.new_empty(h.shape), w_down.new_empty(w_down.shape), w_down.new_empty(w_down.shape[:2]),
                w_up.new_empty(w_up.shape), w_up.new_empty(w_up.shape[:2]))

    def setup_context(ctx, inputs, output):
        h, w_down, b_down, w_up, b_up, scales, adapter_ids, activation = inputs
        ctx.save_for_backward(h, output[1], w_down, w_up, scales, adapter_ids)
        ctx.activation = activation
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad, _grad_z):
        h, z, w_down, w_up, scales, adapter_ids = ctx.saved_tensors
        grads = torch.ops.tuneforge.multi_bottleneck_adapter_backward(grad.contiguous(), h, z, w_down, w_up, scales,
                                                                      adapter_ids, ctx.activation)
        return (*(g if n else None for g, n in zip(grads, ctx.needs_input_grad[:5])), None, None, None)

    torch.library.register_autograd(lib, backward, setup_context=setup_context)


def _register_attention() -> None:
    lib = "tuneforge::flash_attention_forward"

    @torch.library.register_fake(lib)
    def _fake(q, k, v, causal, key_padding_mask, cu_seqlens, scale):
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # float32 unless float64 in
        B, H, Tq, D = q.shape
        # the CPU kernel writes (B, H, Tq, D) over token-major (B, Tq, H, D) memory (csrc/attention.cpp)
        out = q.new_empty(B, Tq, H, D).transpose(1, 2) if q.device.type == "cpu" else q.new_empty(q.shape)
        return out, q.new_empty(q.shape[:-1], dtype=lse_dtype)

    @torch.library.register_fake("tuneforge::flash_attention_backward")
    def _fake_backward(grad, q, k, v, out, lse, causal, key_padding_mask, cu_seqlens, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, causal, mask, cu_seqlens, scale = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], mask, cu_seqlens)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad, _grad_lse):
        q, k, v, out, lse, mask, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = torch.ops.tuneforge.flash_attention_backward(grad, q, k, v, out, lse, ctx.causal, mask,
                                                                  cu_seqlens, ctx.scale)
        return dq, dk, dv, None, None, None, None

    torch.library.register_autograd(lib, backward, setup_context=setup_context)


def _register_multi_lora() -> None:
    lib = "tuneforge::multi_lora_linear"

    @torch.library.register_fake(lib)
    def _fake(x, weight, bias, lora_a, lora_b, scalings, adapter_ids):
        return x.new_empty((*x.shape[:-1], lora_b.size(1)))

    @torch.library.register_fake("tuneforge::multi_lora_linear_backward")
    def _fake_backward(grad, x, weight, lora_a, lora_b, scalings, adapter_ids, needs):
        return _linear_grads_fake(grad, x, weight, lora_a, lora_b, needs)

    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, scalings, adapter_ids = inputs
        ctx.save_for_backward(x, weight, lora_a, lora_b, scalings, adapter_ids)
        ctx.has_bias = bias is not None

    def backward(ctx, grad):
        x, weight, lora_a, lora_b, scalings, adapter_ids = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:5])
        need[1] = need[1] and weight is not None
        need[2] = need[2] and ctx.has_bias
        grads = torch.ops.tuneforge.multi_lora_linear_backward(grad.contiguous(), x, weight, lora_a, lora_b,
                                                               scalings, adapter_ids, need)
        return (*(g if n else None for g, n in zip(grads, need)), None, None)

    torch.library.register_autograd(lib, backward, setup_context=setup_context)


def _register_bottleneck() -> None:
    lib = "tuneforge::bottleneck_adapter"

    @torch.library.register_fake(lib)
    def _fake(h, w_down, b_down, w_up, b_up, activation, residual):
        return h.new_empty(h.shape), h.new_empty((*h.shape[:-1], w_down.size(0)))

    @torch.library.register_fake("tuneforge::bottleneck_adapter_backward")
    def _fake_backward(grad, h, z, w_down, w_up, activation, residual):
        return (h.new_empty(h.shape), w_down.new_empty(w_down.shape), w_down.new_empty(w_down.size(0)),
                w_up.new_empty(w_up.shape), w_up.new_empty(w_up.size(0)))

    def setup_context(ctx, inputs, output):
        h, w_down, b_down, w_up, b_up, activation, residual = inputs
        ctx.save_for_backward(h, output[1], w_down, w_up)
        ctx.activation, ctx.residual = activation, residual
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad, _grad_z):
        h, z, w_down, w_up = ctx.saved_tensors
        grads = torch.ops.tuneforge.bottleneck_adapter_backward(grad.contiguous(), h, z, w_down, w_up,
                                                                ctx.activation, ctx.residual)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])), None, None)

    torch.library.register_autograd(lib, backward, setup_context=setup_context)
