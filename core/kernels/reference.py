"""Pure-torch reference implementations of tuneforge's ops.

They are the fallback when no compiled kernel is available and the oracle every compiled kernel is tested
against, so they favour the plainest correct math over speed: attention here materialises the whole
(Tq, Tk) score matrix, which a fused kernel exists to avoid.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "attention_reference", "document_ids", "lora_linear_reference", "multi_lora_linear_reference", "bottleneck_adapter_reference",
    "multi_bottleneck_adapter_reference", "linear_cross_entropy_reference", "silu_mul_reference", "ACTIVATIONS",
]

#: The activations a bottleneck adapter may use, by name (the name is what files and kernels carry).
ACTIVATIONS = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu}


def document_ids(cu_seqlens, batch: int, length: int, device=None):
    """Which packed document each position is in: (B, T) int64, -1 past the last boundary (padding).

    cu_seqlens: (S + 1,) shared by every row, or (B, S + 1) per row: int offsets 0 = c_0 <= c_1 <= ... <= c_S <= T
    where document s holds positions c_s .. c_{s+1} - 1. Zero-length documents (repeated offsets) are allowed,
    so rows with fewer documents repeat their last offset.
    """
    cu = torch.as_tensor(cu_seqlens, device=device).to(torch.int64)
    if cu.dim() == 1:
        cu = cu.expand(batch, -1)
    if cu.dim() != 2 or cu.size(0) != batch or cu.size(1) < 2:
        raise ValueError(f"cu_seqlens must be (S + 1,) or (B, S + 1) = ({batch}, S + 1) with S >= 1 documents, "
                         f"got {tuple(cu.shape)}")
    if bool((cu[:, 0] != 0).any()) or bool((cu[:, 1:] < cu[:, :-1]).any()) or bool((cu[:, -1] > length).any()):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at most at T = {length}; got "
                         f"{cu.tolist() if cu.numel() <= 64 else tuple(cu.shape)}")
    t = torch.arange(length, device=cu.device).expand(batch, length).contiguous()  # (B, T)
    doc = torch.searchsorted(cu.contiguous(), t, right=True) - 1  # (B, T): the last boundary at or before t
    return doc.masked_fill(t >= cu[:, -1:], -1)


def attention_reference(q, k, v, *, causal: bool = True, key_padding_mask=None, scale=None, cu_seqlens=None):
    """softmax(q k^T * scale, masked) v, written out step by step.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with Hkv dividing H (grouped-query attention: key/value head j serves
    query heads j*H/Hkv .. (j+1)*H/Hkv - 1) and Tq <= Tk when causal. Returns (B, H, Tq, D) in q's dtype.

    causal: bottom-right aligned. Query i sits at absolute position Tk - Tq + i and sees keys at positions
        <= that, so with a KV cache the Tq new tokens see every cached key and the new keys up to their own.
        With Tq == Tk this is the usual lower-triangular mask.
    key_padding_mask: bool (B, Tk), True = a real token that may be attended, False = padding.
    scale: multiplies the scores; default 1/sqrt(D), which keeps their variance ~1 whatever the head size.
    cu_seqlens: documents packed back to back along T (needs Tq == Tk): see :func:`document_ids`. A query sees
        only keys of its own document; positions past the last offset see nothing.

    A query that may see no key at all (e.g. a left-padding position under the causal mask) returns zeros,
    and no gradient flows through it: never NaN.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.size(1), k.size(-2)
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries are the newest keys), got Tq={Tq}, Tk={Tk}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, Tk):
        raise ValueError(f"key_padding_mask must be (B, Tk) = ({B}, {Tk}), got {tuple(key_padding_mask.shape)}")
    if Hkv == 0 or H % Hkv or tuple(v.shape[:2]) != (B, Hkv) or k.size(0) != B:
        raise ValueError(f"k and v must be (B, Hkv, Tk, D) with Hkv dividing q's {H} heads, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if cu_seqlens is not None and Tq != Tk:
        raise ValueError(f"cu_seqlens (packed documents) needs Tq == Tk, got Tq={Tq}, Tk={Tk}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if Hkv != H:  # each key/value head serves H // Hkv consecutive query heads
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)

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
    if cu_seqlens is not None:
        doc = document_ids(cu_seqlens, B, Tk, device=q.device)  # (B, T)
        same = (doc[:, :, None] == doc[:, None, :]) & (doc >= 0)[:, :, None]  # (B, Tq, Tk)
        allowed = allowed & same[:, None]  # (B, 1, Tq, Tk)

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


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling: float):
    """``x W^T + b + scaling * (x A^T) B^T``: a linear layer with one low-rank update beside it.

    x: (..., in); weight: (out, in) or None (the update alone); bias: (out,) or None; lora_a: (r, in); lora_b:
    (out, r). The update goes through the rank-r bottleneck and is never formed as an (out, in) matrix: that is
    what keeps LoRA cheap.
    """
    update = scaling * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b)  # (..., out)
    return update if weight is None else torch.nn.functional.linear(x, weight, bias) + update


