"""Which path each kernel op takes (``tuneforge.kernels.route``) and the torch-SDPA path of attention.

No GPU here: routing is a pure function, so every CUDA branch is checked by its arguments; the SDPA path is the
same code on CPU and CUDA tensors, so its numerics are checked on CPU tensors against ``attention_reference``.
"""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge import kernels
from tuneforge.kernels import sdpa
from tuneforge.kernels.fused import CUDA_HEAD_SIZES
from tuneforge.kernels.reference import attention_reference, document_ids

ROOT = Path(__file__).resolve().parents[1]
OPS = ("flash_attention", "lora_linear", "multi_lora_linear", "bottleneck_adapter", "multi_bottleneck_adapter",
       "linear_cross_entropy")


# ---- route(): every branch --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, has_kernel, dtype, head_dim, packed", itertools.product(
    ("auto", "cpp"), (True, False), (torch.float32, torch.bfloat16, torch.float16, torch.float64, None),
    (None, 16, 64, 80, 96, 128, 256), (False, True)))
def test_attention_on_cuda_never_runs_the_reference_and_the_kernel_only_when_forced(mode, has_kernel, dtype,
                                                                                    head_dim, packed):
    path, why = kernels.route("flash_attention", "cuda", mode=mode, has_kernel=has_kernel, dtype=dtype,
                              head_dim=head_dim, packed=packed)
    kernel_fits = (has_kernel and not packed and dtype != torch.float64
                   and (head_dim is None or head_dim in CUDA_HEAD_SIZES))
    assert path == ("cpp" if mode == "cpp" and kernel_fits else "sdpa"), why
    assert why
    if mode == "auto":
        assert "default on CUDA" in why and "TUNEFORGE_KERNELS=cpp" in why
    elif path == "sdpa":  # forced, but this call has no kernel: the reason names what is missing
        assert "TUNEFORGE_KERNELS=cpp, but" in why
        if has_kernel and not packed and head_dim not in (None, *CUDA_HEAD_SIZES):
            assert f"head size {head_dim}" in why
        if has_kernel and packed:
            assert "cu_seqlens" in why


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_reference_mode_runs_every_reference_everywhere(op, device):
    assert kernels.route(op, device, mode="reference", has_kernel=True)[0] == "reference"


def test_attention_on_the_cpu_is_the_compiled_kernel_else_sdpa_never_the_reference():
    for mode in ("auto", "cpp"):
        for packed in (False, True):
            assert kernels.route("flash_attention", "cpu", mode=mode, has_kernel=True, packed=packed)[0] == "cpp"
            path, why = kernels.route("flash_attention", "cpu", mode=mode, has_kernel=False, packed=packed)
            assert path == "sdpa" and "(B, H, Tq, Tk)" in why
    assert kernels.route("flash_attention", "mps", has_kernel=False)[0] == "sdpa"


@pytest.mark.parametrize("op", OPS[1:])
def test_the_lora_and_adapter_ops_run_their_kernel_where_one_is_registered(op):
    assert kernels.route(op, "cpu", has_kernel=True, dtype=torch.float64)[0] == "cpp"
    unproven = op in kernels.UNPROVEN_ON_CUDA  # a CUDA kernel no GPU has run: pure torch unless forced
    path, why = kernels.route(op, "cuda", has_kernel=True, dtype=torch.bfloat16)
    assert path == ("reference" if unproven else "cpp"), why
    if unproven:
        assert "TUNEFORGE_KERNELS=cpp" in why
    assert kernels.route(op, "cuda", mode="cpp", has_kernel=True, dtype=torch.bfloat16)[0] == "cpp"
    path, why = kernels.route(op, "cuda", has_kernel=True, dtype=torch.float16)
    assert path == "reference" and "float32/bfloat16" in why
    assert kernels.route(op, "cuda", has_kernel=False)[0] == "reference"


def test_routes_reports_every_op_on_every_device_with_a_reason():
    table = kernels.routes()
    assert set(table) == set(OPS)
    for op, per in table.items():
        assert set(per) == set(kernels.DEVICES)
        for device, (path, why) in per.items():
            assert path in kernels.PATHS and why, (op, device)
        if not torch.cuda.is_available():
            assert "no CUDA device here" in per["cuda"][1]
    assert table["flash_attention"]["cuda"][0] == "sdpa"  # the default, whatever is compiled
    short = kernels.backend()
    assert set(short) == set(OPS) and all(v.split("+")[0] == table[op]["cpu"][0] for op, v in short.items())


