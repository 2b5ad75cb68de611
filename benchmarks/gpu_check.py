"""One command to check tuneforge's ops on a GPU: parity, opcheck and timings, in under five minutes on an H100/H200.

    python benchmarks/gpu_check.py                      # CUDA, full sizes
    python benchmarks/gpu_check.py --device cpu --quick # the same checks on the CPU at small sizes (a smoke test)

1. Parity, forward and gradients, of every op against float64 truth from its pure-torch reference on the CPU:
   ``flash_attention`` through the face (SDPA on CUDA) and the project's kernel (``fused.attention``, what
   ``TUNEFORGE_KERNELS=cpp`` runs) over causal / full, Tq < Tk, one query, grouped-query k/v, padding with rows
   that see no key, packed documents (1-D and per-row offsets), a head size the CUDA kernel lacks; the LoRA and
   adapter ops through the face. Bound: 4x the error of the reference run in the same dtype on the device, plus
   a floor (1e-3 of the largest true value in float32, admitting TF32 inside torch's kernels; 1e-2 in bf16). A
   wrong mask or head mapping gives errors of the order of the values themselves, far above that.
2. ``torch.library.opcheck`` on the compiled ops registered for the device.
3. Timings (CUDA events, warm-up, median; interleaved): attention bf16 B4 H16 T4096 D128 causal, forward and
   forward + backward, through the face against SDPA's flash backend; a grouped-query case (4 k/v heads, SDPA
   ``enable_gqa``) and a padded case (SDPA with the equivalent boolean mask); the project's forced kernel against
   SDPA flash; the LoRA and adapter ops against the eager PyTorch a user would write (cuBLAS), the multi-adapter
   ops against an in-place ``index_add_`` loop over adapters (row indices precomputed: no host syncs). Each
   prints TFLOP/s and the fraction of the torch.matmul peak measured in the same run (bf16, and fp32 without TF32).

The last line printed is one JSON object. Exit status 1 when a parity check or opcheck fails, 2 when the device
is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from tuneforge import kernels
from tuneforge.kernels import fused, native, reference

FLOOR = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


# ---- parity -------------------------------------------------------------------------------------------------------

def _run(fn, tensors, static, grad, dtype, device):
    """fn(*tensors, *static) in ``dtype`` on ``device``: [output, gradient of each tensor] in float64 on the CPU."""
    ins = [t.detach().to(device, dtype).requires_grad_() for t in tensors]
    args = [s.to(device, dtype) if torch.is_tensor(s) and s.is_floating_point() else
            s.to(device) if torch.is_tensor(s) else s for s in static]
    out = fn(*ins, *args)
    out.backward(grad.to(device, dtype))
    cpu = lambda t: t.detach().double().cpu()  # noqa: E731
    return [cpu(out)] + [cpu(t.grad) if t.grad is not None else torch.zeros(t.shape, dtype=torch.float64)
                         for t in ins]


def parity(name, fn, ref, tensors, static, dtype, device, *, blind_rows=None) -> dict:
    """Worst error of ``fn`` against float64 CPU truth, with the bound it must meet (see the module docstring)."""
    g = torch.Generator().manual_seed(len(name))
    probe = ref(*tensors, *static)
    grad = torch.randn(probe.shape, generator=g, dtype=torch.float64)
    try:
        truth = _run(ref, tensors, static, grad, torch.float64, "cpu")
        yard = _run(ref, tensors, static, grad, dtype, device)
        ours = _run(fn, tensors, static, grad, dtype, device)
    except Exception as exc:  # a crash is a failure of this op, reported, not the end of the check
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    worst, bound, ok = 0.0, 0.0, True
    for got, base, want in zip(ours, yard, truth):
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        err = (got - want).abs().max().item() if want.numel() else 0.0
        lim = 4 * ((base - want).abs().max().item() if want.numel() else 0.0) + FLOOR[dtype] * scale
        ok = ok and bool(torch.isfinite(got).all()) and err <= lim
        worst, bound = max(worst, err), max(bound, lim)
    if blind_rows is not None:  # queries that see no key must be exactly zero
        ok = ok and bool((ours[0][blind_rows] == 0).all())
    return {"ok": ok, "worst": worst, "bound": bound}


def _attention_cases(quick: bool):
    """(label, B, H, Hkv, Tq, Tk, D, causal, padded, cu_seqlens)."""
    T = 40 if quick else 300
    cu1 = torch.tensor([0, 7, 7, T // 2, T - 3])  # an empty document and 3 positions past the end
    cu2 = torch.tensor([[0, 5, T // 3, T], [0, T - 1, T - 1, T - 1]])
    return [("causal", 2, 4, 4, T, T, 64, True, False, None), ("full", 2, 4, 4, T, T, 64, False, False, None),
            ("tq<tk", 2, 4, 4, 5, T, 64, True, False, None), ("one_query", 2, 4, 4, 1, T, 128, True, False, None),
            ("gqa", 2, 8, 2, T, T, 64, True, False, None), ("gqa_decode", 2, 8, 2, 3, T, 64, True, False, None),
            ("padded", 2, 4, 4, T, T, 64, True, True, None), ("padded_gqa_full", 2, 4, 2, T, T, 32, False, True, None),
            ("head80", 2, 4, 4, T, T, 80, True, False, None), ("packed_1d", 2, 4, 2, T, T, 64, True, False, cu1),
            ("packed_2d_padded", 2, 4, 4, T, T, 64, True, True, cu2)]


def _attention_fn(fn, causal):
    return lambda q, k, v, m, c: fn(q, k, v, causal=causal, key_padding_mask=m, cu_seqlens=c)


def attention_parity(device, quick) -> dict:
    results = {}
    cuda_kernel = device == "cuda" and kernels._has_kernel("flash_attention", "cuda")
    for label, B, H, Hkv, Tq, Tk, D, causal, padded, cu in _attention_cases(quick):
        g = torch.Generator().manual_seed(Tq + D + H)
        q, k, v = (torch.randn(B, h, t, D, generator=g, dtype=torch.float64) for h, t in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
        mask = None
        if padded:
            mask = torch.rand(B, Tk, generator=g) > 0.2
            mask[0, :Tk // 4] = False  # left padding: under the causal mask the first queries see no key
            mask[1] = False if cu is None else mask[1]  # a row of only padding
        ref = _attention_fn(reference.attention_reference, causal)
        blind = ref(q, k, v, mask, cu).eq(0).all(-1, keepdim=True).expand(B, H, Tq, D)  # rows that see no key
        kernel_takes = device == "cpu" and native.load() or cuda_kernel and cu is None and D in fused.CUDA_HEAD_SIZES
        for dtype in (torch.float32, torch.bfloat16):
            tag = f"{label}/{str(dtype)[6:]}"
            results[f"flash_attention/face/{tag}"] = parity(tag, _attention_fn(kernels.flash_attention, causal), ref,
                                                            [q, k, v], [mask, cu], dtype, device, blind_rows=blind)
            if kernel_takes:  # the project's kernel as TUNEFORGE_KERNELS=cpp runs it
                results[f"flash_attention/project_kernel/{tag}"] = parity(
                    tag, _attention_fn(fused.attention, causal), ref, [q, k, v], [mask, cu], dtype, device,
                    blind_rows=blind)
    return results


def adapter_parity(device, quick) -> dict:
    g = torch.Generator().manual_seed(5)
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    N, L, d, out, r, A, m = (6, 5, 48, 40, 8, 4, 12) if quick else (16, 33, 256, 192, 16, 8, 32)
    ids = torch.randint(-1, A, (N,), generator=g)
    scal = torch.rand(A, generator=g, dtype=torch.float64) + 0.5
    cases = {
        "lora_linear": (kernels.lora_linear, reference.lora_linear_reference,
                        [n(N, L, d), n(out, d), n(out), n(r, d), n(out, r) * 0.1], [2.0]),
        "multi_lora_linear": (kernels.multi_lora_linear, reference.multi_lora_linear_reference,
                              [n(N, L, d), n(out, d), n(out), n(A, r, d), n(A, out, r) * 0.1], [scal, ids]),
        "bottleneck_adapter": (kernels.bottleneck_adapter, reference.bottleneck_adapter_reference,
                               [n(N, L, d), n(m, d) * 0.2, n(m), n(d, m) * 0.2, n(d)], ["gelu", True]),
        "multi_bottleneck_adapter": (kernels.multi_bottleneck_adapter, reference.multi_bottleneck_adapter_reference,
                                     [n(N, L, d), n(A, m, d) * 0.2, n(A, m), n(A, d, m) * 0.2, n(A, d)],
                                     [scal, ids, "silu"]),
    }
    return {f"{op}/{str(dt)[6:]}": parity(op, fn, ref, ts, st, dt, device)
            for op, (fn, ref, ts, st) in cases.items() for dt in (torch.float32, torch.bfloat16)}


def opchecks(device) -> dict:
    """torch.library.opcheck of each compiled op that has a kernel for ``device`` (else "skipped")."""
    if not native.load():
        return {"all": "skipped: compiled kernels unavailable"}
    g = torch.Generator().manual_seed(3)
    n = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_()  # noqa: E731
    ids, scal = torch.tensor([0, -1, 1, 0], device=device), torch.tensor([1.5, 0.5], device=device)
    mask = torch.tensor([[True] * 8 + [False]] * 2, device=device)
    args = {"flash_attention_forward": (torch.ops.tuneforge.flash_attention_forward.default,
                                        (n(2, 2, 7, 32), n(2, 2, 9, 32), n(2, 2, 9, 32), True, mask, None, 0.25)),
            "lora_linear": (torch.ops.tuneforge.lora_linear.default, (n(4, 3, 8), n(6, 8), n(6), n(2, 8), n(6, 2), 2.0)),
            "multi_lora_linear": (torch.ops.tuneforge.multi_lora_linear.default,
                                  (n(4, 3, 8), n(6, 8), n(6), n(2, 2, 8), n(2, 6, 2), scal, ids)),
            "bottleneck_adapter": (torch.ops.tuneforge.bottleneck_adapter.default,
                                   (n(4, 8), n(3, 8), n(3), n(8, 3), n(8), "gelu", True)),
            "multi_bottleneck_adapter": (torch.ops.tuneforge.multi_bottleneck_adapter.default,
                                         (n(4, 2, 8), n(2, 3, 8), n(2, 3), n(2, 8, 3), n(2, 8), scal, ids, "relu"))}
    results = {}
    for name, (op, a) in args.items():
        if not kernels._has_kernel(name, device):
            results[name] = f"skipped: no {device} kernel"
            continue
        try:
            torch.library.opcheck(op, a)
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return results


# ---- timings ------------------------------------------------------------------------------------------------------

def timed(fns: dict, repeats: int, device: str, pick=statistics.median) -> dict:
    """Median (``pick``) seconds of each callable, interleaved, after one warm-up each (CUDA events on the GPU)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: pick(v) for k, v in times.items()}