def multi_lora_linear_reference(x, weight, bias, lora_a, lora_b, scalings, adapter_ids):
    """A linear layer whose rows each add their own adapter's low-rank update.

    x: (N, ..., in), row ``n`` (the first dimension: a sequence of a batch, or a token) uses adapter
    ``adapter_ids[n]``; adapter_ids: (N,) int64, -1 = no adapter for that row. weight: (out, in) or None (the
    updates alone). lora_a: (A, r, in); lora_b: (A, out, r); scalings: (A,). Adapters of lower rank are
    zero-padded to r (exact: the padding adds zeros).

    Each row's A and B are gathered (an (N, r, in) copy, small next to x when rows are sequences) and applied
    with two batched products, so one pass serves any mix of adapters with no host synchronisation.
    """
    N = x.size(0)
    if weight is not None:
        base = torch.nn.functional.linear(x, weight, bias)  # (N, ..., out)
    else:
        base = x.new_zeros(*x.shape[:-1], lora_b.size(1))
    if N == 0 or lora_a.size(0) == 0:
        return base
    has = adapter_ids >= 0  # (N,)
    idx = adapter_ids.clamp(min=0)
    a = lora_a.index_select(0, idx)  # (N, r, in)
    b = lora_b.index_select(0, idx)  # (N, out, r)
    s = scalings.to(x.dtype).index_select(0, idx) * has.to(x.dtype)  # (N,): 0 for rows without an adapter
    flat = x.reshape(N, -1, x.size(-1))  # (N, L, in): every position of a row shares its adapter
    low = torch.bmm(flat, a.transpose(1, 2))  # (N, L, r)
    up = torch.bmm(low, b.transpose(1, 2))  # (N, L, out)
    return base + (up * s[:, None, None]).reshape(base.shape)


def bottleneck_adapter_reference(h, w_down, b_down, w_up, b_up, activation: str = "gelu", residual: bool = True):
    """``h + up(act(down(h)))`` (``residual=False``: without the ``h +``).

    h: (..., C); w_down: (m, C); b_down: (m,); w_up: (C, m); b_up: (C,). m is the bottleneck (C / reduction).
    """
    act = ACTIVATIONS[activation]
    out = torch.nn.functional.linear(act(torch.nn.functional.linear(h, w_down, b_down)), w_up, b_up)  # (..., C)
    return h + out if residual else out


