"""What every tuneforge language model shares around its forward pass: laying out an input behind a soft-prompt
prefix and a KV cache (:func:`plan_input`), and sampling continuations (:class:`Generates`).

A model that uses them has ``config.max_seq_len``, a ``prefix`` slot (a module returning a ``Prefix`` or
None), ``new_cache(batch_size, max_len)`` returning a cache with ``length`` and ``prefix``, and a forward
``model(idx, key_padding_mask=, positions=, cache=)`` giving logits (B, T, V). The embedded ``Transformer``
and the Hugging Face wrapper (``tuneforge.models.hf``) both do, so generation, soft prompts and left padding behave
the same on either. ``plan_input`` also lays out packed rows (``cu_seqlens``, :mod:`tuneforge.models.packing`) and
refuses what cannot go with them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable

import torch

from tuneforge.models import routing
from tuneforge.models.packing import check_offsets, packed_positions
from tuneforge.models.sampling import sample_next

__all__ = ["InputPlan", "plan_input", "Generates", "repeat_prefix"]


@dataclasses.dataclass
class InputPlan:
    prefix: object | None  # the Prefix in front of this input (already cached when not fresh)
    length: int  # K, the prefix's columns (0 without one)
    fresh: bool  # the prefix enters with this call (and must be stripped from its output)
    past: int  # tokens of the input already in the cache (prefix not counted)
    key_padding_mask: torch.Tensor | None  # (B, K + past + T) with a prefix, else as given
    positions: torch.Tensor  # (B, T) position ids of the input, after the prefix's real tokens
    cu_seqlens: torch.Tensor | None = None  # packed documents' offsets, checked, on idx's device


def plan_input(model, idx, key_padding_mask=None, positions=None, cache=None, cu_seqlens=None) -> InputPlan:
    """Check an input (B, T) against the context and lay it out after the model's prefix and cache.

    Packed rows (``cu_seqlens``): positions default to restarting at 0 per document; a KV cache or a soft-prompt
    prefix is refused (a prefix would be seen by the first document only; a cache holds one sequence per row).

    The prefix is asked for on a cache's first call only and kept in the cache; positions default to
    past + 0..T-1 and are shifted by each row's real prefix tokens; the padding mask is extended over the prefix.
    What the prefix contributes to every later call (its positions' shift, its mask columns) is worked out once and
    kept in the cache too (``cache.prefix_layout``), so a decode step with soft prompts costs one add and one cat.
    """
    B, T = idx.shape
    if cu_seqlens is not None:
        if cache is not None:
            raise ValueError("packed rows (cu_seqlens) cannot be combined with a KV cache, which continues one "
                             "sequence per row: run packed batches without a cache (training, scoring)")
        cu_seqlens = check_offsets(cu_seqlens, B, T, device=idx.device)
    if cache is not None and cache.length > 0:
        pre, fresh = cache.prefix, False  # the prefix went into the cache with the first tokens
        layout = getattr(cache, "prefix_layout", None)
        if layout is None and pre is not None:  # a cache whose first call did not go through plan_input
            layout = _PrefixLayout.of(pre, B, idx.device)
    else:
        pre = model.prefix(B) if model.prefix is not None else None
        if pre is not None and cu_seqlens is not None:
            raise ValueError("packing cannot be combined with soft prompts: only the first document of a packed row "
                             "would see the prompt; set packing=false (or train without prompt-tuning)")
        fresh = pre is not None
        layout = _PrefixLayout.of(pre, B, idx.device) if pre is not None else None
        if cache is not None:
            cache.prefix, cache.prefix_layout = pre, layout
    K = pre.length if pre is not None else 0
    past = cache.length - K if cache is not None and cache.length > 0 else 0
    context = model.config.max_seq_len
    if K + past + T > context:
        extra = f" (a prefix of {K} + the input)" if K else ""
        raise ValueError(f"{K + past + T} tokens{extra} exceed the model's context of {context}; shorten the input")
    room = getattr(cache, "max_len", None)
    if room is not None and K + past + T > room:
        raise ValueError(f"the KV cache holds {room} tokens and {K + past + T} would be in it; make it with "
                         f"new_cache(batch_size, max_len) of at least {K + past + T}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, past + T):
        raise ValueError(
            f"key_padding_mask must be (batch, cached + new tokens) = ({B}, {past + T}), "
            f"got {tuple(key_padding_mask.shape)}; with a cache it covers the cached tokens too"
        )
    if positions is None and cu_seqlens is not None:
        positions = packed_positions(cu_seqlens, B, T)  # (B, T): 0, 1, ... from each document's first token
    elif positions is None:
        positions = torch.arange(past, past + T, device=idx.device).expand(B, T)  # (B, T)
    if layout is not None:
        positions = positions + layout.shift  # after the prefix's real tokens
        if layout.mask is not None or key_padding_mask is not None:
            um = torch.ones(B, past + T, dtype=torch.bool, device=idx.device) if key_padding_mask is None \
                else key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask.to(torch.bool)
            key_padding_mask = torch.cat([layout.full_mask(), um], dim=1)  # (B, K + past + T)
    return InputPlan(pre, K, fresh, past, key_padding_mask, positions, cu_seqlens)


@dataclasses.dataclass
class _PrefixLayout:
    """What a prefix adds to every call's input: ``shift`` (an int, or (B, 1) per row) moves the input's positions
    after the prefix's real tokens; ``mask`` (B, K) bool marks its real columns (None: all real, made on first use)."""

    length: int  # K
    shift: torch.Tensor | int
    mask: torch.Tensor | None
    batch: int
    device: torch.device

    @classmethod
    def of(cls, pre, batch: int, device) -> "_PrefixLayout":
        count = pre.count()
        return cls(pre.length, count[:, None] if torch.is_tensor(count) else count, pre.mask, batch, device)

    def full_mask(self) -> torch.Tensor:
        """(B, K) bool: the prefix's columns of a padding mask."""
        if self.mask is None:
            self.mask = torch.ones(self.batch, self.length, dtype=torch.bool, device=self.device)
        return self.mask


class Generates:
    """Mixin: :meth:`generate` for a model with the interface in the module docstring."""

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, *, temperature: float = 1.0, top_k=None, top_p=None, eos_id=None,
                 pad_id: int | None = None, generator=None, key_padding_mask=None, use_cache: bool = True,
                 on_token: Callable[[torch.Tensor], None] | None = None, num_samples: int = 1):
        """Continue ``idx`` (B, T) by ``max_new_tokens``; returns (B, T + new). temperature 0 = greedy.

        Prompts of different lengths are left-padded with ``key_padding_mask`` False on the padding; each row's
        positions then count from 0 at its first real token, so a row generates what its prompt would alone.

        ``num_samples`` = G answers each prompt G times: the output has B * G rows, prompt-major (rows i * G ..
        i * G + G - 1 answer prompt i), the same rows as generating ``idx.repeat_interleave(G, 0)``, but with the
        KV cache each prompt is run through the model once: its cache rows and last logits are copied to its G
        samples (the cache's ``repeat_rows``) instead of recomputed. Under ``routing.rows(tasks)`` the tasks name
        the B * G output rows; a prompt's G rows must then name the same task.

        ``eos_id`` is one stop token id or a sequence of them (e.g. ``[newline_id, eos_id]``). A row that
        produced any of them is done: its later positions hold ``pad_id`` when one is given, else the stop token
        it produced (so with one ``eos_id`` and no ``pad_id`` a finished row keeps producing eos). Generation stops
        early once every row is done, so the output may be shorter than T + max_new_tokens. Done rows are still
        sampled (and overwritten), so each row's tokens do not depend on when the others finish.

        ``use_cache=False`` recomputes the whole prefix every step (same tokens, for tests and benchmarks).
        ``on_token`` is called after each step with that step's (B * G,) tokens, as they go into the output (a done
        row's pad or stop token included): a caller streams text with it. It gets an ordinary tensor, outside
        inference mode, and runs synchronously, so a slow callback slows generation.
        Call ``.eval()`` first when dropout > 0.
        """
        B, T = idx.shape
        G = _count(num_samples)
        if T == 0:
            raise ValueError("generate needs at least one prompt token per row (e.g. the tokenizer's bos_id)")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, T):
            raise ValueError(f"key_padding_mask must be (B, T) = ({B}, {T}) like the prompt, "
                             f"got {tuple(key_padding_mask.shape)}")
        prompt_rows = _prompt_routing(B, G)  # the routing of a forward over the B prompts
        with prompt_rows():
            pre = self.prefix(B) if self.prefix is not None else None
        K = pre.length if pre is not None else 0  # soft-prompt tokens the model prepends
        _check_room(self.config.max_seq_len, K, T, max_new_tokens)
        stops = _stop_ids(eos_id, idx.device)  # (S,) or None
        stop = int(stops[0]) if stops is not None and len(stops) == 1 else None  # one id: a plain comparison
        total, rows, device = T + max_new_tokens, B * G, idx.device
        shared = use_cache and G > 1  # the prompts' prefill is shared by their samples
        # The loop runs in inference mode (no autograd bookkeeping on any tensor: about 10% of a small model's
        # decode step); the clone at the end hands back an ordinary tensor, which may then enter autograd.
        with torch.inference_mode(), _without_onednn(self) if use_cache else contextlib.nullcontext():
            out, mask, positions, padded = _lay_out(idx, key_padding_mask, G, total)
            # A shared prefill fills a cache of the B prompts, whose rows then become the B * G samples' rows.
            cache = self.new_cache(B if shared else rows, K + total) if use_cache else None
            done = torch.zeros(rows, dtype=torch.bool, device=device) if stops is not None else None
            fill = None if pad_id is None else torch.full((rows,), int(pad_id), dtype=out.dtype, device=device)
            t = T
            while t < total:
                if shared and t == T:  # the prompts once, (B, T); their last logits copied to each sample
                    with prompt_rows():
                        logits = self(idx, key_padding_mask=mask[::G, :T] if padded else None,
                                      positions=positions[::G, :T], cache=cache)  # (B, T, V)
                    last = logits[:, -1].repeat_interleave(G, 0)  # (B * G, V)
                    cache.repeat_rows(G)
                else:
                    # With a cache the first step feeds the prompt, and every later one only the token sampled last.
                    start = t - 1 if use_cache and t > T else 0
                    last = self(out[:, start:t], key_padding_mask=mask[:, :t] if padded else None,
                                positions=positions[:, start:t], cache=cache)[:, -1]  # (B * G, V)
                nxt = sample_next(last, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator)  # (B * G,)
                if stops is not None:
                    if fill is not None:  # done rows: pad_id, or (no pad_id) the stop token the row produced
                        nxt = torch.where(done, fill, nxt)
                    if pad_id is None:
                        fill = nxt  # last step's token: for a done row, the stop token it produced
                    done |= (nxt == stop) if stop is not None else torch.isin(nxt, stops)
                out[:, t] = nxt
                t += 1
                if on_token is not None:
                    with torch.inference_mode(False):  # an ordinary tensor: the callback may use it in autograd
                        on_token(nxt.clone())
                if done is not None and bool(done.all()):
                    break
        return (out if t == total else out[:, :t]).clone()


