"""Rollouts that encode a prompt once: G samples per prompt with one shared prefill against the prompts repeated G
times, side by side in one run: rollout tokens/s.

    python benchmarks/shared_prefill.py                        # embedded `tiny`, 4 prompts x 8 samples, 64 + 64
    python benchmarks/shared_prefill.py --model smollm2-135m   # SmolLM2-135M-Instruct (slow on a CPU)
    python benchmarks/shared_prefill.py --quick                # a tiny model and short rows: checks the script

Both sides sample ``--samples`` (G) responses of ``--new-tokens`` to each of ``--prompts`` (B) prompts of
``--prompt-len`` tokens, at temperature 1 with the KV cache, no stop token (every row writes every token):

- shared: ``model.generate(prompts, N, num_samples=G)``: the B prompts run through the model once, their cache rows
  and last logits are copied to the G samples (``cache.repeat_rows``), then B * G rows decode;
- per-sample prefill, the baseline a user writes: ``model.generate(prompts.repeat_interleave(G, 0), N)``: B * G
  prompts prefilled, then the same decode.

Both draw from the same seeded generator and must return the same tokens (checked before timing, printed). One
warm-up call each, then ``--repeats`` interleaved calls, median. Rollout tokens/s = B * G * N / the call's seconds;
ratio = shared / per-sample. Target (issue 22): >= 2x for G = 8, 64-token prompts, 64 new tokens.

What bounds the ratio: both sides decode the same B * G rows; sharing saves (G - 1) / G of the prefill only. The
script times the prefill alone (``generate(..., 1)``: the prompts' pass and one sample) for B and for B * G rows, so
ratio <= (P_BG + D) / (P_B + D) with D = the decode (the per-sample call less P_BG); and counts tokens through the
model (matrix FLOPs = 2 x matmul parameters per token; attention not counted): (B G T + B G (N-1)) against
(B T + B G (N-1)), which is 1.79x for G = 8, T = N = 64, however fast the machine. Fraction of the machine: those
FLOPs / the call's time / the sgemm peak (``torch.mm`` of square float32 matrices, best of the runs at the start and
the end, benchmarks/kernels.py). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_training as shared_bench  # noqa: E402  (machine(), installed(), quiet_transformers())
from kernels import against_peak  # noqa: E402  (the same sgemm peak as every benchmark)

TARGET = 2.0
SIDES = ("shared", "per_sample")


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matrix products: every nn.Linear's weight, a tied head counted once."""
    seen = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(seen.values())


def prompts_of(model, args) -> torch.Tensor:
    """(B, T) prompt ids drawn from the vocabulary's ordinary tokens, seeded: no padding, every row T long."""
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(3, min(model.config.vocab_size, 32000), (args.prompts, args.prompt_len), generator=g)


def calls(model, ids, args) -> dict:
    """Each timed call of a side, returning its output: the two rollouts and the two prefills alone."""
    G, N = args.samples, args.new_tokens
    repeated = ids.repeat_interleave(G, 0)  # (B * G, T): the prompts as a user without sharing lays them out

    def gen(idx, new, **kw):
        return lambda: model.generate(idx, new, temperature=1.0, generator=torch.Generator().manual_seed(1), **kw)

    return {"shared": gen(ids, N, num_samples=G), "per_sample": gen(repeated, N),
            "prefill_prompts": gen(ids, 1), "prefill_rows": gen(repeated, 1)}


def timed(runs: dict, repeats: int) -> tuple[dict, dict]:
    """One warm-up call of each (its output kept), then ``repeats`` interleaved calls: median and min seconds."""
    outputs = {k: run() for k, run in runs.items()}
    times = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits every side alike
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    return outputs, {k: {"median_s": statistics.median(v), "min_s": min(v)} for k, v in times.items()}


def measure(args) -> dict:
    from tuneforge.models import factory

    model, _ = factory.build(args.model, seed=0)
    model.eval()
    ids = prompts_of(model, args)
    B, T, G, N = args.prompts, args.prompt_len, args.samples, args.new_tokens
    outputs, t = timed(calls(model, ids, args), args.repeats)
    same = outputs["shared"] == outputs["per_sample"]  # (B * G, T + N)
    flops = 2 * matmul_params(model)
    through = {"shared": B * T + B * G * (N - 1), "per_sample": B * G * T + B * G * (N - 1)}  # tokens fed
    report = {"model": args.model, "params": sum(p.numel() for p in model.parameters()), "prompts": B,
              "samples": G, "prompt_len": T, "new_tokens": N, "rows": B * G,
              "tokens_match": bool(same.all()), "rows_equal": float(same.all(-1).float().mean()), "sides": {}}
    for side in SIDES:
        s = t[side]["median_s"]
        report["sides"][side] = {"call_s": s, "min_call_s": t[side]["min_s"], "rollout_tokens_per_s": B * G * N / s,
                                 "tokens_through_model": through[side], "gflops": flops * through[side] / s / 1e9}
    sides = report["sides"]
    report["ratio"] = sides["shared"]["rollout_tokens_per_s"] / sides["per_sample"]["rollout_tokens_per_s"]
    p_rows, p_prompts = t["prefill_rows"]["median_s"], t["prefill_prompts"]["median_s"]
    decode = max(sides["per_sample"]["call_s"] - p_rows, 1e-9)
    report["bound"] = {"prefill_prompts_s": p_prompts, "prefill_rows_s": p_rows, "decode_s": decode,
                       "prefill_share_per_sample": p_rows / sides["per_sample"]["call_s"],
                       "ratio_if_only_prefill_changes": (p_rows + decode) / (p_prompts + decode),
                       "ratio_by_flops": through["per_sample"] / through["shared"],
                       # (P + D) / (P / G + D) >= TARGET needs P / D >= (TARGET - 1) / (1 - TARGET / G)
                       "prefill_to_decode": p_rows / decode,
                       "prefill_to_decode_for_target": (TARGET - 1) / (1 - TARGET / G) if G > TARGET else None}
    report["matmul_flops_per_token"] = flops
    return report


