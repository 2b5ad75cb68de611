"""The compiled ops against their pure-torch twins: parity on random shapes (forward and gradients), gradcheck in
float64, and torch.library.opcheck (schema, fake/meta implementation, autograd registration)."""
import pytest
import torch
from cuda_checks import cuda, worst

from tuneforge.kernels import native
from tuneforge.kernels.reference import lora_linear_reference

pytestmark = pytest.mark.skipif(not native.load(), reason=f"compiled kernels unavailable: {native.status()['why']}")


def _same_gradients(out, want, inputs, twins):
    """Send one random gradient back through the op's output and through the reference's; each input's gradient
    (None inputs skipped) must match its twin's."""
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    for got, ref in zip(inputs, twins):
        if got is not None:
            torch.testing.assert_close(got.grad, ref.grad, rtol=1e-4, atol=1e-5)


def _lora_inputs(shape, d_in, d_out, r, *, bias=True, weight=True, dtype=torch.float32, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return (make(*shape, d_in), make(d_out, d_in) if weight else None, make(d_out) if bias and weight else None,
            make(r, d_in), make(d_out, r))


@pytest.mark.parametrize("shape,d_in,d_out,r", [((7,), 16, 24, 4), ((3, 5), 33, 17, 1), ((2, 1, 4), 8, 8, 8)])
@pytest.mark.parametrize("bias,weight", [(True, True), (False, True), (False, False)])
def test_lora_linear_matches_the_reference_forward_and_gradients(shape, d_in, d_out, r, bias, weight):
    inputs = _lora_inputs(shape, d_in, d_out, r, bias=bias, weight=weight)
    twins = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = torch.ops.tuneforge.lora_linear(*inputs, 0.7)
    want = lora_linear_reference(*twins, 0.7)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    _same_gradients(out, want, inputs, twins)


def test_lora_linear_gradcheck_float64():
    inputs = _lora_inputs((3, 2), 5, 4, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: torch.ops.tuneforge.lora_linear(*t, 0.5), inputs)


def test_lora_linear_skips_the_frozen_weight_gradient():
    x, w, b, a, bb = _lora_inputs((4,), 6, 5, 2)
    w.requires_grad_(False)
    b.requires_grad_(False)
    torch.ops.tuneforge.lora_linear(x, w, b, a, bb, 1.0).sum().backward()
    assert w.grad is None and b.grad is None and a.grad is not None and x.grad is not None


def test_lora_linear_opcheck():
    for args in (_lora_inputs((3, 4), 6, 5, 2), _lora_inputs((2,), 3, 3, 1, weight=False)):
        torch.library.opcheck(torch.ops.tuneforge.lora_linear.default, (*args, 0.25))


def test_a_nan_input_is_not_hidden():
    x, w, b, a, bb = _lora_inputs((2,), 4, 3, 2, grad=False)
    x[0, 1] = float("nan")
    out = torch.ops.tuneforge.lora_linear(x, w, b, a, bb, 1.0)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


def _adapter_inputs(shape, C, m, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(*shape, C), make(m, C), make(m), make(C, m), make(C)


@pytest.mark.parametrize("shape,C,m", [((7,), 16, 4), ((3, 5), 33, 1), ((2, 1, 4), 8, 8)])
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("residual", [True, False])
def test_bottleneck_adapter_matches_the_reference_forward_and_gradients(shape, C, m, activation, residual):
    from tuneforge.kernels.reference import bottleneck_adapter_reference

    inputs = _adapter_inputs(shape, C, m)
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    out = torch.ops.tuneforge.bottleneck_adapter(*inputs, activation, residual)[0]
    want = bottleneck_adapter_reference(*twins, activation, residual)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    _same_gradients(out, want, inputs, twins)


def test_bottleneck_adapter_gradcheck_and_opcheck():
    inputs = _adapter_inputs((3, 2), 5, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: torch.ops.tuneforge.bottleneck_adapter(*t, "silu", True)[0], inputs)
    for residual in (True, False):
        torch.library.opcheck(torch.ops.tuneforge.bottleneck_adapter.default,
                              (*_adapter_inputs((2, 3), 6, 2), "gelu", residual))


def _multi_inputs(shape, A, r, d_in, d_out, *, weight=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    ids = torch.randint(-1, A, (shape[0],), generator=g)
    return (make(*shape, d_in), make(d_out, d_in) if weight else None, make(d_out) if weight else None,
            make(A, r, d_in), make(A, d_out, r)), torch.rand(A, generator=g, dtype=dtype) + 0.5, ids


@pytest.mark.parametrize("shape", [(9,), (6, 5), (4, 1, 3), (0, 3)])
@pytest.mark.parametrize("weight", [True, False])
def test_multi_lora_linear_matches_the_reference_forward_and_gradients(shape, weight):
    from tuneforge.kernels.reference import multi_lora_linear_reference

    inputs, scalings, ids = _multi_inputs(shape, 5, 3, 12, 7, weight=weight)
    twins = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = torch.ops.tuneforge.multi_lora_linear(*inputs, scalings, ids)
    want = multi_lora_linear_reference(*twins, scalings, ids)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if out.numel():
        _same_gradients(out, want, inputs, twins)


def test_multi_lora_linear_gradcheck_and_opcheck():
    inputs, scalings, ids = _multi_inputs((5, 2), 3, 2, 4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: torch.ops.tuneforge.multi_lora_linear(*t, scalings, ids), inputs)
    inputs, scalings, ids = _multi_inputs((6, 2), 3, 2, 5, 4)
    torch.library.opcheck(torch.ops.tuneforge.multi_lora_linear.default, (*inputs, scalings, ids))


def test_multi_lora_linear_refuses_an_id_past_the_adapters():
    inputs, scalings, _ = _multi_inputs((3,), 2, 2, 4, 3)
    with pytest.raises(RuntimeError, match="adapter id is >= the 2 adapters"):
        torch.ops.tuneforge.multi_lora_linear(*inputs, scalings, torch.tensor([0, 2, 1]))
    with pytest.raises(RuntimeError, match="or < -1"):
        torch.ops.tuneforge.multi_lora_linear(*inputs, scalings, torch.tensor([0, -2, 1]))


# ---- many rows: the ops cut their rows into chunks run as tasks (csrc/adapter_rows.h) where the build has OpenMP
# and torch more than one thread; these shapes give several chunks (and several pieces per adapter) there -------------

def _many_rows_cases():
    """(name, run(inputs) -> output, reference(inputs) -> output, inputs) with 1,100+ rows, small features."""
    from tuneforge.kernels.reference import (
        bottleneck_adapter_reference, lora_linear_reference, multi_lora_linear_reference,
    )

    lora = _lora_inputs((1100,), 24, 20, 4, seed=1)
    adapter = _adapter_inputs((550, 2), 24, 6, seed=2)
    multi, scalings, ids = _multi_inputs((700, 3), 3, 4, 24, 20, seed=3)  # 2,100 tokens, about 1/4 without adapter
    return [
        ("lora_linear", lambda *t: torch.ops.tuneforge.lora_linear(*t, 0.7), lambda *t: lora_linear_reference(*t, 0.7),
         lora),
        ("bottleneck_adapter", lambda *t: torch.ops.tuneforge.bottleneck_adapter(*t, "gelu", True)[0],
         lambda *t: bottleneck_adapter_reference(*t, "gelu", True), adapter),
        ("multi_lora_linear", lambda *t: torch.ops.tuneforge.multi_lora_linear(*t, scalings, ids),
         lambda *t: multi_lora_linear_reference(*t, scalings, ids), multi),
        ("multi_lora_linear_update_only", lambda x, _w, _b, a, bb: torch.ops.tuneforge.multi_lora_linear(
            x, None, None, a, bb, scalings, ids), lambda x, _w, _b, a, bb: multi_lora_linear_reference(
            x, None, None, a, bb, scalings, ids), multi),
    ]


def _grads(fn, inputs, g):
    """fn's output and every input's gradient for the output gradient g, on fresh copies of the inputs."""
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*copies)
    out.backward(g)
    return [out.detach()] + [t.grad for t in copies]


@pytest.mark.parametrize("case", range(4), ids=["lora", "bottleneck", "multi_lora", "multi_lora_update_only"])
def test_many_rows_match_the_reference_and_repeat_exactly(case):
    name, run, reference, inputs = _many_rows_cases()[case]
    g = torch.randn(run(*inputs).shape, generator=torch.Generator().manual_seed(5))
    got, want, again = _grads(run, inputs, g), _grads(reference, inputs, g), _grads(run, inputs, g)
    for a, b, c in zip(got, want, again):
        if a is None:  # an input the variant does not use (the update-only call's weight and bias)
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a, c), f"{name}: two runs differ (partials must be summed in a fixed order)"


def test_many_rows_agree_on_one_thread_and_on_all():
    """One thread runs each op as one chunk of whole-matrix products; several threads run it in chunks."""
    threads = torch.get_num_threads()
    for name, run, _, inputs in _many_rows_cases():
        g = torch.randn(run(*inputs).shape, generator=torch.Generator().manual_seed(6))
        chunked = _grads(run, inputs, g)
        torch.set_num_threads(1)
        try:
            whole = _grads(run, inputs, g)
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(chunked, whole):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def _multi_adapter_inputs(shape, A, m, C, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    tensors = (make(*shape, C), make(A, m, C), make(A, m), make(A, C, m), make(A, C))
    return tensors, torch.rand(A, generator=g, dtype=dtype) + 0.5, torch.randint(-1, A, (shape[0],), generator=g)


@pytest.mark.parametrize("shape", [(9,), (6, 5), (4, 1, 3), (0, 3)])
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_multi_bottleneck_adapter_matches_the_reference_forward_and_gradients(shape, activation):
    from tuneforge.kernels.reference import multi_bottleneck_adapter_reference

    tensors, scales, ids = _multi_adapter_inputs(shape, 4, 3, 10)
    twins = [t.detach().clone().requires_grad_() for t in tensors]
    out = torch.ops.tuneforge.multi_bottleneck_adapter(*tensors, scales, ids, activation)[0]
    want = multi_bottleneck_adapter_reference(*twins, scales, ids, activation)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if out.numel():
        _same_gradients(out, want, tensors, twins)


def test_multi_bottleneck_adapter_gradcheck_and_opcheck():
    tensors, scales, ids = _multi_adapter_inputs((5, 2), 3, 2, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.tuneforge.multi_bottleneck_adapter(*t, scales, ids, "gelu")[0], tensors)
    tensors, scales, ids = _multi_adapter_inputs((6, 2), 3, 2, 5)
    torch.library.opcheck(torch.ops.tuneforge.multi_bottleneck_adapter.default, (*tensors, scales, ids, "silu"))


# ---- CUDA kernels (csrc/cuda): run where a GPU and a CUDA build are present, skipped elsewhere -------------------

@cuda
@pytest.mark.parametrize("shape", [(9,), (6, 5), (33, 7)])
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_multi_lora_linear_matches_the_reference(shape, weight, dtype):
    from tuneforge.kernels.reference import multi_lora_linear_reference

    inputs, scalings, ids = _multi_inputs(shape, 16, 8, 96, 72, weight=weight, dtype=torch.float64, seed=3)
    grad = torch.randn(*shape, 72, dtype=torch.float64)

    def run(fn, dt, device):
        ins = [t.detach().to(device, dt).requires_grad_() if t is not None else None for t in inputs]
        out = fn(*ins, scalings.to(device, dt), ids.to(device))
        out.backward(grad.to(device, dt))
        return [out.detach().double().cpu()] + [t.grad.double().cpu() for t in ins if t is not None]

    truth = run(multi_lora_linear_reference, torch.float64, "cpu")
    ours = run(torch.ops.tuneforge.multi_lora_linear, dtype, "cuda")
    theirs = run(multi_lora_linear_reference, dtype, "cuda")
    for got, pytorch, want in zip(ours, theirs, truth):
        assert torch.isfinite(got).all()
        assert worst(got, want) <= 4 * worst(pytorch, want) + 1e-4


@cuda
def test_cuda_multi_lora_linear_opcheck():
    inputs, scalings, ids = _multi_inputs((6, 2), 3, 2, 5, 4)
    moved = [t.detach().cuda().requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.tuneforge.multi_lora_linear.default, (*moved, scalings.cuda(), ids.cuda()))