def matmul_peak(device, quick, repeats) -> dict:
    """TFLOP/s of torch.matmul on square matrices: bf16, and fp32 with TF32 off (torch's default)."""
    size = 256 if quick else 8192
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        t = timed({"mm": lambda: torch.matmul(a, b)}, max(repeats, 5), device, pick=min)["mm"]  # the best: a peak
        out[str(dtype)[6:]] = 2 * size ** 3 / t / 1e12
    return out


def _row(ours_s, base_s, flops, peak) -> dict:
    tf = flops / ours_s / 1e12
    return {"ms": ours_s * 1e3, "baseline_ms": base_s * 1e3, "ratio": base_s / ours_s, "tflops": tf,
            "peak_fraction": tf / peak}


def _fwd_bwd(fn, inputs, grad):
    def step():
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    return step


def attention_timings(device, quick, repeats, peak) -> dict:
    """The face and the project's forced kernel against SDPA flash (or SDPA with the mask a user would build)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, T, D = (1, 4, 128, 32) if quick else (4, 16, 4096, 128)
    rows, g = {}, torch.Generator().manual_seed(11)
    for label, Hkv, padded in (("causal", H, False), ("gqa", H // 4, False), ("padded", H, True)):
        q, k, v = (torch.randn(B, h, T, D, generator=g).to(device, torch.bfloat16).requires_grad_()
                   for h in (H, Hkv, Hkv))
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)  # right padding, as unequal sequences have
        mask = (torch.arange(T)[None] < lengths[:, None]).to(device) if padded else None
        band = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        allowed = band if mask is None else band & mask[:, None, None, :]  # (T, T) or (B, 1, T, T)
        flops = 4 * D * H * (B * T * (T + 1) // 2 if mask is None else int(allowed.sum()))  # fwd: 2 matmuls

        def face():
            return kernels.flash_attention(q, k, v, causal=True, key_padding_mask=mask)

        def sdpa():
            if mask is not None:  # flash takes no mask: torch picks its memory-efficient backend
                return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)

        grad = torch.randn_like(q)
        with torch.no_grad():
            t = timed({"face": face, "sdpa": sdpa}, repeats, device)
        rows[f"{label}/forward"] = _row(t["face"], t["sdpa"], flops, peak)
        t = timed({"face": _fwd_bwd(face, (q, k, v), grad), "sdpa": _fwd_bwd(sdpa, (q, k, v), grad)}, repeats, device)
        rows[f"{label}/forward+backward"] = _row(t["face"], t["sdpa"], 3.5 * flops, peak)  # bwd = 2.5x fwd
        if device == "cuda" and label == "causal":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            _fwd_bwd(face, (q, k, v), grad)()
            rows["causal/face_extra_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        if label == "causal":
            rows.update(_project_kernel_timing(device, q, k, v, grad, flops, peak, repeats, sdpa))
    return rows


def _project_kernel_timing(device, q, k, v, grad, flops, peak, repeats, sdpa) -> dict:
    has = kernels._has_kernel("flash_attention", device) and (device == "cpu" or q.size(-1) in fused.CUDA_HEAD_SIZES)
    if not has:
        return {"causal/project_kernel": f"skipped: no project {device} kernel for this head size in this build"}

    def forced():
        return fused.attention(q, k, v, causal=True)

    step = _fwd_bwd(forced, (q, k, v), grad)
    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    once = time.perf_counter() - t0
    n = max(1, min(repeats, int(20 / max(once, 1e-9))))  # a slow kernel gets fewer repeats: the 5-minute budget
    with torch.no_grad():
        t = timed({"forced": forced, "sdpa": sdpa}, n, device)
    out = {"causal/project_kernel/forward": _row(t["forced"], t["sdpa"], flops, peak)}
    t = timed({"forced": step, "sdpa": _fwd_bwd(sdpa, (q, k, v), grad)}, n, device)
    out["causal/project_kernel/forward+backward"] = _row(t["forced"], t["sdpa"], 3.5 * flops, peak)
    return out


def adapter_timings(device, quick, repeats, peak, dtype) -> dict:
    """The LoRA and adapter ops through the face against eager PyTorch (cuBLAS on the GPU)."""
    M, d, r, A = (256, 128, 8, 4) if quick else (16384, 4096, 16, 16)
    m, N = d // 16, 64 if not quick else 8
    g = torch.Generator().manual_seed(2)
    p = lambda *s, grad=True: (torch.randn(*s, generator=g) * 0.05).to(device, dtype).requires_grad_(grad)  # noqa
    x, W, b = p(M, d), p(d, d, grad=False), p(d, grad=False)
    la, lb, wd, bd, wu, bu = p(r, d), p(d, r), p(m, d), p(m), p(d, m), p(d)
    LA, LB, WD, BD, WU, BU = p(A, r, d), p(A, d, r), p(A, m, d), p(A, m), p(A, d, m), p(A, d)
    ids = (torch.arange(N) % A).to(device)  # 16 adapters interleaved over the rows
    scal = (torch.rand(A, generator=g) + 0.5).to(device, dtype)
    x3 = x.detach().view(N, M // N, d).requires_grad_()
    groups = [(ids == a).nonzero().squeeze(1) for a in range(A)]  # once, outside the timed loop: no host syncs

    def lora_loop():
        out = F.linear(x3, W, b)
        for a, rows in enumerate(groups):
            out.index_add_(0, rows, F.linear(F.linear(x3.index_select(0, rows), LA[a]), LB[a]) * scal[a])
        return out

    def bottleneck_loop():
        out = torch.zeros_like(x3)
        for a, rows in enumerate(groups):
            z = F.gelu(F.linear(x3.index_select(0, rows), WD[a], BD[a]))
            out.index_add_(0, rows, F.linear(z, WU[a], BU[a]) * scal[a])
        return out

    lora_flops = 2 * M * d * d + 4 * M * r * d
    cases = {
        "lora_linear": (lambda: kernels.lora_linear(x, W, b, la, lb, 2.0),
                        lambda: F.linear(x, W, b) + F.linear(F.linear(x, la), lb) * 2.0, (x, la, lb),
                        lora_flops, 2 * (2 * M * d * d) + 3 * 4 * M * r * d),
        "bottleneck_adapter": (lambda: kernels.bottleneck_adapter(x, wd, bd, wu, bu, "gelu", True),
                               lambda: x + F.linear(F.gelu(F.linear(x, wd, bd)), wu, bu), (x, wd, bd, wu, bu),
                               4 * M * d * m, 3 * 4 * M * d * m),
        "multi_lora_linear": (lambda: kernels.multi_lora_linear(x3, W, b, LA, LB, scal, ids), lora_loop,
                              (x3, LA, LB), lora_flops, 2 * (2 * M * d * d) + 3 * 4 * M * r * d),
        "multi_bottleneck_adapter": (lambda: kernels.multi_bottleneck_adapter(x3, WD, BD, WU, BU, scal, ids),
                                     bottleneck_loop, (x3, WD, BD, WU, BU), 4 * M * d * m, 3 * 4 * M * d * m),
    }
    rows = {}
    for op, (face, eager, inputs, f_fwd, f_all) in cases.items():
        grad = torch.randn_like(face())
        with torch.no_grad():
            t = timed({"face": face, "eager": eager}, repeats, device)
        rows[f"{op}/forward"] = _row(t["face"], t["eager"], f_fwd, peak)
        t = timed({"face": _fwd_bwd(face, inputs, grad), "eager": _fwd_bwd(eager, inputs, grad)}, repeats, device)
        rows[f"{op}/forward+backward"] = _row(t["face"], t["eager"], f_all, peak)
    return rows


# ---- the command --------------------------------------------------------------------------------------------------

def _print_rows(title, rows):
    print(f"\n{title}")
    for name, row in rows.items():
        if isinstance(row, dict):
            print(f"  {name:<42} {row['ms']:9.3f} ms vs {row['baseline_ms']:9.3f} ms  ratio {row['ratio']:5.2f}x  "
                  f"{row['tflops']:7.2f} TFLOP/s  {100 * row['peak_fraction']:5.1f}% of matmul peak")
        else:
            print(f"  {name:<42} {row}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per candidate (default 10, quick 2)")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds after which timing sections are skipped")
    args = ap.parse_args(argv)
    device, repeats = args.device, args.repeats or (2 if args.quick else 10)
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, or "
              "try --device cpu --quick", file=sys.stderr)
        return 2
    start = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"gpu_check on {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"TUNEFORGE_KERNELS={native.mode()}; compiled kernels: {native.status()['how'] or native.status()['why']}")
    for op, per in kernels.routes().items():
        print(f"  {op:<26} {device}: {per[device][0]:<9} {per[device][1]}")

    checks = {**attention_parity(device, args.quick), **adapter_parity(device, args.quick)}
    print("\nparity against float64 CPU truth (forward and gradients; bound = 4x the reference's error in the same "
          "dtype on the device + a floor):")
    for key, r in checks.items():
        detail = r.get("error") or f"worst {r['worst']:.2e} <= bound {r['bound']:.2e}"
        print(f"  {'ok  ' if r['ok'] else 'FAIL'} {key:<52} {detail}")
    ops = opchecks(device)
    _print_rows("torch.library.opcheck:", ops)

    timings, peak = {}, matmul_peak(device, args.quick, repeats)
    print(f"\nmatmul peak measured here: bf16 {peak['bfloat16']:.1f} TFLOP/s, fp32 {peak['float32']:.1f} TFLOP/s")
    if time.perf_counter() - start < args.budget:
        timings["attention"] = attention_timings(device, args.quick, repeats, peak["bfloat16"])
        _print_rows("attention bf16 (ratio = baseline / tuneforge; baseline SDPA flash, padded: SDPA with the "
                    "boolean mask):", timings["attention"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if time.perf_counter() - start < args.budget:
        timings["adapters"] = adapter_timings(device, args.quick, repeats, peak[str(dtype)[6:]], dtype)
        _print_rows(f"LoRA and adapter ops {str(dtype)[6:]} (baseline: eager PyTorch; multi-adapter ops: in-place "
                    "index_add_ loop):", timings["adapters"])
    skipped = [s for s in ("attention", "adapters") if s not in timings]
    ok = all(r["ok"] for r in checks.values()) and not any(str(v).startswith("FAILED") for v in ops.values())
    seconds = time.perf_counter() - start
    print(f"\n{'PASS' if ok else 'FAIL'}: parity {sum(r['ok'] for r in checks.values())}/{len(checks)}, opcheck "
          f"{sum(v == 'ok' for v in ops.values())} ok; {seconds:.0f} s" + (f"; skipped (time): {skipped}" if skipped
                                                                           else ""))
    print(json.dumps({"benchmark": "gpu_check", "device": name, "torch": torch.__version__, "ok": ok,
                      "parity": checks, "opcheck": ops, "matmul_peak_tflops": peak, "timings": timings,
                      "routes": {op: per[device][0] for op, per in kernels.routes().items()},
                      "skipped": skipped, "seconds": seconds, "quick": args.quick}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