def say(report: dict) -> None:
    r, sides, b = report, report["sides"], report["bound"]
    print(f"{r['model']} ({r['params'] / 1e6:.2f}M parameters): {r['prompts']} prompts x {r['samples']} samples, "
          f"{r['prompt_len']}-token prompts, {r['new_tokens']} new tokens, temperature 1, KV cache")
    print(f"  {r['machine']}; sgemm peak {r['sgemm_peak_gflops']:.1f} GFLOP/s "
          f"(measured {', '.join(f'{p:.1f}' for p in r['sgemm_peaks_measured'])})")
    print(f"  same seed, same tokens: {'yes' if r['tokens_match'] else 'NO'} ({r['rows_equal']:.0%} of rows equal)")
    for side in SIDES:
        s = sides[side]
        print(f"  {side:10s}: {s['call_s'] * 1e3:9.1f} ms a rollout (min {s['min_call_s'] * 1e3:.1f}), "
              f"{s['rollout_tokens_per_s']:8.1f} rollout tok/s, {s['tokens_through_model']} tokens through the model, "
              f"{s['gflops']:.1f} GFLOP/s = {s['fraction_of_peak']:.0%} of peak")
    print(f"  prefill alone: {r['prompts']} prompts {b['prefill_prompts_s'] * 1e3:.1f} ms, {r['rows']} rows "
          f"{b['prefill_rows_s'] * 1e3:.1f} ms ({b['prefill_share_per_sample']:.0%} of the per-sample rollout); "
          f"decode {b['decode_s'] * 1e3:.1f} ms")
    print(f"  bounds on the ratio: {b['ratio_if_only_prefill_changes']:.2f}x from these timings (sharing removes "
          f"prefill only), {b['ratio_by_flops']:.2f}x from the tokens each side runs through the model")
    need = b["prefill_to_decode_for_target"]
    print(f"  prefill / decode time of the per-sample rollout: {b['prefill_to_decode']:.2f} ("
          + (f"{TARGET}x needs >= {need:.2f}: a prefill slower per token than decoding)" if need else "n/a)"))
    print(f"  rollout tokens/s shared / per-sample prefill: {r['ratio']:.2f}x (target >= {TARGET}x: "
          f"{'met' if r['ratio'] >= TARGET else 'NOT met'})")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a --model spec (default tiny; smollm2-135m for the real model)")
    ap.add_argument("--prompts", type=int, default=None, help="B, prompts per rollout (default 4)")
    ap.add_argument("--samples", type=int, default=None, help="G, samples per prompt (default 8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="T, tokens per prompt (default 64)")
    ap.add_argument("--new-tokens", type=int, default=None, help="N, tokens each sample writes (default 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 5; smollm2 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the JSON report here")
    ap.add_argument("--quick", action="store_true", help="a tiny model and short rows, 1 timed call: a smoke test")
    args = ap.parse_args(argv)
    preset = dict(model="tiny", prompts=4, samples=8, prompt_len=64, new_tokens=64, repeats=5)
    if args.model and "smollm2" in args.model:
        preset.update(repeats=2)
    if args.quick:
        preset.update(model="tiny:n_layers=2,d_model=64,n_heads=2,max_seq_len=64", prompts=2, samples=4,
                      prompt_len=16, new_tokens=16, repeats=1)
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # others' work: this process has not started computing yet
    if "smollm2" in args.model or args.model.startswith(("hf:", "gguf:")):
        if not shared_bench.installed("transformers"):
            print(f"skipped: --model {args.model} needs transformers (pip install 'tuneforge[hf]')")
            return
        shared_bench.quiet_transformers()
    report = against_peak(lambda: measure(args), quick=args.quick, flops="gflops", load_before=load_before)
    report.update(benchmark="shared_prefill", machine=shared_bench.machine(torch.device("cpu")), target=TARGET)
    say(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
