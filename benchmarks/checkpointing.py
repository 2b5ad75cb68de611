"""Activation checkpointing (``--checkpointing``): activation memory and step time of a pretraining step on the
embedded ``small`` model, without it, with ``every:2`` and with ``blocks``, side by side in one run.

    python benchmarks/checkpointing.py [--model small] [--batch 16] [--seq 256] [--repeats 5] [--threads N]
    python benchmarks/checkpointing.py --quick   # tiny sizes, 1 repeat: a smoke test, a few seconds

The step is what ``tuneforge train -m pretrain`` does per micro-batch: forward, next-token cross-entropy,
backward, AdamW; blocks are marked with ``tuneforge.models.checkpointing.apply``, the call the engine makes.
Defaults are the sizes a run on ``small`` picks by itself (batch 16 x its 256-token context).

**Activation memory** is measured on the CPU as resident memory, each variant in its own fresh process (this
script run with ``--child``), so no variant inherits another's allocator state:

- the child builds the model and the optimizer and runs one warm-up step (gradients and AdamW's state now
  exist: that is the *baseline*, model + gradients + optimizer state), reads its resident set (VmRSS), then
  resets the kernel's peak counter (``/proc/self/clear_refs``, VmHWM) and runs the measured steps;
- *peak*: the highest VmHWM of a measured step minus the baseline, i.e. everything a step holds at once beyond
  the weights and their state (saved activations, the recompute, activation gradients, temporaries);
- *held*: VmRSS right after the forward minus the baseline: what the forward keeps for the backward.

glibc returns freed heap memory lazily, so the children run with ``MALLOC_MMAP_THRESHOLD_=65536``: every
tensor over 64 KiB gets its own mapping and goes back to the kernel when freed, and resident memory then follows
the live tensors (without it the figures include whatever the allocator kept).

**Step time**: the three variants on one model in this process, toggled with ``apply``, one warm-up each, then
repeats interleaved (A, B, C, A, B, C...), median (and the fastest repeat, since other processes on a shared
machine only ever add time). Ratios are against no checkpointing.

Targets for ``blocks``: peak activation memory <= 0.35x, step time <= 1.4x. The last line printed is one JSON
object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from tuneforge.models import checkpointing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rss  # noqa: E402  (the peak-RSS method shared by the benchmarks)
from tuneforge.models.transformer import Transformer, model_config

VARIANTS = {"none": 0, "every:2": 2, "blocks": 1}
MEMORY_TARGET, TIME_TARGET = 0.35, 1.4


def build(spec: str, seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(model_config(spec)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


def batch(model, batch_size: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, seq + 1), generator=g)  # (B, T + 1): random bytes


def step(model, optimizer, x, after_forward=None) -> float:
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: part of the baseline, as in a run
    logits = model(x[:, :-1])  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    if after_forward is not None:
        after_forward()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


# -- memory: one child process per variant ----------------------------------------------------------------------

def child(args) -> dict:
    model, optimizer = build(args.model)
    checkpointing.apply(model, VARIANTS[args.child])
    x = batch(model, args.batch, args.seq)
    losses = [step(model, optimizer, x)]  # warm-up: gradients and optimizer state are allocated
    baseline = rss.status_bytes("VmRSS")
    peaks, held = [], []
    for _ in range(args.memory_steps):
        rss.reset_peak()
        start = rss.status_bytes("VmRSS")
        losses.append(step(model, optimizer, x, after_forward=lambda: held.append(rss.status_bytes("VmRSS") - start)))
        peaks.append(rss.status_bytes("VmHWM") - start)
    return {"baseline_mib": baseline / 2**20, "peak_mib": max(peaks) / 2**20, "held_mib": max(held) / 2**20,
            "losses": losses}


def measure_memory(args, variant: str) -> dict:
    env = rss.child_env(OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--memory-steps", str(args.memory_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- time: the variants interleaved on one model --------------------------------------------------------------

def measure_time(args) -> dict[str, float]:
    model, optimizer = build(args.model)
    x = batch(model, args.batch, args.seq)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats + 1):
        for variant, every in VARIANTS.items():
            checkpointing.apply(model, every)
            t0 = time.perf_counter()
            step(model, optimizer, x)
            if repeat:  # the first round warms up
                times[variant].append(time.perf_counter() - t0)
    return {v: (statistics.median(t) * 1e3, min(t) * 1e3) for v, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.seq = "tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=64", 4, 32
        args.repeats, args.memory_steps = 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    memory = {v: measure_memory(args, v) for v in VARIANTS}
    ms = measure_time(args)
    plain = memory["none"]
    report = {
        "model": args.model, "batch": args.batch, "seq_len": args.seq, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(),
        "method": "peak resident memory above model+gradients+AdamW state, one fresh process per variant "
                  "(MALLOC_MMAP_THRESHOLD_=65536); step time: interleaved repeats, median",
        "variants": {
            v: {"peak_activation_mib": round(m["peak_mib"], 1), "held_after_forward_mib": round(m["held_mib"], 1),
                "baseline_mib": round(m["baseline_mib"], 1), "step_ms": round(ms[v][0], 1),
                "step_ms_min": round(ms[v][1], 1),
                "memory_ratio": round(m["peak_mib"] / plain["peak_mib"], 3),
                "held_ratio": round(m["held_mib"] / max(plain["held_mib"], 1e-9), 3),
                "time_ratio": round(ms[v][0] / ms["none"][0], 3),
                "time_ratio_min": round(ms[v][1] / ms["none"][1], 3),  # other processes only ever add time
                # the same weights, data and seed: every variant must take the same steps
                "max_loss_diff": max(abs(a - b) for a, b in zip(m["losses"], plain["losses"]))}
            for v, m in memory.items()},
        "targets": {"memory_ratio": MEMORY_TARGET, "time_ratio": TIME_TARGET},
    }
    blocks = report["variants"]["blocks"]
    report["targets_met"] = blocks["memory_ratio"] <= MEMORY_TARGET and blocks["time_ratio"] <= TIME_TARGET
    print(f"{args.model}, batch {args.batch} x {args.seq} tokens, {report['threads']} threads")
    print(f"{'variant':<10}{'peak act MiB':>14}{'held MiB':>10}{'step ms':>10}{'memory x':>10}{'time x':>8}"
          f"{'(min) x':>9}")
    for v, row in report["variants"].items():
        print(f"{v:<10}{row['peak_activation_mib']:>14}{row['held_after_forward_mib']:>10}{row['step_ms']:>10}"
              f"{row['memory_ratio']:>10}{row['time_ratio']:>8}{row['time_ratio_min']:>9}")
    print(f"targets for blocks: memory <= {MEMORY_TARGET}x, time <= {TIME_TARGET}x: "
          f"{'met' if report['targets_met'] else 'NOT met'}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
