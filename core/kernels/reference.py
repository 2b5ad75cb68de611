"""Pure-torch reference implementations of tuneforge's ops.

They are the fallback when no compiled kernel is available and the oracle every compiled kernel is tested
against, so they favour the plainest correct math over speed: attention here materialises the whole
(Tq, Tk) score matrix, which a fused kernel exists to avoid.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention_reference"]


def attention_reference(q, k, v, *, causal: bool = True, key_padding_mask=None, scale=None):
    """softmax(q k^T * scale, masked) v, written out step by step.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tq <= Tk when causal. Returns (B, H, Tq, D) in q's dtype.

    causal: bottom-right aligned. Query i sits at absolute position Tk - Tq + i and sees keys at positions
        <= that, so with a KV cache the Tq new tokens see every cached key and the new keys up to their own.
        With Tq == Tk this is the usual lower-triangular mask.
    key_padding_mask: bool (B, Tk), True = a real token that may be attended, False = padding.
    scale: multiplies the scores; default 1/sqrt(D), which keeps their variance ~1 whatever the head size.

    A query that may see no key at all (e.g. a left-padding position under the causal mask) returns zeros,
    and no gradient flows through it: never NaN.
    """
    B, H, Tq, D = q.shape
    Tk = k.size(-2)
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries are the newest keys), got Tq={Tq}, Tk={Tk}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, Tk):
        raise ValueError(f"key_padding_mask must be (B, Tk) = ({B}, {Tk}), got {tuple(key_padding_mask.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    # Scores and softmax in (at least) float32: bf16 keeps 8 mantissa bits, too few for exp() and a sum over
    # thousands of keys. float64 inputs stay float64 so gradcheck can run on this function.
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, H, Tq, Tk)

    # Which (query, key) pairs may interact: the causal band, then the padding of each batch row.
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)  # (Tq, Tk)
    if causal:
        # Diagonal offset Tk - Tq: query i (absolute position Tk - Tq + i) keeps keys 0 .. Tk - Tq + i.
        allowed = allowed.tril(diagonal=Tk - Tq)
    allowed = allowed[None, None]  # (1, 1, Tq, Tk), broadcast over batch and heads
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, Tq, Tk)

    # Masked scores get the most negative finite float rather than -inf: a row where every key is masked then
    # softmaxes to a finite uniform row instead of NaN (exp(-inf - -inf)), and NaN would poison the backward
    # pass of the whole batch even if the row's output were overwritten afterwards.
    scores = scores.masked_fill(~allowed, torch.finfo(acc).min)  # (B, H, Tq, Tk)
    probs = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk), each row sums to 1
    # Rows that saw no key: zero probabilities, so the output is 0 and the gradient into q, k, v is 0 too
    # (masked_fill's backward passes no gradient to the filled entries).
    sees_nothing = ~allowed.any(dim=-1, keepdim=True)  # (B or 1, 1, Tq, 1)
    probs = probs.masked_fill(sees_nothing, 0.0)
    out = torch.matmul(probs, v.to(acc))  # (B, H, Tq, D): weighted sum of the values each query may see
    return out.to(q.dtype)
