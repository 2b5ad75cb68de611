import pytest
import torch
import torch.nn.functional as F

from tuneforge.kernels import backend, flash_attention


def sdpa(q, k, v, causal, mask):
    """torch's own attention with the same conventions (bottom-right causal, True = attend)."""
    Tq, Tk = q.size(-2), k.size(-2)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq) if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@pytest.mark.parametrize("Tq, Tk", [(1, 1), (7, 7), (13, 13), (1, 9), (5, 17)])
@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_torch_forward_and_backward(Tq, Tk, D, causal):
    torch.manual_seed(Tq * 100 + Tk + D)
    q = torch.randn(2, 3, Tq, D, requires_grad=True)
    k = torch.randn(2, 3, Tk, D, requires_grad=True)
    v = torch.randn(2, 3, Tk, D, requires_grad=True)
    out = flash_attention(q, k, v, causal=causal)
    ref = sdpa(q, k, v, causal, None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_padding_mask_and_fully_masked_rows_give_zeros_not_nan():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :3] = False  # left padding: causal queries 0..2 of row 0 see no key at all
    out = flash_attention(q, k, v, causal=True, key_padding_mask=mask)
    assert torch.all(out[0, :, :3] == 0) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 3:], sdpa(q, k, v, True, mask)[:, :, 3:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], sdpa(q, k, v, True, mask)[1], atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][0, :, :3] == 0)
    # Padded keys get no gradient: nothing attended to them.
    assert torch.all(grads[1][0, :, :3] == 0) and torch.all(grads[2][0, :, :3] == 0)


def test_a_batch_row_of_only_padding_is_zero_without_nan():
    q, k, v = (torch.randn(2, 2, 4, 16, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True] * 4, [False] * 4])
    out = flash_attention(q, k, v, causal=False, key_padding_mask=mask)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()
    torch.testing.assert_close(out[0], sdpa(q, k, v, False, mask)[0], atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    assert all(torch.isfinite(g).all() and torch.all(g[1] == 0) for g in grads)


def test_bad_shapes_are_clear_errors():
    q, k = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        flash_attention(q, k, k)
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attention(k, k, k, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))


def test_gradcheck_float64():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[False, True, True, True, True]])
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, key_padding_mask=mask), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, causal=False), (q, k, v))


def test_bf16_in_bf16_out_close_to_fp32():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 33, 32) for _ in range(3))
    out = flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), flash_attention(q, k, v), atol=3e-2, rtol=3e-2)


def test_scale_and_backend_report():
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    torch.testing.assert_close(flash_attention(q, k, v, scale=0.5), flash_attention(q * 0.5 * 8 ** 0.5, k, v))
    report = backend()
    assert set(report) == {"flash_attention", "lora_linear", "multi_lora_linear", "bottleneck_adapter",
                           "multi_bottleneck_adapter", "linear_cross_entropy"}
    from tuneforge.kernels import native

    loaded = native.load()
    assert report["lora_linear"].split("+")[0] == ("cpp" if loaded else "reference")
    # attention without the compiled kernels runs torch SDPA, not the (B, H, T, T) reference (unless forced)
    assert report["flash_attention"] == ("cpp" if loaded else "sdpa" if native.mode() == "auto" else "reference")


def test_reference_only_swaps_every_op_for_its_reference_and_restores_the_table():
    from tuneforge import kernels

    before = backend()
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    with pytest.raises(KeyError):
        with kernels.reference_only():
            assert set(backend().values()) == {"reference"}
            torch.testing.assert_close(flash_attention(q, k, v), kernels.attention_reference(q, k, v), rtol=0, atol=0)
            raise KeyError("leaves the block by an exception")
    assert backend() == before
