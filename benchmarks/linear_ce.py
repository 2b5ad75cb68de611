"""tuneforge's fused linear + cross-entropy against what a user writes, side by side in one run: time and peak memory.

    python benchmarks/linear_ce.py [--tokens 2048] [--d 576] [--vocab 49152] [--repeats 5] [--quick]

Forward + backward of the loss of an LM head: ``tuneforge.kernels.linear_cross_entropy(x, W, y)`` (the compiled CPU
op) against the baseline ``F.cross_entropy(x @ W.T, y).backward()`` (float32 logits, their log-softmax and their
gradients, each (N, V)), and, for information, the chunked pure-torch twin (what CUDA tensors run). Times are
medians of interleaved repeats; ratio = baseline / fused (> 1: fused faster). Useful flops are 6 N V C (logits, dx,
dW) for every variant. The machine's sgemm peak (``torch.mm`` of square float32 matrices, best of the repeats, at
the start and the end) is measured in the same run and the fused op reports its fraction of it.

Peak memory: each variant runs in a fresh process (``--memory VARIANT``), which builds the inputs, runs one
warm-up step (so one-time allocations of the BLAS and the allocator are not counted), clears the gradients, resets
the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and records the resident size, runs one more
forward + backward and reads ``VmHWM``: peak = high-water mark - resident size before the step. The children run
with ``MALLOC_MMAP_THRESHOLD_=65536`` so every tensor is its own mapping, returned when freed (else glibc keeps
freed chunks of the warm-up for reuse and the step's own peak is under-counted). Both variants end the step holding
W.grad (V x C float32), so it is inside both peaks. Ratio = fused / baseline (< 1: fused smaller). Targets (issue 20, CPU float32, N 2048, C 576, V 49,152): memory <= 0.15x at time >= 1.0x.

Timings on a shared machine are noisy: record the load.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

from tuneforge import kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import interleaved, sgemm_peak  # noqa: E402  (benchmarks/kernels.py: the same timing for every op)
import rss  # noqa: E402  (the peak-RSS method shared by the benchmarks)
from tuneforge.kernels import native
from tuneforge.kernels.reference import linear_cross_entropy_reference

BASELINE = "F.cross_entropy(x @ W.T, y).backward()"
VARIANTS = {
    "fused": lambda x, w, y: kernels.linear_cross_entropy(x, w, y),
    "baseline": lambda x, w, y: F.cross_entropy(x @ w.T, y),
    "reference_twin": lambda x, w, y: linear_cross_entropy_reference(x, w, y),
}
TARGETS = {"time_ratio": 1.0, "memory_ratio": 0.15}


def inputs(N: int, C: int, V: int):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, C, generator=g)).requires_grad_()
    w = (torch.randn(V, C, generator=g) * C ** -0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    return x, w, y


def step(name: str, x, w, y):
    x.grad = w.grad = None
    loss = VARIANTS[name](x, w, y)
    loss.backward()
    return loss


def measure_memory(name: str, N: int, C: int, V: int) -> dict:
    """In this (fresh) process: MB of resident memory the second forward + backward of ``name`` adds at its peak."""
    x, w, y = inputs(N, C, V)
    step(name, x, w, y)  # warm-up: BLAS buffers, the allocator's arenas, the kernels' first call
    x.grad = w.grad = None
    gc.collect()
    rss.reset_peak()
    base = rss.status_bytes("VmRSS")
    step(name, x, w, y)
    peak = rss.status_bytes("VmHWM")
    return {"variant": name, "peak_above_inputs_mb": (peak - base) / 2**20, "rss_before_mb": base / 2**20}


def memory_in_subprocess(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory", name, "--tokens", str(args.tokens), "--d",
           str(args.d), "--vocab", str(args.vocab)]
    env = rss.child_env()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small shapes and 2 repeats (a smoke test)")
    ap.add_argument("--memory", choices=list(VARIANTS), help=argparse.SUPPRESS)  # the per-variant child process
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.d, args.vocab, args.repeats = 512, 128, 8192, 2
    N, C, V = args.tokens, args.d, args.vocab
    if args.memory:
        print(json.dumps(measure_memory(args.memory, N, C, V)))
        return
    native.load()
    peaks = [sgemm_peak(1024 if args.quick else 2048, args.repeats)]
    x, w, y = inputs(N, C, V)
    # parity: the fused op computes what the baseline computes (loss and both gradients)
    results = {}
    for name in ("fused", "baseline"):
        loss = step(name, x, w, y)
        results[name] = (loss.detach(), x.grad.clone(), w.grad.clone())
    diff = {k: (a - b).abs().max().item() for k, a, b in zip(("loss", "dx", "dW"), results["fused"], results["baseline"])}
    results.clear()
    t = interleaved({name: (lambda name=name: step(name, x, w, y)) for name in VARIANTS}, args.repeats)
    del x, w, y
    gc.collect()
    peaks.append(sgemm_peak(1024 if args.quick else 2048, args.repeats))
    peak = max(peaks)
    flops = 6 * N * V * C
    memory = {name: memory_in_subprocess(name, args) for name in VARIANTS}
    mem = {name: m["peak_above_inputs_mb"] for name, m in memory.items()}
    report = {
        "benchmark": "linear_ce", "quick": args.quick, "shape": {"N": N, "C": C, "V": V}, "dtype": "float32",
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "kernels": kernels.backend()["linear_cross_entropy"], "baseline": BASELINE,
        "sgemm_peaks_measured": peaks, "sgemm_peak_gflops": peak, "max_abs_diff": diff,
        "ms": {name: s * 1e3 for name, s in t.items()},
        "gflops": {name: flops / s / 1e9 for name, s in t.items()},
        "fraction_of_peak": {name: flops / s / 1e9 / peak for name, s in t.items()},
        "time_ratio": t["baseline"] / t["fused"], "peak_mb": mem, "memory_ratio": mem["fused"] / mem["baseline"],
        "targets": TARGETS,
        "memory_method": "fresh process per variant (MALLOC_MMAP_THRESHOLD_=65536); second step; VmHWM after "
                         "clear_refs=5 minus VmRSS before",
    }
    print(f"linear + cross-entropy, N {N} C {C} V {V}, float32, {report['threads']} threads "
          f"(sgemm peak {peak:.1f} GFLOP/s; measured {', '.join(f'{p:.1f}' for p in peaks)})")
    print(f"  parity vs baseline: loss {diff['loss']:.2e}, dx {diff['dx']:.2e}, dW {diff['dW']:.2e}")
    for name in VARIANTS:
        print(f"  {name:15s} {t[name] * 1e3:8.1f} ms  {report['gflops'][name]:6.1f} GFLOP/s "
              f"({report['fraction_of_peak'][name]:.0%} of sgemm peak)  peak +{mem[name]:.0f} MB")
    print(f"  time ratio (baseline / fused): {report['time_ratio']:.2f}x, target >= {TARGETS['time_ratio']}x  "
          f"[{BASELINE}]")
    print(f"  memory ratio (fused / baseline): {report['memory_ratio']:.3f}x, target <= {TARGETS['memory_ratio']}x")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