def multi_bottleneck_adapter_reference(h, w_down, b_down, w_up, b_up, scales, adapter_ids, activation: str = "gelu"):
    """Each row's own adapter's ``scale * up(act(down(h)))`` (no residual: the caller adds it where it belongs).

    h: (N, ..., C), row ``n`` uses adapter ``adapter_ids[n]`` (-1 = none: zeros); w_down: (A, m, C); b_down:
    (A, m); w_up: (A, C, m); b_up: (A, C); scales: (A,). Narrower bottlenecks are zero-padded to m (exact: a
    padded unit has zero weights in and out, so it adds act(0) * 0 = 0).
    """
    N = h.size(0)
    if N == 0 or w_down.size(0) == 0:
        return torch.zeros_like(h)
    has = adapter_ids >= 0
    idx = adapter_ids.clamp(min=0)
    flat = h.reshape(N, -1, h.size(-1))  # (N, L, C)
    z = torch.baddbmm(b_down.index_select(0, idx)[:, None, :], flat,
                      w_down.index_select(0, idx).transpose(1, 2))  # (N, L, m)
    z = ACTIVATIONS[activation](z)
    out = torch.baddbmm(b_up.index_select(0, idx)[:, None, :], z, w_up.index_select(0, idx).transpose(1, 2))
    s = scales.to(h.dtype).index_select(0, idx) * has.to(h.dtype)  # (N,)
    return (out * s[:, None, None]).reshape(h.shape)  # (N, ..., C)


def linear_cross_entropy_reference(hidden, weight, target, bias=None, *, ignore_index: int = -100,
                                   label_smoothing: float = 0.0, reduction: str = "mean", chunk_rows=None):
    """``F.cross_entropy(hidden @ weight.T + bias, target)`` computed over chunks of rows, never holding the (N, V)
    logits: the pure-torch twin of ``tuneforge::linear_cross_entropy`` and what runs where that op is not compiled
    (CUDA included: its cost there is the cuBLAS products, as unfused).

    hidden: (..., C), weight: (V, C), target: (...) int64, bias: (V,) or None, checked and cast by the face.
    Reduction ``mean`` averages over rows whose target is not ``ignore_index`` (0 when there are none, never NaN),
    ``sum`` adds them, ``none`` returns (N,) with 0 at ignored rows. The loss is float32 at least; gradients come
    back in the inputs' dtypes. Label smoothing eps: ``(1 - eps) * nll + eps * mean_v(-log p_v)``.

    The algorithm of the compiled op: per chunk, logits by one product, then log-sum-exp, loss and (when gradients
    are wanted) the logits' gradient in place, then dx_c = G W and dW += G^T x_c. For mean and sum the gradients
    are made in the forward and the backward scales them; for none the backward recomputes each chunk's logits.
    """
    rows = chunk_rows or max(16, min(1024, (48 << 20) // (4 * max(weight.size(0), 1)))) // 16 * 16  # as the op
    loss = _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.size(-1)), weight, bias, target.reshape(-1),
                                            ignore_index, float(label_smoothing), reduction, int(rows))
    return loss.view(target.shape) if reduction == "none" else loss