def _lay_out(idx, key_padding_mask, times: int, total: int):
    """The output ids (B * times, total) with the prompts (B, T) in front, each repeated ``times`` times
    (prompt-major), and the mask and positions of every column, (B * times, total), and whether there is padding.

    Preallocated for the whole call: step t writes column t of the ids and nothing is concatenated. A generated token
    is always real, and its position is one past its row's last, so the mask and the positions of every column are
    known up front (cumsum(mask) - 1 counts each row's real tokens from 0)."""
    B, T = idx.shape
    out = idx.new_empty(B * times, total)
    out[:, :T] = idx.repeat_interleave(times, 0) if times > 1 else idx
    mask = torch.ones(B * times, total, dtype=torch.bool, device=idx.device)  # True = real token
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=idx.device, dtype=torch.bool)
        mask[:, :T] = kpm.repeat_interleave(times, 0) if times > 1 else kpm
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B * times, total)
    # Without padding the mask is all True: pass none, and attention skips reading it.
    padded = key_padding_mask is not None and not bool(mask.all())
    return out, mask, positions, padded


def _check_room(context: int, K: int, T: int, max_new_tokens: int) -> None:
    if K + T + max(max_new_tokens, 0) > context:
        with_prefix = f"a prefix of {K} + " if K else ""
        raise ValueError(f"{with_prefix}prompt of {T} tokens + {max_new_tokens} new exceeds the context of "
                         f"{context}; at most {max(0, context - T - K)} new tokens fit")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def _count(num_samples) -> int:
    try:
        n = operator.index(num_samples)
    except TypeError:
        n = 0
    if n < 1:
        raise ValueError(f"num_samples must be a whole number >= 1 (samples per prompt), got {num_samples!r}")
    return n


