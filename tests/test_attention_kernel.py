"""The compiled attention kernel (csrc/attention.cpp) against the pure-torch reference: every instruction-set path
the CPU has (AVX-512, AVX2, portable), grouped-query heads, packed documents (cu_seqlens), padding, strided KV-cache
views (the decode path reads them in place), float64 gradcheck and opcheck; the CUDA kernel where a GPU is."""
import os

import pytest
import torch
from cuda_checks import cuda, worst

from tuneforge.kernels import native
from tuneforge.kernels.reference import attention_reference

pytestmark = pytest.mark.skipif(not native.load(), reason=f"compiled kernels unavailable: {native.status()['why']}")


def _isas():
    """The instruction sets this CPU can run (the kernel refuses one it lacks)."""
    found = []
    for isa in ("avx512", "avx2", "scalar"):
        os.environ["TUNEFORGE_CPU_ISA"] = isa
        try:
            torch.ops.tuneforge.cpu_isa()
            found.append(isa)
        except RuntimeError:
            pass
        finally:
            del os.environ["TUNEFORGE_CPU_ISA"]
    return found


ISAS = _isas()
op = torch.ops.tuneforge.flash_attention_forward


def _inputs(B, H, Hkv, Tq, Tk, D, *, dtype=torch.float32, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=dtype)
    if strided:  # the filled slice of a preallocated cache: rows strided by the cache's length, not Tk
        k = torch.randn(B, Hkv, Tk + 7, D, generator=g, dtype=dtype)[:, :, :Tk]
        v = torch.randn(B, Hkv, Tk + 7, D, generator=g, dtype=dtype)[:, :, :Tk]
    else:
        k, v = (torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v, g


def _compare(q, k, v, g, *, causal, mask=None, cu=None, tol=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    twins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    scale = q.size(-1) ** -0.5
    out, lse = op(*leaves, causal, mask, cu, scale)
    want = attention_reference(*twins, causal=causal, key_padding_mask=mask, scale=scale, cu_seqlens=cu)
    grad = torch.randn(out.shape, generator=g, dtype=out.dtype)
    out.backward(grad)
    want.backward(grad)
    tol = tol or dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(out, want, **tol)
    for got, ref in zip(leaves, twins):
        torch.testing.assert_close(got.grad, ref.grad, **tol)
        assert torch.isfinite(got.grad).all()
    return out, lse


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CPU_ISA", request.param)
    assert torch.ops.tuneforge.cpu_isa() == request.param
    return request.param


SHAPES = [(2, 3, 3, 37, 37, 16), (2, 4, 2, 5, 70, 32), (1, 2, 1, 130, 130, 64), (2, 3, 3, 1, 9, 128),
          (1, 2, 2, 300, 300, 80), (1, 6, 2, 1, 1025, 64), (2, 4, 4, 3, 200, 24), (1, 2, 2, 530, 530, 64)]
# Every shape on the instruction set this CPU runs by default; the others (forced) on a few that cover their paths
# (tails, grouped heads, decoding, several key blocks), to keep the suite's time down.
CASES = [(ISAS[0], shape) for shape in SHAPES] + [(isa, SHAPES[i]) for isa in ISAS[1:] for i in (1, 3, 4, 5)]


@pytest.mark.parametrize("isa_name,shape", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_the_reference_on_every_instruction_set(monkeypatch, isa_name, shape, causal, padded):
    monkeypatch.setenv("TUNEFORGE_CPU_ISA", isa_name)
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, g = _inputs(B, H, Hkv, Tq, Tk, D, strided=Tq < 8, seed=Tq * 7 + D)
    mask = None
    if padded:
        mask = torch.rand(B, Tk, generator=g) > 0.3
        mask[-1] = False  # a batch row that sees no key: zeros, lse = -inf, zero gradients, never NaN
    out, lse = _compare(q, k, v, g, causal=causal, mask=mask)
    if padded:
        assert (out[-1] == 0).all() and torch.isneginf(lse[-1]).all()


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_documents_never_attend_across_a_boundary(isa, per_row, causal):
    B, T = 2, 211
    q, k, v, g = _inputs(B, 4, 2, T, T, 32, seed=3)
    if per_row:  # rows hold different numbers of documents: the shorter list repeats its last offset
        cu = torch.tensor([[0, 17, 120, 200, 200], [0, 64, 65, 150, 211]])
    else:
        cu = torch.tensor([0, 50, 51, 180, 209], dtype=torch.int32)
    out, _ = _compare(q, k, v, g, causal=causal, cu=cu)
    # Each document alone gives the same rows: nothing leaks in from its neighbours.
    row = cu[0] if per_row else cu
    for s, e in zip(row[:-1].tolist(), row[1:].tolist()):
        if e > s:
            alone, _ = op(q[:1, :, s:e], k[:1, :, s:e], v[:1, :, s:e], causal, None, None, 32 ** -0.5)
            torch.testing.assert_close(out[:1, :, s:e], alone, rtol=1e-5, atol=2e-6)
    assert (out[:1, :, int(row[-1]):] == 0).all()  # past the last document: nothing seen


def test_packed_documents_with_padding_together(isa):
    q, k, v, g = _inputs(2, 2, 2, 97, 97, 16, seed=5)
    mask = torch.rand(2, 97, generator=g) > 0.2
    _compare(q, k, v, g, causal=True, mask=mask, cu=torch.tensor([[0, 40, 97], [0, 10, 90]]))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Hkv", [(5, 2), (1, 1), (49, 2)])
def test_gradcheck_float64(causal, Tq, Hkv):
    """The kernel itself in float64 (exact exp2), grouped heads and packed documents included."""
    g = torch.Generator().manual_seed(7)
    Tk, D = max(Tq, 7), 16 if Tq < 8 else 4  # 49 rows: two query tiles, kept cheap (gradcheck perturbs each input)
    q = torch.randn(1, 2, Tq, D, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(1, Hkv, Tk, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    mask = torch.rand(1, Tk, generator=g) > 0.2
    assert torch.autograd.gradcheck(lambda *t: op(*t, causal, mask, None, 0.3)[0], (q, k, v))
    if Tq == Tk:
        cu = torch.tensor([0, Tq // 3, Tq])
        assert torch.autograd.gradcheck(lambda *t: op(*t, causal, None, cu, 0.3)[0], (q, k, v))


def test_opcheck():
    q, k, v = (torch.randn(1, 2, t, 16, requires_grad=True) for t in (7, 9, 9))
    kv = [torch.randn(1, 1, 9, 16, requires_grad=True) for _ in range(2)]
    for causal, mask in ((True, None), (False, torch.tensor([[True] * 8 + [False]]))):
        torch.library.opcheck(op.default, (q, k, v, causal, mask, None, 0.25))
        torch.library.opcheck(op.default, (q, *kv, causal, mask, None, 0.25))
    x = torch.randn(1, 2, 9, 16, requires_grad=True)
    torch.library.opcheck(op.default, (x, k, v, True, None, torch.tensor([0, 4, 9]), 0.25))


@pytest.mark.parametrize("Tq", [1, 60])
def test_the_face_reads_cache_views_in_place(Tq):
    """flash_attention hands a KV cache's strided slice to the kernel as it is: no copy of the cache on the way
    (decoding, Tq = 1, and the packed path alike), and the same numbers as on a contiguous copy."""
    from tuneforge.kernels import flash_attention

    q, k, v, _ = _inputs(1, 4, 2, Tq, 300, 32, strided=True)
    assert not k.is_contiguous()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = flash_attention(q, k, v, causal=True)
    copies = [e.key for e in prof.key_averages() if e.key in ("aten::contiguous", "aten::clone", "aten::copy_")]
    assert not copies
    torch.testing.assert_close(out, attention_reference(q, k.contiguous(), v.contiguous()), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("cu,match", [(torch.tensor([1, 5, 9]), "start at 0"), (torch.tensor([0, 6, 4, 9]), "never decrease"),
                                      (torch.tensor([0, 12]), "end at most")])
def test_bad_document_offsets_are_refused(cu, match):
    q, k, v, _ = _inputs(1, 2, 2, 9, 9, 16)
    with pytest.raises(RuntimeError, match=match):
        op(q, k, v, True, None, cu, 0.25)


def test_an_instruction_set_is_chosen_at_run_time(monkeypatch):
    assert torch.ops.tuneforge.cpu_isa() in ("avx512", "avx2", "scalar")
    monkeypatch.setenv("TUNEFORGE_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="use auto, avx512, avx2 or scalar"):
        torch.ops.tuneforge.cpu_isa()


def test_the_build_has_no_march_native():
    """A wheel built on one machine must run on another CPU: instruction sets are chosen at run time."""
    from tuneforge.kernels import build

    assert not any(flag.startswith("-march") for flag in build.CXX_FLAGS)


# ---- the CUDA kernel (csrc/cuda): where a GPU and a CUDA build are present, skipped elsewhere ---------------------

@cuda
@pytest.mark.parametrize("Tq,Tk", [(37, 37), (5, 70), (130, 130), (1, 9), (200, 333)])
@pytest.mark.parametrize("D", [16, 32, 64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_the_reference(Tq, Tk, D, causal, dtype):
    """Forward and gradients against the float64 reference; the error may be at most a small multiple of what
    PyTorch's own attention makes in the same dtype (so bfloat16 is judged by bfloat16's precision)."""
    g = torch.Generator().manual_seed(Tq * 1000 + D)
    base = [torch.randn(2, 3, t, D, generator=g, dtype=torch.float64) for t in (Tq, Tk, Tk)]
    mask = torch.rand(2, Tk, generator=g) > 0.3
    mask[1] = False
    grad = torch.randn(2, 3, Tq, D, generator=g, dtype=torch.float64)

    def run(fn, dt, device):
        ins = [t.to(device, dt).requires_grad_() for t in base]
        out = fn(*ins, mask.to(device))
        out.backward(grad.to(device, dt))
        return [out.detach().double().cpu()] + [t.grad.double().cpu() for t in ins]

    truth = run(lambda q, k, v, m: attention_reference(q, k, v, causal=causal, key_padding_mask=m), torch.float64,
                "cpu")
    ours = run(lambda q, k, v, m: op(q, k, v, causal, m, None, D ** -0.5)[0], dtype, "cuda")
    theirs = run(lambda q, k, v, m: attention_reference(q, k, v, causal=causal, key_padding_mask=m), dtype, "cuda")
    for got, pytorch, want in zip(ours, theirs, truth):
        assert torch.isfinite(got).all()
        assert worst(got, want) <= 4 * worst(pytorch, want) + 1e-5
    assert (ours[0][1] == 0).all()


@cuda
def test_cuda_kernel_opcheck():
    q, k, v = (torch.randn(1, 2, t, 32, device="cuda", requires_grad=True) for t in (7, 9, 9))
    for causal, mask in ((True, None), (False, torch.tensor([[True] * 8 + [False]], device="cuda"))):
        torch.library.opcheck(op.default, (q, k, v, causal, mask, None, 0.25))
