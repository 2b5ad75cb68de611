"""Decoding: `Transformer.generate` with the KV cache against recomputing the whole prefix every step, and one
query's attention over a KV cache against torch SDPA.

    python benchmarks/generation.py [--batch 16] [--new-tokens 128] [--repeats 5] [--model tiny:max_seq_len=256]

Baseline: ``use_cache=False``, which re-runs the model over prompt + everything generated so far for each new
token (what a user without a cache writes). Both paths sample the same left-padded batch of ~32-token prompts
(byte tokens, the shape of an RLHF rollout) at temperature 1 from the same seeded generator, so they must return
identical tokens; the script checks that before timing. Throughput = new tokens / second over the whole call
(prompt pass included), measured side by side in one run: one warm-up call each, then interleaved repeats
(cache, recompute, cache, ...), median. Run at the batch given (default 16, a rollout batch) and at batch 1.
Target: >= 6x with the cache for 128 new tokens at batch 1. Each row also counts the ops one cached step dispatches
(sampling included): what a decode step costs beyond arithmetic.

Decode attention: one new token's query q (1, H, 1, D) against the filled slice ``cache[:, :, :Tk]`` of a
preallocated (1, H, Lmax, D) key/value cache (a strided view, as generation hands it over), with
``tuneforge.kernels.flash_attention(q, k, v, causal=True)`` against what a user writes,
``torch.nn.functional.scaled_dot_product_attention(q, k, v)`` on the same views (one causal query at the end sees
every key: no mask). Interleaved repeats of a batch of calls, median per call. Target: >= 1.5x SDPA at Tk 1024.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tuneforge.kernels import backend, flash_attention
from tuneforge.models.transformer import Transformer, model_config
from tuneforge.models.tokenizer import ByteTokenizer

# Rollout-style prompts of different lengths (24..32 bytes): left-padded to the longest, as RLHF batches are.
PROMPTS = [
    "review: a quiet joy. verdict:",
    "review: two lost hours. verdict:",
    "q: where does the river start?",
    "the lighthouse keeper counted",
    "a note to a friend about rain:",
    "the meeting, in one line:",
    "once upon a time, in a town",
    "translate: good morning, sir.",
]


def prompt_batch(batch: int, tok: ByteTokenizer, max_len: int):
    """(B, T) ids left-padded with ``tok.pad_id`` and the (B, T) bool mask, True on real tokens."""
    rows = [tok.encode(PROMPTS[i % len(PROMPTS)])[:max_len] for i in range(batch)]
    T = max(len(r) for r in rows)
    ids = torch.full((batch, T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = True
    return ids, mask


def bench(model, ids, mask, new_tokens: int, repeats: int, seed: int = 0) -> dict:
    def call(use_cache):
        g = torch.Generator().manual_seed(seed)
        return model.generate(ids, new_tokens, temperature=1.0, key_padding_mask=mask, generator=g,
                              use_cache=use_cache)

    cached, recomputed = call(True), call(False)  # warm-up, and the parity check
    match = torch.equal(cached, recomputed)
    times = {"cache": [], "recompute": []}
    for _ in range(repeats):
        for name, use_cache in (("cache", True), ("recompute", False)):
            t0 = time.perf_counter()
            call(use_cache)
            times[name].append(time.perf_counter() - t0)
    B, new = ids.size(0), cached.size(1) - ids.size(1)
    tps = {k: B * new / statistics.median(v) for k, v in times.items()}
    return {"batch": B, "prompt_len": ids.size(1), "new_tokens": new, "tokens_match": match,
            "cache_tok_s": tps["cache"], "recompute_tok_s": tps["recompute"],
            "cache_ms": 1e3 * statistics.median(times["cache"]),
            "recompute_ms": 1e3 * statistics.median(times["recompute"]),
            "ratio": tps["cache"] / tps["recompute"], "ops_per_cached_step": ops_per_cached_step(model, ids, mask)}


class _CountOps(TorchDispatchMode):
    """Counts the ops that reach the dispatcher (ATen and tuneforge's own), one per call whatever its size."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_cached_step(model, ids, mask) -> int:
    """Ops of one cached decode step, sampling included: a 3-token generate's count less a 2-token one's."""
    counts = []
    for new in (2, 3):
        with _CountOps() as mode:
            model.generate(ids, new, temperature=1.0, key_padding_mask=mask, generator=torch.Generator().manual_seed(0))
        counts.append(mode.count)
    return counts[1] - counts[0]


def decode_attention(heads: int, head_dim: int, filled: int, max_len: int, repeats: int, calls: int) -> dict:
    """One query against the filled part of a preallocated KV cache: flash_attention against SDPA on the same views.
    Each timing is ``calls`` calls back to back (one is a few microseconds); repeats interleave the two."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 1, head_dim, generator=g)  # (1, H, 1, D): the newest token's query
    cache_k = torch.randn(1, heads, max_len, head_dim, generator=g)  # (1, H, Lmax, D), as a KV cache allocates it
    cache_v = torch.randn(1, heads, max_len, head_dim, generator=g)
    k, v = cache_k[:, :, :filled], cache_v[:, :, :filled]  # (1, H, Tk, D) views: rows Lmax apart, not contiguous
    paths = {"tuneforge": lambda: flash_attention(q, k, v, causal=True),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    diff = (paths["tuneforge"]() - paths["sdpa"]()).abs().max().item()
    times = {name: [] for name in paths}
    with torch.inference_mode():  # as in generation: no autograd bookkeeping on either side
        for name, fn in paths.items():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls)
    us = {name: 1e6 * statistics.median(t) for name, t in times.items()}
    return {"heads": heads, "head_dim": head_dim, "cache_len": filled, "cache_max": max_len,
            "strided": not k.is_contiguous(), "max_abs_diff_vs_sdpa": diff, "tuneforge_us": us["tuneforge"],
            "sdpa_us": us["sdpa"], "ratio": us["sdpa"] / us["tuneforge"]}


#: decode attention shapes (H, D): the issue's (8 heads of 64) and the tiny model's (4 of 32)
ATTENTION_SHAPES = ((8, 64), (4, 32))


def report_generation(results) -> None:
    print("\n| batch | prompt | new | KV cache tok/s | recompute tok/s | cache ms | recompute ms | ratio | ops/step "
          "| tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | {r['cache_tok_s']:,.0f} | "
              f"{r['recompute_tok_s']:,.0f} | {r['cache_ms']:.1f} | {r['recompute_ms']:.1f} | {r['ratio']:.2f}x | "
              f"{r['ops_per_cached_step']} | {'identical' if r['tokens_match'] else 'DIFFER'} |")
    for r in results:
        target = " (target >= 6x)" if r["batch"] == 1 else ""
        print(f"batch {r['batch']}: cache / recompute = {r['ratio']:.2f}x{target}; tokens "
              f"{'matched' if r['tokens_match'] else 'DID NOT MATCH'}")


def report_attention(rows) -> None:
    print(f"\nsingle-query attention over a KV cache (flash_attention: {backend()['flash_attention']}), per call:")
    print("| H | D | cache | of | tuneforge us | SDPA us | ratio | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['heads']} | {r['head_dim']} | {r['cache_len']} | {r['cache_max']} | {r['tuneforge_us']:.1f} | "
              f"{r['sdpa_us']:.1f} | {r['ratio']:.2f}x | {r['max_abs_diff_vs_sdpa']:.1e} |")
    for r in rows:
        print(f"H{r['heads']} D{r['head_dim']} over {r['cache_len']} cached tokens: tuneforge / SDPA = "
              f"{r['ratio']:.2f}x (target >= 1.5x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny:max_seq_len=256")
    ap.add_argument("--batch", type=int, default=16, help="rollout batch (batch 1 is measured too)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache-len", type=int, default=1024, help="keys cached, for the decode attention rows")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: checks the script, not the speed")
    args = ap.parse_args()
    calls = 200
    if args.quick:
        args.model, args.batch, args.new_tokens, args.repeats = "tiny:n_layers=2,d_model=32,max_seq_len=64", 3, 16, 1
        args.cache_len, calls = 64, 5
    torch.manual_seed(0)
    model = Transformer(model_config(args.model)).eval()
    tok = ByteTokenizer()
    room = model.config.max_seq_len - args.new_tokens
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model {args.model} ({model.num_params():,} parameters), {args.new_tokens} new tokens, temperature 1, "
          f"median of {args.repeats} interleaved repeats")
    results = []
    for batch in dict.fromkeys((args.batch, 1)):
        ids, mask = prompt_batch(batch, tok, room)
        results.append(bench(model, ids, mask, args.new_tokens, args.repeats))
    report_generation(results)
    # the cache holds room for twice what is filled: the view's rows are strided, as in a real cache mid-generation
    attention = [decode_attention(H, D, args.cache_len, 2 * args.cache_len, args.repeats, calls)
                 for H, D in ATTENTION_SHAPES]
    report_attention(attention)
    print(json.dumps({"benchmark": "generation", "model": args.model, "results": results,
                      "decode_attention": attention}))
    if not all(r["tokens_match"] for r in results):
        raise SystemExit("the cached and recomputed paths sampled different tokens")
    if not all(r["max_abs_diff_vs_sdpa"] < 1e-4 for r in attention):
        raise SystemExit("flash_attention over the cache view disagrees with SDPA")


if __name__ == "__main__":
    main()
