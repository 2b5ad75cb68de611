"""The engine's AdamW: the fused kernel where torch has one for the parameters, the same updates as torch's
default loop (what a hand-written training loop runs), and torch's default where it has none."""
import pytest
import torch

from tuneforge import TrainConfig
from tuneforge.engine.step import _fusable, make_optimizer
from tuneforge.models.transformer import Transformer, model_config


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(model_config("tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=32"))


def test_fused_adamw_makes_the_updates_of_torchs_default_loop():
    cfg = TrainConfig(lr=3e-3)
    ours, hand = _model(), _model()
    fused = make_optimizer(list(ours.parameters()), cfg)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(
        [{"params": [p for p in hand.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in hand.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    x = torch.randint(0, 200, (4, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, opt in ((ours, fused), (hand, loop)):
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(ours.named_parameters(), hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ours.tok_emb.weight, _model().tok_emb.weight)  # the steps did move the weights


@pytest.mark.parametrize("make, fusable", [
    (lambda: torch.nn.Parameter(torch.zeros(3)), True),
    (lambda: torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)), True),
    (lambda: torch.nn.Parameter(torch.zeros(3, device="meta")), False),  # a device without the fused kernel
])
def test_only_plain_tensors_on_a_cpu_or_cuda_are_fused(make, fusable):
    assert _fusable([make()]) is fusable
    assert _fusable([]) is False


def test_a_tensor_subclass_keeps_torchs_default():
    """FSDP2's sharded parameters are DTensors, a tensor subclass: they keep torch's default optimizer path."""
    class Sharded(torch.Tensor):
        pass

    assert not _fusable([torch.nn.Parameter(torch.zeros(3)).as_subclass(Sharded)])
    assert not _fusable([torch.nn.Parameter(torch.zeros(3)), torch.zeros(3).as_subclass(Sharded)])
