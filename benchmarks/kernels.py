"""tuneforge's compiled kernels against what a user would otherwise run, side by side in one run.

    python benchmarks/kernels.py [--repeats 7] [--tokens 4096] [--d 1024] [--rank 16]

Measured, each against its baseline (interleaved repeats, median; ratio = baseline / tuneforge, > 1: faster):
- ``flash_attention`` (B=2, H=8, T=1024, D=64, causal, float32) forward and forward + backward against
  ``torch.nn.functional.scaled_dot_product_attention`` (on the CPU its flash path) and against the eager
  matmul-softmax-matmul; targets >= 1.0x (forward) and >= 1.5x (forward + backward) against SDPA, >= 5x eager.
- ``lora_linear`` forward + backward (x requires grad, the base weight frozen as in a LoRA run) against eager
  PyTorch the PEFT way (``base(x) + lora_B(lora_A(x)) * scaling``), target >= 1.3x.
- ``bottleneck_adapter`` forward + backward against eager ``h + up(gelu(down(h)))``, target >= 1.5x.
- ``multi_lora_linear``, 16 adapters, rows interleaved, against a per-adapter loop (gather, two products,
  scatter-add); targets >= 4x forward, >= 3x forward + backward.
- A whole ``tiny`` pretrain training step (forward, loss, backward, AdamW) with the kernels against the same step on
  the pure-torch reference path (``tuneforge.kernels.reference_only()``), in one process.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from tuneforge import kernels
from tuneforge.kernels import native


def interleaved(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_lora(tokens: int, d: int, r: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, d, requires_grad=True)
    base = torch.nn.Linear(d, d).requires_grad_(False)
    lora_a = torch.nn.Linear(d, r, bias=False)
    lora_b = torch.nn.Linear(r, d, bias=False)
    torch.nn.init.normal_(lora_b.weight, std=0.02)
    s = 2.0
    g = torch.randn(tokens, d)  # the gradient a loss would send back (dense, like a real one)

    def eager():
        x.grad = lora_a.weight.grad = lora_b.weight.grad = None
        (base(x) + lora_b(lora_a(x)) * s).backward(g)

    def fused():
        x.grad = lora_a.weight.grad = lora_b.weight.grad = None
        kernels.lora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight, s).backward(g)

    with torch.no_grad():
        gap = (kernels.lora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight, s)
               - (base(x) + lora_b(lora_a(x)) * s)).abs().max().item()
    t = interleaved({"eager": eager, "tuneforge": fused}, repeats)
    return {"tokens": tokens, "d": d, "rank": r, "eager_ms": t["eager"] * 1e3, "tuneforge_ms": t["tuneforge"] * 1e3,
            "ratio": t["eager"] / t["tuneforge"], "max_abs_diff": gap, "target": 1.3}


def bench_bottleneck(tokens: int, d: int, m: int, repeats: int) -> dict:
    torch.manual_seed(0)
    h = torch.randn(tokens, d, requires_grad=True)
    down, up = torch.nn.Linear(d, m), torch.nn.Linear(m, d)
    torch.nn.init.normal_(up.weight, std=0.02)
    params = [h, *down.parameters(), *up.parameters()]
    g = torch.randn(tokens, d)

    def eager():
        for p in params:
            p.grad = None
        (h + up(torch.nn.functional.gelu(down(h)))).backward(g)

    def fused():
        for p in params:
            p.grad = None
        kernels.bottleneck_adapter(h, down.weight, down.bias, up.weight, up.bias, "gelu", True).backward(g)

    with torch.no_grad():
        gap = (kernels.bottleneck_adapter(h, down.weight, down.bias, up.weight, up.bias, "gelu", True)
               - (h + up(torch.nn.functional.gelu(down(h))))).abs().max().item()
    t = interleaved({"eager": eager, "tuneforge": fused}, repeats)
    return {"tokens": tokens, "d": d, "bottleneck": m, "eager_ms": t["eager"] * 1e3,
            "tuneforge_ms": t["tuneforge"] * 1e3, "ratio": t["eager"] / t["tuneforge"], "max_abs_diff": gap,
            "target": 1.5}


def bench_attention(B: int, H: int, T: int, D: int, repeats: int) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, D)
    scale = D ** -0.5
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # (T, T) keys after the query

    def eager(q, k, v):  # what a model without a fused kernel runs
        scores = (q @ k.transpose(-2, -1) * scale).masked_fill(future, float("-inf"))  # (B, H, T, T)
        return scores.softmax(-1) @ v

    fns = {"tuneforge": lambda q, k, v: kernels.flash_attention(q, k, v, causal=True),
           "sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
           "eager": eager}

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(q, k, v)
        return run

    def train(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(g)
        return run

    with torch.no_grad():
        gap = (fns["tuneforge"](q, k, v) - fns["sdpa"](q, k, v)).abs().max().item()
    tf = interleaved({name: forward(fn) for name, fn in fns.items()}, repeats)
    tb = interleaved({name: train(fn) for name, fn in fns.items()}, repeats)
    flops = 4 * B * H * T * T * D / 2  # causal: two (T x T x D) products, half of them needed
    ms = lambda t: {name: value * 1e3 for name, value in t.items()}  # noqa: E731
    return {"B": B, "H": H, "T": T, "D": D, "causal": True, "max_abs_diff_vs_sdpa": gap,
            "forward_ms": ms(tf), "forward_backward_ms": ms(tb),
            "forward_vs_sdpa": tf["sdpa"] / tf["tuneforge"], "forward_vs_eager": tf["eager"] / tf["tuneforge"],
            "fwd_bwd_vs_sdpa": tb["sdpa"] / tb["tuneforge"], "fwd_bwd_vs_eager": tb["eager"] / tb["tuneforge"],
            "forward_gflops": flops / tf["tuneforge"] / 1e9,
            "targets": {"forward_vs_sdpa": 1.0, "fwd_bwd_vs_sdpa": 1.5, "vs_eager": 5.0}}


def bench_pretrain_step(repeats: int, batch: int = 16) -> dict:
    """One optimizer step of the ``tiny`` model on next-token loss, kernels against the reference path."""
    from tuneforge.models.transformer import Transformer, model_config

    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1))

    def step():
        logits = model(idx[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def reference():
        with kernels.reference_only():
            step()

    t = interleaved({"kernels": step, "reference": reference}, repeats)
    return {"model": "tiny", "batch": batch, "seq_len": cfg.max_seq_len, "kernels_ms": t["kernels"] * 1e3,
            "reference_ms": t["reference"] * 1e3, "ratio": t["reference"] / t["kernels"]}


def bench_multi_lora(tokens: int, d: int, r: int, n_adapters: int, repeats: int, *, base: bool) -> dict:
    """Rows (tokens) interleaved over the adapters (row i uses adapter i % A), with or without the base product."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d, requires_grad=True)
    w = torch.randn(d, d) * 0.02 if base else None
    lora_a = (torch.randn(n_adapters, r, d) * 0.02).requires_grad_()
    lora_b = (torch.randn(n_adapters, d, r) * 0.02).requires_grad_()
    scalings = torch.full((n_adapters,), 2.0)
    ids = torch.arange(tokens) % n_adapters
    g = torch.randn(tokens, d)

    def looped():  # what a user writes without the op: per adapter, gather its rows, two products, scatter-add
        out = x @ w.T if base else torch.zeros(tokens, d)
        for a in range(n_adapters):
            rows = (ids == a).nonzero().squeeze(1)
            xs = x.index_select(0, rows)
            out = out.index_add(0, rows, (xs @ lora_a[a].T @ lora_b[a].T) * scalings[a])
        return out

    def fused():
        return kernels.multi_lora_linear(x, w, None, lora_a, lora_b, scalings, ids)

    def train(fn):
        def run():
            x.grad = lora_a.grad = lora_b.grad = None
            fn().backward(g)
        return run

    def infer(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    with torch.no_grad():
        gap = (fused() - looped()).abs().max().item()
    tf = interleaved({"looped": infer(looped), "tuneforge": infer(fused)}, repeats)
    tb = interleaved({"looped": train(looped), "tuneforge": train(fused)}, repeats)
    return {"tokens": tokens, "d": d, "rank": r, "adapters": n_adapters, "base_product": base, "max_abs_diff": gap,
            "forward": {"looped_ms": tf["looped"] * 1e3, "tuneforge_ms": tf["tuneforge"] * 1e3,
                        "ratio": tf["looped"] / tf["tuneforge"], "target": 4.0},
            "forward_backward": {"looped_ms": tb["looped"] * 1e3, "tuneforge_ms": tb["tuneforge"] * 1e3,
                                 "ratio": tb["looped"] / tb["tuneforge"], "target": 3.0}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024, help="attention sequence length T")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats: checks the script, not the speed")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.tokens, args.d, args.rank, args.bottleneck, args.adapters, args.seq = 2, 256, 128, 4, 16, 4, 96
    state = native.status()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; lora_linear runs: {kernels.backend()['lora_linear']} "
          f"({state['how'] or state['why']})")
    at = bench_attention(2, 8, args.seq, 64, args.repeats)
    f, fb = at["forward_ms"], at["forward_backward_ms"]
    print(f"flash_attention B=2 H=8 T={args.seq} D=64 causal fp32: forward tuneforge {f['tuneforge']:.1f} ms, SDPA "
          f"{f['sdpa']:.1f} ms ({at['forward_vs_sdpa']:.2f}x, target >= 1.0x), eager {f['eager']:.1f} ms "
          f"({at['forward_vs_eager']:.1f}x, target >= 5x); {at['forward_gflops']:.0f} GFLOP/s")
    print(f"flash_attention fwd+bwd: tuneforge {fb['tuneforge']:.1f} ms, SDPA {fb['sdpa']:.1f} ms "
          f"({at['fwd_bwd_vs_sdpa']:.2f}x, target >= 1.5x), eager {fb['eager']:.1f} ms ({at['fwd_bwd_vs_eager']:.1f}x, "
          f"target >= 5x); max |difference| vs SDPA {at['max_abs_diff_vs_sdpa']:.1e}")
    r = bench_lora(args.tokens, args.d, args.rank, args.repeats)
    print(f"lora_linear fwd+bwd, tokens {r['tokens']}, d {r['d']}, rank {r['rank']}: eager {r['eager_ms']:.1f} ms, "
          f"tuneforge {r['tuneforge_ms']:.1f} ms, ratio {r['ratio']:.2f}x (target >= {r['target']}x); "
          f"max |difference| {r['max_abs_diff']:.1e}")
    a = bench_bottleneck(args.tokens, args.d, args.bottleneck, args.repeats)
    print(f"bottleneck_adapter fwd+bwd, tokens {a['tokens']}, d {a['d']}, bottleneck {a['bottleneck']}: eager "
          f"{a['eager_ms']:.1f} ms, tuneforge {a['tuneforge_ms']:.1f} ms, ratio {a['ratio']:.2f}x (target >= "
          f"{a['target']}x); max |difference| {a['max_abs_diff']:.1e}")
    multi = {}
    for with_base in (True, False):
        mr = bench_multi_lora(args.tokens, args.d, args.rank, args.adapters, args.repeats, base=with_base)
        multi["with_base" if with_base else "update_only"] = mr
        label = "with the base product" if with_base else "the updates alone (weight=None)"
        print(f"multi_lora_linear, {args.adapters} adapters, {args.tokens} rows interleaved, d {args.d}, rank "
              f"{args.rank}, {label}: forward looped {mr['forward']['looped_ms']:.1f} ms / tuneforge "
              f"{mr['forward']['tuneforge_ms']:.1f} ms = {mr['forward']['ratio']:.2f}x (target >= 4x); fwd+bwd "
              f"{mr['forward_backward']['looped_ms']:.1f} / {mr['forward_backward']['tuneforge_ms']:.1f} ms = "
              f"{mr['forward_backward']['ratio']:.2f}x (target >= 3x); max |difference| {mr['max_abs_diff']:.1e}")
    ps = bench_pretrain_step(args.repeats, batch=2 if args.quick else 16)
    print(f"tiny pretrain step (batch {ps['batch']} x {ps['seq_len']}): kernels {ps['kernels_ms']:.1f} ms, reference "
          f"path {ps['reference_ms']:.1f} ms, ratio {ps['ratio']:.2f}x")
    print(json.dumps({"benchmark": "kernels", "backend": kernels.backend(), "flash_attention": at, "lora_linear": r,
                      "bottleneck_adapter": a, "multi_lora_linear": multi, "pretrain_step": ps}))


if __name__ == "__main__":
    main()