def _prompt_routing(prompts: int, times: int) -> Callable[[], contextlib.AbstractContextManager]:
    """What to enter around a forward over the prompts alone: the caller's routing names the prompts * times output
    rows, so a forward of one row per prompt takes every ``times``-th name (refused when a prompt's rows differ)."""
    names = routing.current()
    if times == 1 or not names:  # not routed, or the base model for every row
        return contextlib.nullcontext
    if len(names) != prompts * times:
        raise ValueError(f"routing names {len(names)} rows; generating {times} samples of {prompts} prompts makes "
                         f"{prompts * times}: name the output rows")
    groups = [names[i:i + times] for i in range(0, len(names), times)]
    mixed = next((i for i, g in enumerate(groups) if len(set(g)) > 1), None)
    if mixed is not None:
        raise ValueError(f"routing names {sorted(set(groups[mixed]))} for the samples of prompt {mixed}: the "
                         f"{times} samples of a prompt share its prefill, so they take one task; route prompts, "
                         "or generate with num_samples=1 on repeated prompts")
    return lambda: routing.rows(names[::times])


def repeat_prefix(prefix, layout: "_PrefixLayout | None", times: int):
    """A cached prefix and its layout (``cache.prefix``, ``cache.prefix_layout``) with each row repeated ``times``
    times, prompt-major: what a cache's ``repeat_rows`` keeps for the rows it makes."""
    if prefix is not None:
        emb = prefix.emb.repeat_interleave(times, 0)  # (B * times, K, C)
        mask = None if prefix.mask is None else prefix.mask.repeat_interleave(times, 0)
        prefix = dataclasses.replace(prefix, emb=emb, mask=mask)
    if layout is not None:
        shift = layout.shift.repeat_interleave(times, 0) if torch.is_tensor(layout.shift) else layout.shift
        mask = None if layout.mask is None else layout.mask.repeat_interleave(times, 0)
        layout = dataclasses.replace(layout, shift=shift, mask=mask, batch=layout.batch * times)
    return prefix, layout


