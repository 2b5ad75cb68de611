"""Sampling throughput of `Transformer.generate` with the KV cache against recomputing the whole prefix every step.

    python benchmarks/generation.py [--batch 16] [--new-tokens 128] [--repeats 5] [--model tiny:max_seq_len=256]

Baseline: ``use_cache=False``, which re-runs the model over prompt + everything generated so far for each new
token (what a user without a cache writes). Both paths sample the same left-padded batch of ~32-token prompts
(byte tokens, the shape of an RLHF rollout) at temperature 1 from the same seeded generator, so they must return
identical tokens; the script checks that before timing. Throughput = new tokens / second over the whole call
(prompt pass included), measured side by side in one run: one warm-up call each, then interleaved repeats
(cache, recompute, cache, ...), median. Run at the batch given (default 16, a rollout batch) and at batch 1.
Target: >= 5x with the cache for 128 new tokens.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

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
            "ratio": tps["cache"] / tps["recompute"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny:max_seq_len=256")
    ap.add_argument("--batch", type=int, default=16, help="rollout batch (batch 1 is measured too)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: checks the script, not the speed")
    args = ap.parse_args()
    if args.quick:
        args.model, args.batch, args.new_tokens, args.repeats = "tiny:n_layers=2,d_model=32,max_seq_len=64", 3, 16, 1
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
    print("\n| batch | prompt | new | KV cache tok/s | recompute tok/s | cache ms | recompute ms | ratio | tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | {r['cache_tok_s']:,.0f} | "
              f"{r['recompute_tok_s']:,.0f} | {r['cache_ms']:.1f} | {r['recompute_ms']:.1f} | {r['ratio']:.2f}x | "
              f"{'identical' if r['tokens_match'] else 'DIFFER'} |")
    for r in results:
        print(f"batch {r['batch']}: cache / recompute = {r['ratio']:.2f}x (target >= 5x); tokens "
              f"{'matched' if r['tokens_match'] else 'DID NOT MATCH'}")
    print(json.dumps({"benchmark": "generation", "model": args.model, "results": results}))
    if not all(r["tokens_match"] for r in results):
        raise SystemExit("the cached and recomputed paths sampled different tokens")


if __name__ == "__main__":
    main()
