"""Losses and log-probs from hidden states and the head's weight (models/lm_loss.py) equal the logits path, and the
(B, T, V) logits are never made where the head is a plain linear map."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.models import routing
from tuneforge.models.lm_loss import hidden_logprobs, next_token_loss_of, plain_head, target_logprobs, token_losses
from tuneforge.models.transformer import Transformer, model_config
from tuneforge.rlhf.policy import model_logprobs, response_logprobs, sequence_logprobs, token_logprobs

MICRO = "tiny:n_layers=2,d_model=32,n_heads=4,max_seq_len=64"


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(model_config(MICRO)).eval()


def _ids(B=3, T=17, V=256, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _no_full_logits(model):
    """Fail if the head is run as a module (the path that makes (B, T, V) logits)."""
    return model.lm_head.register_forward_hook(lambda *a: pytest.fail("lm_head ran: the full logits were made"))


def test_the_loss_equals_cross_entropy_of_the_logits_with_gradients():
    model, ids = _model(), _ids()
    target = ids[:, 1:].clone()
    target[0, :5] = -100
    expected = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), target.reshape(-1), ignore_index=-100)
    want = torch.autograd.grad(expected, list(model.parameters()))
    hook = _no_full_logits(model)
    got = next_token_loss_of(model, ids[:, :-1], target)
    grads = torch.autograd.grad(got, list(model.parameters()))
    hook.remove()
    assert torch.allclose(got, expected, atol=1e-5)
    for g, w in zip(grads, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_equal_the_log_softmax_of_the_logits(temperature):
    model, ids = _model(), _ids()
    expected = token_logprobs(model(ids).float() / temperature, ids)  # (B, T-1)
    hook = _no_full_logits(model)
    got = target_logprobs(model, ids, temperature=temperature)
    from_hidden = hidden_logprobs(model, model.forward_hidden(ids), ids, temperature=temperature)
    hook.remove()
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(from_hidden, expected, atol=1e-5)
    start, last = torch.tensor([3, 5, 1]), torch.tensor([10, 16, 4])
    if temperature == 1.0:
        assert torch.allclose(sequence_logprobs(model, ids, start, last),
                              response_logprobs(model(ids), ids, start, last), atol=1e-4)


def test_a_head_that_is_not_a_plain_linear_keeps_the_logits_path():
    class Scaled(nn.Linear):  # a subclass may change what the head computes: it must run as itself
        def forward(self, x):
            return super().forward(x) * 2.0

    model, ids = _model(), _ids()
    head = Scaled(32, model.config.vocab_size, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    assert plain_head(model) is None
    expected = token_logprobs(model(ids).float(), ids)
    assert torch.allclose(target_logprobs(model, ids), expected, atol=1e-5)
    target = ids[:, 1:]
    hidden = model.forward_hidden(ids[:, :-1])
    per_row = token_losses(model, hidden, target, reduction="none")
    assert per_row.shape == target.shape
    assert torch.allclose(token_losses(model, hidden, target, reduction="sum"), per_row.sum(), atol=1e-3)


def test_every_position_ignored_gives_zero_not_nan():
    model, ids = _model(), _ids()
    target = torch.full_like(ids[:, 1:], -100)
    loss = next_token_loss_of(model, ids[:, :-1], target)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_reference_scores_without_its_parts_and_without_gradients():
    """A Reference sharing the policy scores through routing.base(), like calling it for logits."""
    from tuneforge.rlhf.policy import Reference

    model, ids = _model(), _ids()

    class FakeRun:  # Reference needs the run only to rebuild a copy, which a frozen policy never does
        config = device = None

    for p in model.parameters():
        p.requires_grad_(False)
    ref = Reference(model, FakeRun())
    assert ref.shared
    with routing.base():
        expected = token_logprobs(model(ids).float(), ids)
    got = model_logprobs(ref, ids)
    assert not got.requires_grad and torch.allclose(got, expected, atol=1e-5)
