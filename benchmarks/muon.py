"""Pretraining with Muon against AdamW: the held-out bits/token each reaches and the wall time it takes, side by side
in one run (``--optimizer muon`` against the engine's default).

    python benchmarks/muon.py [--adamw-steps 2000] [--muon-steps 800] [--seed 0] [--threads N]
    python benchmarks/muon.py --quick   # a 2-layer model, a few dozen steps: a smoke test, seconds

Both runs go through ``tuneforge.train`` as ``tuneforge demo``'s pretraining does (``tiny`` with a 256-token context,
batch 8 x 256, lr 5e-3, warmup 30, cosine to 0.1x, fp32), one after the other in this process. AdamW's 2,000 steps
are what the demo ran before Muon; Muon's 800 are what it runs now. The baseline is the optimizer a user has without
this option, at the schedule that reached the target, not a shortened one.

Printed: each run's bits/token, seconds and tokens/s; the ratio of wall times (AdamW / Muon) and of bits. The last
line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from tuneforge import train


def run(optimizer: str, steps: int, args) -> dict:
    with tempfile.TemporaryDirectory() as out:  # the run folder (the checkpoint's write is part of a user's run)
        started = time.perf_counter()
        result = train(model=args.model, mechanisms=["pretrain"], data="builtin:text", steps=steps,
                       batch_size=args.batch, seq_len=args.seq, lr=5e-3, warmup=min(30, steps // 4), eval_every=0,
                       seed=args.seed, optimizer=optimizer, out=f"{out}/run")
        seconds = time.perf_counter() - started
    tokens = steps * args.batch * args.seq
    row = {"optimizer": optimizer, "steps": steps, "tokens": tokens, "seconds": round(seconds, 1),
           "tokens_per_s": round(tokens / seconds), "bits_per_token": round(float(result.metrics["eval/bits_per_token"]), 4)}
    print(f"{optimizer:6s} {steps:5d} steps  {tokens / 1e6:.2f}M tokens  {seconds:7.1f} s  "
          f"{row['tokens_per_s']:,} tok/s  held-out {row['bits_per_token']:.4f} bits/token", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adamw-steps", type=int, default=2000)
    p.add_argument("--muon-steps", type=int, default=800)
    p.add_argument("--model", default="tiny:max_seq_len=256")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="a 2-layer model and a few dozen steps")
    args = p.parse_args()
    if args.quick:
        args.adamw_steps, args.muon_steps = 40, 16
        args.model, args.batch, args.seq = "tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=64", 4, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    adamw, muon = run("adamw", args.adamw_steps, args), run("muon", args.muon_steps, args)
    report = {"adamw": adamw, "muon": muon, "time_ratio_adamw_over_muon": round(adamw["seconds"] / muon["seconds"], 2),
              "bits_muon_minus_adamw": round(muon["bits_per_token"] - adamw["bits_per_token"], 4),
              "threads": torch.get_num_threads()}
    print(f"Muon reaches {muon['bits_per_token']:.4f} bits/token against AdamW's {adamw['bits_per_token']:.4f} in "
          f"{report['time_ratio_adamw_over_muon']:.2f}x less time")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
