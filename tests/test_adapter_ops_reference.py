"""The pure-torch adapter/LoRA ops (the oracle the fused kernels of the kernels issue are checked against):
each against the plainest per-row formula, on random shapes, forward and gradients, and gradcheck in float64."""
import pytest
import torch
import torch.nn.functional as F

from tuneforge import kernels


def _lora_tensors(A, r, d_in, d_out, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return make(d_out, d_in), make(d_out), make(A, r, d_in), make(A, d_out, r), make(A).abs() + 0.5


@pytest.mark.parametrize("shape", [(5, 7), (3, 1), (4, 0)])
@pytest.mark.parametrize("d_in,d_out,r", [(16, 24, 4), (9, 5, 1)])
def test_multi_lora_equals_each_row_with_its_own_adapter(shape, d_in, d_out, r):
    N, T = shape
    w, b, la, lb, s = _lora_tensors(3, r, d_in, d_out)
    x = torch.randn(N, T, d_in)
    ids = torch.randint(-1, 3, (N,))
    out = kernels.multi_lora_linear(x, w, b, la, lb, s, ids)
    for n in range(N):
        i = int(ids[n])
        want = F.linear(x[n], w, b)
        if i >= 0:
            want = kernels.lora_linear(x[n], w, b, la[i], lb[i], float(s[i]))
        torch.testing.assert_close(out[n], want, rtol=1e-5, atol=1e-5)


def test_lora_linear_is_the_formula_and_weight_none_is_the_update_alone():
    w, b, la, lb, _ = _lora_tensors(1, 3, 8, 6)
    x = torch.randn(2, 4, 8)
    want = x @ w.T + b + 0.5 * (x @ la[0].T) @ lb[0].T
    torch.testing.assert_close(kernels.lora_linear(x, w, b, la[0], lb[0], 0.5), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.lora_linear(x, None, None, la[0], lb[0], 0.5), want - x @ w.T - b,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", sorted(kernels.ACTIVATIONS))
def test_multi_bottleneck_equals_each_row_with_its_own_adapter(activation):
    g = torch.Generator().manual_seed(1)
    A, m, C, N, T = 3, 5, 12, 6, 7
    wd, bd, wu, bu = (torch.randn(*s, generator=g) for s in ((A, m, C), (A, m), (A, C, m), (A, C)))
    scales = torch.tensor([1.0, 0.5, 2.0])
    h = torch.randn(N, T, C, generator=g)
    ids = torch.tensor([0, 2, -1, 1, 2, 0])
    out = kernels.multi_bottleneck_adapter(h, wd, bd, wu, bu, scales, ids, activation)
    for n in range(N):
        i = int(ids[n])
        want = torch.zeros(T, C) if i < 0 else scales[i] * kernels.bottleneck_adapter(
            h[n], wd[i], bd[i], wu[i], bu[i], activation, residual=False)
        torch.testing.assert_close(out[n], want, rtol=1e-5, atol=1e-5)
    full = kernels.bottleneck_adapter(h, wd[0], bd[0], wu[0], bu[0], activation, residual=True)
    torch.testing.assert_close(full - h, kernels.bottleneck_adapter(h, wd[0], bd[0], wu[0], bu[0], activation,
                                                                     residual=False))


def test_gradcheck_float64():
    w, b, la, lb, s = _lora_tensors(2, 2, 4, 3, dtype=torch.float64)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    ids = torch.tensor([1, -1, 0])
    inputs = [t.requires_grad_() for t in (x, w, b, la, lb)]
    assert torch.autograd.gradcheck(lambda *t: kernels.multi_lora_linear(*t, s, ids), inputs)
    assert torch.autograd.gradcheck(lambda x, w, b, a, bb: kernels.lora_linear(x, w, b, a[0], bb[0], 0.7), inputs)
    g = torch.Generator().manual_seed(2)
    wd, bd, wu, bu = (torch.randn(*sh, generator=g, dtype=torch.float64).requires_grad_()
                      for sh in ((2, 3, 4), (2, 3), (2, 4, 3), (2, 4)))
    h = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    scales = torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *t: kernels.multi_bottleneck_adapter(*t, scales, ids, "gelu"), [h, wd, bd, wu, bu])
    assert torch.autograd.gradcheck(
        lambda h, a, c, d, e: kernels.bottleneck_adapter(h, a[0], c[0], d[0], e[0], "silu"), [h, wd, bd, wu, bu])


def test_lower_ranks_zero_padded_are_exact():
    w, b, la, lb, s = _lora_tensors(2, 4, 8, 8)
    la[1, 2:] = 0  # adapter 1 has rank 2, padded to 4
    lb[1, :, 2:] = 0
    x = torch.randn(2, 3, 8)
    out = kernels.multi_lora_linear(x, w, b, la, lb, s, torch.tensor([1, 1]))
    want = kernels.lora_linear(x, w, b, la[1, :2], lb[1, :, :2], float(s[1]))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