def _chunked_sweep(x, w, b, target, ignore_index, eps, scale, needs, rows, losses=None):
    """One pass over the rows in chunks: per-row losses into ``losses`` (N,) when given, and (dx, dW, db) as
    ``needs`` asks (None otherwise). ``scale``: a 0-dim tensor (every row) or (N,) (each row's upstream gradient)."""
    N, C = x.shape
    V = w.size(0)
    acc = torch.promote_types(x.dtype, torch.float32)  # float32 pass and accumulators for bf16/fp16 inputs
    dx = torch.empty_like(x) if needs[0] else None
    dw = torch.zeros(V, C, dtype=acc, device=x.device) if needs[1] else None
    db = torch.zeros(V, dtype=acc, device=x.device) if needs[2] else None
    # one logits buffer for every chunk (plus a float32 one for narrow inputs), written in place: never two chunks
    buf = x.new_empty(min(rows, max(N, 1)), V)  # (rows, V)
    fbuf = buf if acc == x.dtype else torch.empty(buf.shape, dtype=acc, device=x.device)
    for r0 in range(0, N, rows):
        xc, tc = x[r0:r0 + rows], target[r0:r0 + rows]
        r = xc.size(0)
        if b is None:
            torch.mm(xc, w.t(), out=buf[:r])
        else:
            torch.addmm(b, xc, w.t(), out=buf[:r])
        logits = fbuf[:r] if fbuf is buf else fbuf[:r].copy_(buf[:r])  # (r, V) in acc
        keep = tc != ignore_index  # (r,)
        safe = torch.where(keep, tc, 0)[:, None]  # (r, 1): ignored rows read column 0, then get weight 0
        m = logits.amax(dim=-1, keepdim=True)  # (r, 1)
        target_logit = logits.gather(1, safe)[:, 0]
        mean = logits.mean(-1) if eps else None
        e = logits.sub_(m).exp_()  # (r, V): exp(l - max), in place of the logits
        total = e.sum(-1)  # (r,)
        lse = m[:, 0] + total.log()
        if losses is not None:
            nll = lse - target_logit
            loss = (1 - eps) * nll + eps * (lse - mean) if eps else nll
            losses[r0:r0 + r] = loss.masked_fill(~keep, 0)
        if dx is None and dw is None and db is None:
            continue
        s = (scale if scale.dim() == 0 else scale[r0:r0 + r]).to(acc) * keep  # (r,): 0 for ignored rows
        g = e.mul_((s / total)[:, None])  # (r, V): scale * softmax, in place
        if eps:
            g.sub_((s * (eps / V))[:, None])
        g.scatter_add_(1, safe, (-(1 - eps) * s)[:, None])  # (r, V): d loss / d logits
        if dx is not None:
            torch.mm(g if g.dtype == x.dtype else g.to(x.dtype), w, out=dx[r0:r0 + r])
        if dw is not None:
            dw.addmm_(g.t(), xc.to(acc))
        if db is not None:
            db += g.sum(0)
    return dx, dw, db


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, eps, reduction, rows):
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"linear_cross_entropy: reduction must be mean, sum or none, got {reduction!r}")
        acc = torch.promote_types(hidden.dtype, torch.float32)
        needs = [n and reduction != "none" for n in ctx.needs_input_grad[:3]]
        count = (target != ignore_index).sum().clamp(min=1)  # mean's divisor, a tensor: no host sync on CUDA
        scale = (1.0 / count.to(acc)) if reduction == "mean" else torch.ones((), dtype=acc, device=hidden.device)
        losses = torch.empty(hidden.size(0), dtype=acc, device=hidden.device)  # (N,)
        with torch.autocast(hidden.device.type, enabled=False):  # the accumulations stay in float32
            grads = _chunked_sweep(hidden, weight, bias, target, ignore_index, eps, scale, needs, rows, losses)
        ctx.reduction, ctx.args = reduction, (ignore_index, eps, rows)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, target)
            return losses
        ctx.save_for_backward(*(g.to(t.dtype) if g is not None else None
                                for g, t in zip(grads, (hidden, weight, bias))))
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            ignore_index, eps, rows = ctx.args
            with torch.autocast(hidden.device.type, enabled=False):
                dx, dw, db = _chunked_sweep(hidden, weight, bias, target, ignore_index, eps, grad, ctx.needs_input_grad,
                                            rows)
            grads = [g.to(t.dtype) if g is not None else None for g, t in zip((dx, dw, db), (hidden, weight, bias))]
        else:  # made by the forward; an upstream gradient of exactly 1 (read on the CPU only) hands them on as they are
            grads = ctx.saved_tensors
            if not (grad.device.type == "cpu" and grad.item() == 1.0):
                grads = [g * grad.to(g.dtype) if g is not None else None for g in grads]
        return (*grads, None, None, None, None, None)


def silu_mul_reference(gate, up):
    """``silu(gate) * up`` as torch ops (autograd keeps gate, silu(gate) and up): the twin of ``kernels.silu_mul``."""
    return torch.nn.functional.silu(gate) * up