def test_the_face_runs_sdpa_on_the_cpu_when_no_kernel_is_loaded(monkeypatch):
    calls = []
    real = sdpa.attention
    monkeypatch.setattr(kernels, "_has_kernel", lambda op, device: False)
    monkeypatch.setattr(sdpa, "attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setattr(kernels, "attention_reference", lambda *a, **kw: pytest.fail("the reference ran"))
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out = kernels.flash_attention(q, k, v)
    assert calls == [q.shape]
    torch.testing.assert_close(out, attention_reference(q, k, v))


def test_tuneforge_kernels_shows_each_op_per_device_and_why(capsys):
    from tuneforge.tools.cli import main

    assert main(["kernels", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ops"] == kernels.backend()
    for op in OPS:
        assert set(report["routes"][op]) == {"cpu", "cuda"}
        assert all(r["path"] in kernels.PATHS and r["why"] for r in report["routes"][op].values())
    assert main(["kernels"]) == 0
    text = capsys.readouterr().out
    assert "cuda  sdpa       default on CUDA" in text and "TUNEFORGE_KERNELS=" in text
    if report["loaded"]:  # the CPU attention's instruction set, chosen at run time
        assert report["cpu_isa"] == torch.ops.tuneforge.cpu_isa()
        assert f"CPU attention instruction set: {report['cpu_isa']}" in text


def _routes_in_a_process(mode: str) -> dict:
    code = "import json; from tuneforge import kernels; print(json.dumps(kernels.routes()))"
    env = dict(os.environ, TUNEFORGE_KERNELS=mode)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tuneforge_kernels_reference_routes_attention_to_the_reference_on_every_device():
    table = _routes_in_a_process("reference")
    assert {path for per in table.values() for path, _ in per.values()} == {"reference"}


# ---- the SDPA path against the reference, on CPU tensors ---------------------------------------------------------

@pytest.fixture
def strict_sdpa(monkeypatch):
    """SDPA that refuses a boolean mask with a row of only False: some CUDA backends give NaN for such a row, and
    the CPU's own SDPA hides it by returning zeros, so this is how the CPU tests see that no such row is sent.
    Records the keyword arguments of each call."""
    calls, real = [], sdpa._sdpa

    def checked(q, k, v, attn_mask=None, **kw):
        if isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool:
            assert attn_mask.any(-1).all(), "a row that sees no key reached SDPA"
        calls.append(dict(kw, attn_mask=attn_mask, heads=(q.size(1), k.size(1))))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sdpa, "_sdpa", checked)
    return calls


def _inputs(B, H, Hkv, Tq, Tk, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, t, D, generator=g, dtype=dtype) for h, t in ((H, Tq), (Hkv, Tk), (Hkv, Tk))]


def _compare(tensors, dtype, **kw):
    """sdpa.attention in ``dtype`` against the float64 reference, forward and gradients; bf16 may be at most 4x
    as far off as the reference itself run in bf16."""
    # seeded like the inputs: drawn from the global generator, the gradient depended on which tests ran before in
    # the worker, and about 1 draw in 70 put bf16's error just past the bound (0.0162 against 0.0150)
    grad = torch.randn(attention_reference(*tensors, **kw).shape, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1))

    def run(fn, dt):
        ins = [t.detach().to(dt).requires_grad_() for t in tensors]
        out = fn(*ins, **kw)
        out.backward(grad.to(dt))
        return [out.detach().double()] + [t.grad.double() for t in ins]

    truth, ours = run(attention_reference, torch.float64), run(sdpa.attention, dtype)
    yard = run(attention_reference, dtype)
    for got, want, base in zip(ours, truth, yard):
        assert torch.isfinite(got).all()
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
        else:
            assert (got - want).abs().max() <= 4 * (base - want).abs().max() + 1e-3
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq, Tk", [(9, 9), (1, 9), (4, 13), (1, 1)])
@pytest.mark.parametrize("H, Hkv", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_matches_the_reference(strict_sdpa, dtype, causal, Tq, Tk, H, Hkv):
    _compare(_inputs(2, H, Hkv, Tq, Tk, 16), dtype, causal=causal)
    call = strict_sdpa[-1]
    if causal and Tq == Tk > 1:
        assert call["is_causal"] and call["attn_mask"] is None  # the flash backend's form
    if Tq == 1 or not causal:
        assert call["attn_mask"] is None and not call.get("is_causal")
    if call["attn_mask"] is None and dtype == torch.bfloat16:  # the flash backend takes grouped k/v as they are
        assert call["enable_gqa"] == (Hkv != H) and call["heads"] == (H, Hkv)
    else:  # float32 or a mask: a backend without GQA, so k/v arrive expanded
        assert call["heads"] == (H, H) and not call.get("enable_gqa")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq, Tk", [(10, 10), (3, 10), (1, 10)])
def test_sdpa_padding_gives_zeros_where_a_query_sees_no_key(strict_sdpa, dtype, causal, Tq, Tk):
    mask = torch.rand(3, Tk, generator=torch.Generator().manual_seed(Tq)) > 0.3
    mask[0, :6] = False  # left padding: the first causal queries see nothing
    mask[1] = False  # a row of only padding
    mask[2] = True
    tensors = _inputs(3, 4, 2, Tq, Tk, 16, seed=Tq)
    out, dq, dk, dv = _compare(tensors, dtype, causal=causal, key_padding_mask=mask)
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    if causal and Tq == Tk:
        assert (out[0, :, :6] == 0).all() and (dq[0, :, :6] == 0).all()
    assert strict_sdpa, "SDPA was not called"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cu", [[0, 4, 4, 11, 17], [0, 17], [0, 5], [0, 0],
                                [[0, 3, 9, 17], [0, 16, 16, 16]], [[0, 0, 0, 0], [0, 2, 4, 6]]], ids=str)
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_packed_documents_match_the_reference(strict_sdpa, dtype, causal, cu, padded):
    mask = None
    if padded:
        mask = torch.ones(2, 17, dtype=torch.bool)
        mask[:, 2] = False
        mask[1, 10:] = False
    tensors = _inputs(2, 4, 2, 17, 17, 8, seed=len(str(cu)))
    out = _compare(tensors, dtype, causal=causal, key_padding_mask=mask, cu_seqlens=torch.tensor(cu))[0]
    past_the_end = document_ids(torch.tensor(cu), 2, 17) < 0  # (B, T)
    assert (out.transpose(1, 2)[past_the_end] == 0).all()


