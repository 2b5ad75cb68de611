"""silu_mul (kernels/gated.py) equals its twin and keeps two tensors, not three; Hugging Face SwiGLU MLPs use it
under tuneforge's attention and give transformers' numbers."""
from __future__ import annotations

import pytest
import torch

from tuneforge.kernels import silu_mul
from tuneforge.kernels.reference import silu_mul_reference


def _saved(fn, *args):
    """Bytes of distinct storages autograd keeps for the backward of fn(*args)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(seen.values())


@pytest.mark.parametrize("shape", [(3, 7, 11), (1, 1), (5, 64)])
def test_forward_and_gradients_equal_the_twin(shape):
    g = torch.Generator().manual_seed(sum(shape))
    gate, up = (torch.randn(*shape, generator=g) * 3).requires_grad_(), torch.randn(*shape, generator=g).requires_grad_()
    grad = torch.randn(*shape, generator=g)
    out = silu_mul(gate, up)
    want = silu_mul_reference(gate, up)
    assert torch.allclose(out, want, atol=1e-6)
    got = torch.autograd.grad(out, (gate, up), grad)
    expected = torch.autograd.grad(want, (gate, up), grad)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_()
    up = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(silu_mul, (gate, up))
    assert torch.autograd.gradgradcheck(silu_mul_reference, (gate, up))  # the twin, as the oracle


def test_only_one_input_needing_a_gradient():
    gate, up = torch.randn(5, 8).requires_grad_(), torch.randn(5, 8)
    (silu_mul(gate, up) * 2).sum().backward()
    want = torch.autograd.grad((silu_mul_reference(gate, up) * 2).sum(), gate)[0]
    assert torch.allclose(gate.grad, want, atol=1e-6) and up.grad is None


def test_it_keeps_two_tensors_where_torch_ops_keep_three():
    gate, up = torch.randn(64, 256).requires_grad_(), torch.randn(64, 256).requires_grad_()
    _, mine = _saved(silu_mul, gate, up)
    _, theirs = _saved(silu_mul_reference, gate, up)
    one = gate.numel() * 4
    assert mine == 2 * one and theirs == 3 * one


def test_shapes_must_match():
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(torch.randn(2, 3), torch.randn(2, 4))


def test_hf_llama_mlps_use_it_and_match_transformers(tmp_path):
    pytest.importorskip("transformers")
    import transformers
    from tuneforge.models import hf
    from tuneforge.tools.hf_tiny import make_tiny

    folder = make_tiny(tmp_path / "llama", "llama", train_steps=0, d_model=32, n_layers=2, n_heads=4, context=64,
                       vocab_size=320)
    model = hf.load(folder).train()
    eager = hf.load(folder, attn="eager").train()
    assert all("forward" in vars(block.mlp) for block in model.blocks)  # tuneforge's attention: fused
    assert not any("forward" in vars(block.mlp) for block in eager.blocks)  # transformers' own code untouched
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    want = ref(input_ids=ids).logits.logsumexp(-1).mean()
    want.backward()
    assert torch.allclose(loss, want, atol=1e-5)
    mine = model.blocks[0].mlp.gate_proj.weight.grad
    theirs = ref.model.layers[0].mlp.gate_proj.weight.grad
    assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4)