@contextlib.contextmanager
def _without_onednn(model):
    """oneDNN off around the cached decode loop of a float32 model on the CPU, and back as it was after.

    Why: torch runs exact GELU on a contiguous float32 CPU tensor through oneDNN, which opens an OpenMP parallel
    region whatever the size. For one token's 512 values that costs ~9 us against ~1.5 us for ATen's own kernel, and
    when another process holds a core the region waits for a descheduled thread, often for milliseconds: 128 tokens of
    the tiny model at batch 1 took 842 ms with it and 179 ms without (2 threads, a busy 2-core machine, median of 5).
    Recomputing whole prefixes (``use_cache=False``) keeps oneDNN: on 65K values its GELU is the faster (62 against
    86 us on one thread). float32 matmuls run on MKL either way (oneDNN takes only bf16/fp16 ones, hence float32
    only). The switch is process-wide (torch has no per-thread one): meanwhile other threads' GELUs run ATen's kernel,
    equal to ~1 ulp.
    """
    param = next(model.parameters(), None)
    if (param is None or param.device.type != "cpu" or param.dtype != torch.float32
            or not torch.backends.mkldnn.enabled or torch.backends.flags_frozen()):
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


def _stop_ids(eos_id, device) -> torch.Tensor | None:
    """``eos_id`` (None, an int, or a sequence of ints) as a (S,) long tensor, or None when nothing stops."""
    if eos_id is None:
        return None
    try:
        ids = [operator.index(eos_id)]  # one id (an int, a 0-d integer tensor or array)
    except TypeError:
        try:
            ids = [operator.index(i) for i in eos_id]
        except TypeError:
            raise ValueError(f"eos_id must be a token id or a sequence of token ids, got {eos_id!r}") from None
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None