def test_packed_offsets_are_checked_and_reread_when_changed_in_place():
    q, k, v = _inputs(1, 2, 2, 8, 8, 8)
    cu = torch.tensor([0, 3, 8])
    first = sdpa.attention(q, k, v, cu_seqlens=cu)
    cu[1] = 5  # the same tensor, new contents: the host copy must not be stale
    torch.testing.assert_close(sdpa.attention(q, k, v, cu_seqlens=cu), attention_reference(q, k, v, cu_seqlens=cu))
    assert not torch.equal(first, sdpa.attention(q, k, v, cu_seqlens=cu))
    for bad, words in (([3, 8], "start at 0"), ([0, 5, 3], "never decrease"), ([0, 9], "at most at T = 8"),
                       ([[0, 8]] * 3, r"\(B, S \+ 1\)"), ([0], r"\(S \+ 1,\)")):
        with pytest.raises(ValueError, match=words):
            sdpa.attention(q, k, v, cu_seqlens=torch.tensor(bad))


def test_no_keys_gives_zeros_tied_to_the_inputs():
    q, k, v = (t.requires_grad_() for t in _inputs(2, 2, 2, 3, 0, 8))
    out = sdpa.attention(q, k, v, causal=False)
    assert out.shape == q.shape and (out == 0).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (dq == 0).all() and dk.shape == k.shape


# ---- hf: models load in bfloat16 on CUDA unless a dtype is asked for ----------------------------------------------

def test_hf_models_default_to_bfloat16_on_cuda_and_an_asked_dtype_wins(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tuneforge.models import hf
    from tuneforge.tools.hf_tiny import make_tiny

    folder = make_tiny(tmp_path / "llama", "llama", d_model=32, n_layers=1, n_heads=4, vocab_size=320)
    monkeypatch.setattr(hf.HFCausalLM, "to", lambda self, *a, **kw: self)  # no GPU here: loading is what is checked

    def loaded(**kw):
        model = hf.load(folder, **kw)
        return {p.dtype for p in model.parameters()}, model.config.dtype

    assert loaded() == ({torch.float32}, "float32")
    assert loaded(device="cpu") == ({torch.float32}, "float32")
    assert loaded(device="cuda") == loaded(device=torch.device("cuda", 1)) == ({torch.bfloat16}, "bfloat16")
    assert loaded(device="cuda", dtype="float32") == ({torch.float32}, "float32")
    assert loaded(device="cpu", dtype="bfloat16") == ({torch.bfloat16}, "bfloat16")


# ---- benchmarks/gpu_check.py runs on the CPU ----------------------------------------------------------------------

def test_gpu_check_runs_on_the_cpu_and_reports_json():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "gpu_check" and report["ok"] and report["quick"]
    parity = report["parity"]
    for op in OPS[1:5]:  # the LoRA and adapter ops (gpu_check does not yet cover linear_cross_entropy)
        assert parity[f"{op}/float32"]["ok"] and parity[f"{op}/bfloat16"]["ok"]
    faces = [k for k in parity if k.startswith("flash_attention/face/")]
    assert {k.split("/")[2] for k in faces} >= {"causal", "gqa", "padded", "packed_1d", "packed_2d_padded", "head80"}
    assert all(parity[k]["ok"] and parity[k]["worst"] <= parity[k]["bound"] for k in faces)
    assert set(report["timings"]) == {"attention", "adapters"} and report["matmul_peak_tflops"]["float32"] > 0
    assert all(row["ms"] > 0 and row["baseline_ms"] > 0 for rows in report["timings"].values()
               for row in rows.values() if isinstance(row, dict))
