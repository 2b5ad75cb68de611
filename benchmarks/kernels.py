"""tuneforge's compiled kernels against what a user would otherwise run, side by side in one run.

    python benchmarks/kernels.py [--repeats 7] [--tokens 4096] [--d 1024] [--rank 16] [--contention] [--quick]

Every row is timed interleaved with its baselines (repeats alternate, median); ratio = baseline / tuneforge (> 1:
tuneforge faster). Each ratio names its baseline's exact code in the JSON (``baseline``). The machine's sgemm peak
is measured in the same run (``torch.mm`` of square float32 matrices on the same threads, best of the repeats) and
every op reports its useful GFLOP/s (median) and the fraction of that peak. Targets (issue 19, CPU float32):

- ``flash_attention`` B2 H8 T1024 D64 causal: forward >= 1.15x and forward + backward >= 1.25x SDPA; at the tiny
  model's shape (B16 H4 T256 D32) >= 1.0x SDPA. Packed documents (8 of 64..1024 tokens in rows of 2048,
  ``cu_seqlens``), forward + backward: >= 3x SDPA with the equivalent block-diagonal boolean mask and >= 1.3x SDPA
  looped over the documents.
- ``lora_linear`` forward + backward (x requires grad, base frozen) >= 1.10x PEFT-style eager.
- ``bottleneck_adapter`` forward + backward >= 1.2x eager.
- ``multi_lora_linear``, 16 adapters, rows interleaved: the updates alone >= 1.3x the in-place loop forward and
  forward + backward; with the base product >= 1.25x. The old out-of-place loop (a copy of the output per adapter
  plus a host sync per adapter) is kept as a row for history only; it flattered the op.
- The ``tiny`` model's pretrain step with the kernels >= 1.1x the same step on the pure-torch reference path.

``--contention`` starts one competing busy process (a one-thread matmul loop) for the whole run, to report how
the kernels behave when another process shares the cores. Timings on a shared machine are noisy: record the load.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from tuneforge import kernels
from tuneforge.kernels import native

SDPA = "torch.nn.functional.scaled_dot_product_attention"
# Documents per packed row: mixed lengths 64..1024 summing to the row's 2048 tokens (shuffled, not sorted).
PACKED_LENGTHS = (384, 64, 1024, 96, 192, 64, 128, 96)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per function; the functions alternate within each repeat so load changes hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def sgemm_peak(n: int, repeats: int) -> float:
    """GFLOP/s of torch.mm on (n, n) float32 matrices with this process's threads, best of the repeats. Measured
    at the start, between the sections and at the end; the best of them is the peak every op is compared with (a
    single measurement on a shared machine can land while another process runs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.mm(a, b)
    best = float("inf")
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def against_peak(measure, *, quick: bool, flops: str, load_before: float) -> dict:
    """``measure()``'s report between two sgemm-peak measurements (start and end, the best is the peak), each of
    its ``sides`` given ``fraction_of_peak`` (its ``flops`` GFLOP/s over the peak), with the peaks and the machine's
    load before and after (``load_before``: read before the benchmark's own work began). Prints a warning when the
    machine was busy, whose figures then are not the machine's."""
    n = 512 if quick else 2048
    peaks = [sgemm_peak(n, 3)]
    report = measure()
    peaks.append(sgemm_peak(n, 3))
    peak = max(peaks)
    for side in report["sides"].values():
        side["fraction_of_peak"] = side[flops] / peak
    report.update(quick=quick, load_average={"before": load_before, "after": os.getloadavg()[0]},
                  sgemm_peaks_measured=peaks, sgemm_peak_gflops=peak)
    if load_before > 1.0:
        print(f"  the machine was busy (load average {load_before:.1f} on {os.cpu_count()} cores before the run): "
              "with more threads than free cores every parallel op waits for a descheduled thread; the figures "
              "are not the machine's, compare with --threads 1")
    return report


@contextlib.contextmanager
def contention(on: bool):
    """One competing busy process (a one-thread matmul loop) while the block runs; stopped by its own pid."""
    if not on:
        yield None
        return
    spin = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(1.0)  # let it start spinning before anything is timed
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def compare(t: dict, ours: str, flops: float, baselines: dict, targets: dict) -> dict:
    """One row: tuneforge's time and speed, and per baseline its time, its exact code, the ratio and the target."""
    row = {"tuneforge": {"ms": t[ours] * 1e3, "gflops": flops / t[ours] / 1e9}, "vs": {}}
    for name, code in baselines.items():
        row["vs"][name] = {"baseline": code, "ms": t[name] * 1e3, "ratio": t[name] / t[ours],
                           "target": targets.get(name)}
    return row


def training(fn, params, g):
    """One forward (``fn()``) and backward with the output gradient g, the params' gradients cleared first."""
    def run():
        for p in params:
            p.grad = None
        fn().backward(g)
    return run


def say(label: str, row: dict) -> None:
    tf = row["tuneforge"]
    parts = [f"{label}: tuneforge {tf['ms']:.1f} ms, {tf['gflops']:.1f} GFLOP/s"]
    for name, b in row["vs"].items():
        goal = f", target >= {b['target']}x" if b["target"] else ""
        parts.append(f"{name} {b['ms']:.1f} ms -> {b['ratio']:.2f}x{goal}  [{b['baseline']}]")
    print("\n    ".join(parts))


def attention_rows(fns: dict, inputs, pairs: int, repeats: int, codes: dict, targets: dict) -> dict:
    """Forward and forward + backward of each attention function on the same q, k, v. ``pairs``: the (query,
    key) pairs the mask allows per head; useful FLOPs are 2 products forward (QK^T, PV) and 6 with the
    backward (+ dV, dP, dQ, dK; recomputation not counted)."""
    q, k, v, g = inputs
    first = next(iter(codes))  # parity against the first baseline, output and gradients
    grads = []
    for name in ("tuneforge", first):
        training(lambda name=name: fns[name](q, k, v), (q, k, v), g)()
        grads.append([fns[name](q, k, v).detach(), q.grad, k.grad, v.grad])
    gap = (grads[0][0] - grads[1][0]).abs().max().item()
    grad_gap = max((a - b).abs().max().item() for a, b in zip(grads[0][1:], grads[1][1:]))
    product = 2 * q.size(0) * q.size(1) * pairs * q.size(-1)
    t = interleaved({n: torch.no_grad()(lambda f=f: f(q, k, v)) for n, f in fns.items()}, repeats)
    fwd = compare(t, "tuneforge", 2 * product, codes, targets.get("forward", {}))
    t = interleaved({n: training(lambda f=f: f(q, k, v), (q, k, v), g) for n, f in fns.items()}, repeats)
    both = compare(t, "tuneforge", 6 * product, codes, targets.get("forward_backward", {}))
    return {"max_abs_diff": gap, "grad_max_abs_diff": grad_gap, "parity_against": first, "forward": fwd,
            "forward_backward": both}


def qkv(B: int, H: int, T: int, D: int):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(B, H, T, D)


def bench_attention(B, H, T, D, repeats, targets) -> dict:
    scale = D ** -0.5
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # (T, T) keys after the query

    def eager(q, k, v):  # what a model without a fused kernel runs
        return (q @ k.transpose(-2, -1) * scale).masked_fill(future, float("-inf")).softmax(-1) @ v  # (B, H, T, T)

    fns = {"tuneforge": lambda q, k, v: kernels.flash_attention(q, k, v, causal=True),
           "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), "eager": eager}
    codes = {"sdpa": f"{SDPA}(q, k, v, is_causal=True)",
             "eager": "(q @ k.transpose(-2, -1) * scale).masked_fill(future, -inf).softmax(-1) @ v"}
    row = attention_rows(fns, qkv(B, H, T, D), T * (T + 1) // 2, repeats, codes, targets)
    return {"B": B, "H": H, "T": T, "D": D, "causal": True, **row}


def packed_offsets(T: int) -> list[int]:
    lengths = [n * T // 2048 for n in PACKED_LENGTHS]  # the 2048-token layout scaled to T (--quick)
    lengths[-1] += T - sum(lengths)
    return [0] + [sum(lengths[:i + 1]) for i in range(len(lengths))]


def bench_packed(B, H, T, D, repeats) -> dict:
    """Causal attention within 8 documents packed back to back in each row (the same offsets in every row)."""
    cu = packed_offsets(T)
    spans = list(itertools.pairwise(cu))  # read once, as a user's collate function would have them
    cu_seqlens = torch.tensor(cu)
    doc = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor([b - a for a, b in spans]))  # (T,)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()  # (T, T) same doc, causal

    def looped(q, k, v):
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True)
                          for a, b in spans], dim=2)

    fns = {"tuneforge": lambda q, k, v: kernels.flash_attention(q, k, v, causal=True, cu_seqlens=cu_seqlens),
           "sdpa_looped": looped,
           "sdpa_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    codes = {"sdpa_looped": f"torch.cat([{SDPA}(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True) for a, b "
                            "in spans], dim=2)",
             "sdpa_mask": f"{SDPA}(q, k, v, attn_mask=mask)  # (T, T) bool: same document and causal"}
    pairs = sum((b - a) * (b - a + 1) // 2 for a, b in spans)
    both = {"sdpa_mask": 3.0, "sdpa_looped": 1.3}
    row = attention_rows(fns, qkv(B, H, T, D), pairs, repeats, codes, {"forward_backward": both})
    return {"B": B, "H": H, "T": T, "D": D, "documents": [b - a for a, b in spans], **row}


def bench_lora(tokens: int, d: int, r: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, d, requires_grad=True)
    base = torch.nn.Linear(d, d).requires_grad_(False)
    lora_a = torch.nn.Linear(d, r, bias=False)
    lora_b = torch.nn.Linear(r, d, bias=False)
    torch.nn.init.normal_(lora_b.weight, std=0.02)
    s = 2.0
    g = torch.randn(tokens, d)  # the gradient a loss would send back (dense, like a real one)
    fns = {"eager": lambda: base(x) + lora_b(lora_a(x)) * s,
           "tuneforge": lambda: kernels.lora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight, s)}
    with torch.no_grad():
        gap = (fns["tuneforge"]() - fns["eager"]()).abs().max().item()
    params = (x, lora_a.weight, lora_b.weight)
    flops = 4 * tokens * d * d + 12 * tokens * d * r  # x W^T, g W; the six rank-r products
    row = compare(interleaved({n: training(f, params, g) for n, f in fns.items()}, repeats), "tuneforge", flops,
                  {"eager": "(base(x) + lora_B(lora_A(x)) * s).backward(g)  # base frozen, x.requires_grad"},
                  {"eager": 1.10})
    return {"tokens": tokens, "d": d, "rank": r, "max_abs_diff": gap, **row}


def bench_bottleneck(tokens: int, d: int, m: int, repeats: int) -> dict:
    torch.manual_seed(0)
    h = torch.randn(tokens, d, requires_grad=True)
    down, up = torch.nn.Linear(d, m), torch.nn.Linear(m, d)
    torch.nn.init.normal_(up.weight, std=0.02)
    params = [h, *down.parameters(), *up.parameters()]
    g = torch.randn(tokens, d)
    fns = {"eager": lambda: h + up(F.gelu(down(h))),
           "tuneforge": lambda: kernels.bottleneck_adapter(h, down.weight, down.bias, up.weight, up.bias, "gelu")}
    with torch.no_grad():
        gap = (fns["tuneforge"]() - fns["eager"]()).abs().max().item()
    t = interleaved({n: training(f, params, g) for n, f in fns.items()}, repeats)
    row = compare(t, "tuneforge", 12 * tokens * d * m,
                  {"eager": "(h + up(gelu(down(h)))).backward(g)"}, {"eager": 1.2})
    return {"tokens": tokens, "d": d, "bottleneck": m, "max_abs_diff": gap, **row}


LOOP_IN_PLACE = ("out = base(x) (or zeros); for a, rows in enumerate(groups): out.index_add_(0, rows, "
                 "(x.index_select(0, rows) @ A[a].T @ B[a].T) * s[a])  # groups and s precomputed once")
LOOP_OLD = ("for a in range(A): rows = (ids == a).nonzero(); out = out.index_add(0, rows, ...)  # out of place, "
            "a host sync per adapter: the old baseline, kept for history")


def bench_multi_lora(tokens, d, r, n_adapters, repeats, *, base: bool) -> dict:
    """Rows (tokens) interleaved over the adapters (row i uses adapter i % A), with or without the base product."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d, requires_grad=True)
    w = torch.randn(d, d) * 0.02 if base else None
    lora_a = (torch.randn(n_adapters, r, d) * 0.02).requires_grad_()
    lora_b = (torch.randn(n_adapters, d, r) * 0.02).requires_grad_()
    scalings = torch.full((n_adapters,), 2.0)
    ids = torch.arange(tokens) % n_adapters
    g = torch.randn(tokens, d)
    # What a user's mixed-batch loop has before the layer runs: each adapter's rows and scale, found once per batch.
    groups = [(ids == a).nonzero().squeeze(1) for a in range(n_adapters)]
    scales = scalings.tolist()

    def loop():  # the PEFT way (mixed-batch forward), in place
        out = x @ w.T if base else torch.zeros(tokens, d)
        for a, rows in enumerate(groups):
            out.index_add_(0, rows, (x.index_select(0, rows) @ lora_a[a].T @ lora_b[a].T) * scales[a])
        return out

    def loop_old():
        out = x @ w.T if base else torch.zeros(tokens, d)
        for a in range(n_adapters):
            rows = (ids == a).nonzero().squeeze(1)
            out = out.index_add(0, rows, (x.index_select(0, rows) @ lora_a[a].T @ lora_b[a].T) * scalings[a])
        return out

    def fused():
        return kernels.multi_lora_linear(x, w, None, lora_a, lora_b, scalings, ids)

    with torch.no_grad():
        gap = max((fused() - loop()).abs().max().item(), (loop_old() - loop()).abs().max().item())
    fns = {"loop_in_place": loop, "loop_out_of_place_old": loop_old, "tuneforge": fused}
    codes = {"loop_in_place": LOOP_IN_PLACE, "loop_out_of_place_old": LOOP_OLD}
    goal = {"loop_in_place": 1.25 if base else 1.3}
    update = 4 * tokens * d * r  # two rank-r products per row
    fwd = compare(interleaved({n: torch.no_grad()(f) for n, f in fns.items()}, repeats), "tuneforge",
                  update + (2 * tokens * d * d if base else 0), codes, goal)
    both = compare(interleaved({n: training(f, (x, lora_a, lora_b), g) for n, f in fns.items()}, repeats), "tuneforge",
                   3 * update + (4 * tokens * d * d if base else 0), codes, goal)
    return {"tokens": tokens, "d": d, "rank": r, "adapters": n_adapters, "base_product": base, "max_abs_diff": gap,
            "forward": fwd, "forward_backward": both}


def bench_pretrain_step(repeats: int, batch: int) -> dict:
    """One optimizer step of the ``tiny`` model on next-token loss, kernels against the reference path."""
    from tuneforge.models.transformer import Transformer, model_config

    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1))

    def step():
        logits = model(idx[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def reference():
        with kernels.reference_only():
            step()

    t = interleaved({"kernels": step, "reference": reference}, repeats)
    return {"model": "tiny", "batch": batch, "seq_len": cfg.max_seq_len, "kernels_ms": t["kernels"] * 1e3,
            "reference_ms": t["reference"] * 1e3, "ratio": t["reference"] / t["kernels"], "target": 1.1,
            "baseline": "the same step inside tuneforge.kernels.reference_only() (pure-torch ops)"}


def with_fractions(report: dict, peak: float) -> list:
    """Add each op row's fraction of the peak (in place); returns (name, GFLOP/s, fraction) for the summary."""
    rows = []
    for name, value in report.items():
        if isinstance(value, dict) and "gflops" in value:
            value["fraction_of_peak"] = value["gflops"] / peak
            rows.append((name, value["gflops"], value["fraction_of_peak"]))
        elif isinstance(value, dict):
            rows += [(f"{name}.{sub}", g, f) for sub, g, f in with_fractions(value, peak)]
    return rows


def run(args) -> dict:
    q, n = args.quick, 512 if args.quick else 2048
    peaks = [sgemm_peak(n, args.repeats)]
    print(f"sgemm peak at the start: {peaks[0]:.1f} GFLOP/s (torch.mm {n}^2 float32, {torch.get_num_threads()} "
          "threads)")
    report = {}
    targets = {"forward": {"sdpa": 1.15}, "forward_backward": {"sdpa": 1.25}}
    report["flash_attention"] = at = bench_attention(2, 8, args.seq, 64, args.repeats, targets)
    for part in ("forward", "forward_backward"):
        say(f"flash_attention B2 H8 T{args.seq} D64 causal, {part}", at[part])
    tiny_t = {"forward": {"sdpa": 1.0}, "forward_backward": {"sdpa": 1.0}}
    report["flash_attention_tiny"] = tiny = bench_attention(2 if q else 16, 4, 64 if q else 256, 32, args.repeats,
                                                             tiny_t)
    for part in ("forward", "forward_backward"):
        say(f"flash_attention (tiny model) B{tiny['B']} H4 T{tiny['T']} D32 causal, {part}", tiny[part])
    report["packed_attention"] = pk = bench_packed(1 if q else 2, 2 if q else 8, 256 if q else 2048, 64, args.repeats)
    say(f"packed attention, documents {pk['documents']} in rows of {pk['T']}, fwd+bwd", pk["forward_backward"])
    peaks.append(sgemm_peak(n, args.repeats))
    report["lora_linear"] = r = bench_lora(args.tokens, args.d, args.rank, args.repeats)
    say(f"lora_linear fwd+bwd, tokens {args.tokens}, d {args.d}, rank {args.rank}", r)
    report["bottleneck_adapter"] = a = bench_bottleneck(args.tokens, args.d, args.bottleneck, args.repeats)
    say(f"bottleneck_adapter fwd+bwd, tokens {args.tokens}, d {args.d}, bottleneck {args.bottleneck}", a)
    report["multi_lora_linear"] = {}
    for with_base in (False, True):
        mr = bench_multi_lora(args.tokens, args.d, args.rank, args.adapters, args.repeats, base=with_base)
        report["multi_lora_linear"]["with_base" if with_base else "update_only"] = mr
        label = "with the base product" if with_base else "the updates alone"
        for part in ("forward", "forward_backward"):
            say(f"multi_lora_linear {args.adapters} adapters, {args.tokens} rows interleaved, {label}, {part}",
                mr[part])
    report["pretrain_step"] = ps = bench_pretrain_step(args.repeats, batch=2 if q else 16)
    print(f"tiny pretrain step (batch {ps['batch']} x {ps['seq_len']}): kernels {ps['kernels_ms']:.1f} ms, reference "
          f"path {ps['reference_ms']:.1f} ms, ratio {ps['ratio']:.2f}x (target >= 1.1x)")
    peaks.append(sgemm_peak(n, args.repeats))
    report["sgemm_peak_gflops"], report["sgemm_peaks_measured"] = max(peaks), peaks
    print(f"sgemm peak: {max(peaks):.1f} GFLOP/s, the best of {', '.join(f'{p:.1f}' for p in peaks)} (start, middle, "
          "end); each op's useful GFLOP/s (median time) and its fraction of that peak:")
    for name, gflops, fraction in with_fractions(report, max(peaks)):
        print(f"    {name.replace('.tuneforge', '')}: {gflops:.1f} GFLOP/s = {fraction:.0%}")
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024, help="attention sequence length T")
    ap.add_argument("--contention", action="store_true", help="run with one competing busy process")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats: checks the script, not the speed")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.tokens, args.d, args.rank, args.bottleneck, args.adapters = 2, 256, 128, 4, 16, 4
        args.seq = 96
    state = native.status()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, load average {load:.2f} at start; kernels: {state['how'] or state['why']}"
          f"{'; WITH one competing busy process' if args.contention else ''}")
    with contention(args.contention) as competitor:
        report = run(args)
    report.update(benchmark="kernels", backend=kernels.backend(), contention=competitor is not None,
                  load_average_at_start=load, threads=torch.get_num_threads())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
