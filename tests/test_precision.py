"""--precision on the CPU: bf16-mixed (autocast to bfloat16 over float32 master weights) and bf16 (bfloat16
weights), through ``tuneforge.train`` as a user runs it, and the pieces it rests on (the compiled ops under
autocast, the weight casting, resuming across precisions)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
from tuneforge import hookimpl, kernels
from tuneforge.engine import distributed, precision
from tuneforge.errors import ConfigError
from tuneforge.kernels import reference
from tuneforge.objectives.next_token import next_token_loss
from tuneforge.rlhf.policy import token_logprobs
from tuneforge.tools.cli import main

from conftest import micro_config

FAST = dict(steps=8, batch_size=4, seq_len=16, warmup=1, lr=1e-2)
PRETRAIN = "pretrain:eval_batches=2"  # the final evaluation runs too, on little


class Watch:
    """Records, for every forward of a linear layer, whether it built a graph (training) and its output's dtype."""

    name = "watch-precision"

    def __init__(self):
        self.seen: list[tuple[bool, torch.dtype]] = []

    @hookimpl
    def tuneforge_run_start(self, model):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, a, out: self.seen.append((torch.is_grad_enabled(), out.dtype)))

    def dtypes(self, training: bool) -> set:
        return {dtype for grad, dtype in self.seen if grad == training}


@pytest.fixture
def loss_dtypes(monkeypatch):
    """The dtype of every loss the engine's step gets from the objective (through Parallel.loss, the real path)."""
    seen = []
    original = distributed.Parallel.loss

    def loss(self, batch):
        value, parts = original(self, batch)
        seen.append(value.dtype)
        return value, parts

    monkeypatch.setattr(distributed.Parallel, "loss", loss)
    return seen


def _losses(result):
    return [h["loss"] for h in result.history if "loss" in h]


def _checkpoint(out):
    (step,) = sorted(out.glob("step-*"))[-1:]
    return load_file(str(step / "model.safetensors")), load_file(str(step / "optimizer.safetensors"))


def _moments(optim: dict) -> set:
    return {t.dtype for name, t in optim.items() if t.dim() > 0 and not name.startswith("rng")}


@pytest.mark.parametrize("setting,weights", [("bf16-mixed", torch.float32), ("bf16", torch.bfloat16)])
def test_a_run_trains_with_bfloat16_forwards_and_keeps_its_master_dtype(tmp_path, loss_dtypes, setting, weights):
    watch = Watch()
    result = tuneforge.train(micro_config(tmp_path, precision=setting, mechanisms=[PRETRAIN, watch], **FAST))
    losses = _losses(result)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    # every forward ran in bfloat16: the steps' and the final evaluation's
    assert watch.dtypes(training=True) == {torch.bfloat16} and watch.dtypes(training=False) == {torch.bfloat16}
    assert loss_dtypes and set(loss_dtypes) == {torch.float32}  # reduced in float32 all the same
    assert {p.dtype for p in result.model.parameters()} == {weights}
    model_file, optim_file = _checkpoint(tmp_path / "run")
    assert {t.dtype for t in model_file.values()} == {weights}
    assert _moments(optim_file) == {weights}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == setting
    assert summary["weight_dtypes"] == {str(weights).replace("torch.", ""): summary["total_params"]}


def test_fp32_runs_no_forward_in_bfloat16(tmp_path, loss_dtypes):
    watch = Watch()
    result = tuneforge.train(micro_config(None, mechanisms=[PRETRAIN, watch], **{**FAST, "steps": 2}))
    assert watch.dtypes(training=True) == watch.dtypes(training=False) == {torch.float32}
    assert set(loss_dtypes) == {torch.float32} and result.summary["precision"] == "fp32"


def test_the_shared_losses_and_log_probs_reduce_in_float32_under_autocast():
    logits = torch.randn(2, 5, 11)
    target = torch.randint(0, 11, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = torch.nn.functional.linear(logits, torch.eye(11))  # (B, T, V) as a head under autocast gives them
        assert low.dtype == torch.bfloat16
        loss, logp = next_token_loss(low, target), token_logprobs(low, target)
    assert loss.dtype == logp.dtype == torch.float32
    # the same numbers as in float32 but for the bfloat16 rounding of the logits themselves
    assert torch.allclose(loss, next_token_loss(low.float(), target))
    assert torch.allclose(logp, token_logprobs(low.float(), target))


# -- the compiled ops under autocast ---------------------------------------------------------------------------------

def _close(a, b, scale):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max()) <= 2e-2 * max(1.0, float(b.abs().max())) * scale


def test_lora_and_adapter_ops_take_float32_parameters_with_bfloat16_activations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    w, b = torch.randn(8, 16, generator=g) / 4, torch.randn(8, generator=g)
    a = (torch.randn(4, 16, generator=g) / 4).requires_grad_()
    bb = (torch.randn(8, 4, generator=g) / 4).requires_grad_()
    want = reference.lora_linear_reference(x, w, b, a, bb, 2.0)
    want_grads = torch.autograd.grad(want.sum(), (a, bb))
    for activations in (x.bfloat16(), x):  # bfloat16 from an earlier autocast layer, or float32
        with precision.autocast("bf16-mixed", torch.device("cpu")):
            out = kernels.lora_linear(activations, w, b, a, bb, 2.0)
        assert out.dtype == torch.bfloat16 and _close(out, want, 1)
        grads = torch.autograd.grad(out.float().sum(), (a, bb))  # the backward outside autocast
        assert all(gr.dtype == torch.float32 and _close(gr, wg, 4) for gr, wg in zip(grads, want_grads))
    wd, bd, wu, bu = (torch.randn(*s, generator=g) / 4 for s in ((6, 16), (6,), (16, 6), (16,)))
    want = reference.bottleneck_adapter_reference(x, wd, bd, wu, bu, "gelu", True)
    with precision.autocast("bf16-mixed", torch.device("cpu")):
        out = kernels.bottleneck_adapter(x.bfloat16(), wd, bd, wu, bu, "gelu", True)
    assert out.dtype == torch.bfloat16 and _close(out, want, 1)
    ids = torch.tensor([0, -1, 1])
    want = reference.multi_lora_linear_reference(x, w, b, a.detach().expand(2, 4, 16), bb.detach().expand(2, 8, 4),
                                                 torch.tensor([2.0, 1.0]), ids)
    with precision.autocast("bf16-mixed", torch.device("cpu")):
        out = kernels.multi_lora_linear(x.bfloat16(), w, b, a.detach().expand(2, 4, 16).contiguous(),
                                        bb.detach().expand(2, 8, 4).contiguous(), torch.tensor([2.0, 1.0]), ids)
    assert out.dtype == torch.bfloat16 and _close(out, want, 1)


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float32])
def test_attention_under_autocast_matches_the_float32_reference(cast):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    want = reference.attention_reference(q, k, v, causal=True)
    leaf = q.to(cast).requires_grad_()
    with precision.autocast("bf16-mixed", torch.device("cpu")):
        out = kernels.flash_attention(leaf, k.to(cast), v.to(cast), causal=True)
    assert _close(out, want, 1)
    out.float().sum().backward()
    assert leaf.grad.dtype == cast and torch.isfinite(leaf.grad.float()).all()


# Attention gets q, k, v of mixed dtypes under autocast: a float32 KV cache beside bfloat16 queries (generation in
# the evaluations of dpo, ppo, prompting), and HF's rotary embedding gives float32 q, k beside a bfloat16 v. The
# kernels' face casts them to the autocast dtype, as SDPA's own autocast rule does.


def test_the_embedded_model_generates_under_autocast():
    from tuneforge.models import factory

    model, _ = factory.build("tiny:n_layers=1,d_model=16,n_heads=2,max_seq_len=16", seed=0)
    prompt = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad(), precision.autocast("bf16-mixed", torch.device("cpu")):
        out = model.eval().generate(prompt, 4, temperature=0.0)
    assert out.shape == (1, 8) and torch.equal(out[:, :4], prompt)


def test_a_float32_hf_model_runs_under_autocast(hf_folder):
    from tuneforge.models import factory

    model, _ = factory.build(f"hf:{hf_folder}", seed=0)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        want = model.eval()(ids)
        with precision.autocast("bf16-mixed", torch.device("cpu")):
            got = model(ids)
    assert got.dtype == torch.bfloat16 and _close(got, want, 2)


def test_lora_trains_under_bf16_mixed_with_float32_parameters(tmp_path, loss_dtypes):
    watch = Watch()
    result = tuneforge.train(micro_config(tmp_path, precision="bf16-mixed", mechanisms=["lora", watch], **FAST))
    model = result.model
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and {p.dtype for p in model.parameters()} == {torch.float32}
    # B starts at zero: a non-zero one trained
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_b" in n)
    assert watch.dtypes(training=True) == {torch.bfloat16} and set(loss_dtypes) == {torch.float32}
    assert all(map(lambda v: v == v, _losses(result)))  # finite
    assert result.summary["frozen_weights"]["unchanged"]


# -- weights that arrive in bfloat16 (HF folders) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from tuneforge.tools.hf_tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("hf") / "llama", "llama", d_model=32, n_layers=1, n_heads=4, context=64,
                     vocab_size=320)


def test_an_hf_model_loaded_in_bfloat16_trains_float32_parts_under_bf16_mixed(hf_folder, tmp_path, loss_dtypes):
    out = tmp_path / "run"
    result = tuneforge.train(model=f"hf:{hf_folder}?dtype=bfloat16", mechanisms=["lora"], precision="bf16-mixed",
                             out=str(out), eval_every=0, **FAST)
    params = dict(result.model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained and {params[n].dtype for n in trained} == {torch.float32}  # master weights
    assert {p.dtype for n, p in params.items() if n not in trained} == {torch.bfloat16}  # the frozen base stays
    assert set(loss_dtypes) == {torch.float32} and all(v == v for v in _losses(result))
    model_file, optim_file = _checkpoint(out)
    assert {t.dtype for t in model_file.values()} == {torch.float32} and _moments(optim_file) == {torch.float32}
    assert set(result.summary["weight_dtypes"]) == {"float32", "bfloat16"}


def test_fp32_refuses_weights_asked_for_in_bfloat16(hf_folder):
    with pytest.raises(ConfigError, match=r"dtype=bfloat16 .* --precision is fp32.*--precision bf16-mixed"):
        tuneforge.train(model=f"hf:{hf_folder}?dtype=bfloat16", mechanisms=["lora"], steps=1, batch_size=2, seq_len=8)


def test_prepare_model_keeps_ties_and_buffers_and_makes_trained_weights_float32():
    from tuneforge.models.transformer import Transformer, model_config

    model = Transformer(model_config("tiny:n_layers=1,d_model=16,n_heads=2,max_seq_len=8"))
    model.register_buffer("table", torch.ones(3))
    assert model.lm_head.weight is model.tok_emb.weight
    counts = precision.prepare_model(model, "bf16")
    assert model.lm_head.weight is model.tok_emb.weight and model.lm_head.weight.dtype == torch.bfloat16
    assert model.table.dtype == torch.float32 and counts == {"bfloat16": model.num_params()}
    for p in model.parameters():
        p.requires_grad_(p.dim() < 2)  # norms and biases train, matrices stay frozen
    model.blocks[0].mlp.up.weight.data = model.blocks[0].mlp.up.weight.data.half()
    said = []
    precision.prepare_model(model, "bf16-mixed", log=said.append)
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in model.parameters())
    assert said and "float32 master weights" in said[0]
    precision.prepare_model(model, "fp32", log=said.append)  # a default low dtype is cast, and said
    assert {p.dtype for p in model.parameters()} == {torch.float32} and "cast to float32" in said[-1]


# -- the command line and resuming -----------------------------------------------------------------------------------

def test_a_bad_value_is_the_flags_error(capsys):
    assert main(["--no-plugins", "train", "-m", "pretrain", "--precision", "fp16"]) == 2
    assert "--precision must be one of fp32, bf16-mixed, bf16" in capsys.readouterr().err


def test_resuming_under_another_precision_casts_the_checkpoint(tmp_path, capsys):
    base = dict(mechanisms=[PRETRAIN], **{**FAST, "steps": 3})
    tuneforge.train(micro_config(tmp_path, precision="bf16-mixed", **base))
    capsys.readouterr()
    down = tuneforge.train(micro_config(tmp_path, precision="bf16", resume="auto", **{**base, "steps": 5}))
    assert "cast to bfloat16" in capsys.readouterr().err
    assert down.summary["resume_changes"]["precision"] == ["bf16-mixed", "bf16"]
    assert {p.dtype for p in down.model.parameters()} == {torch.bfloat16}
    model_file, optim_file = _checkpoint(tmp_path / "run")
    assert {t.dtype for t in model_file.values()} == _moments(optim_file) == {torch.bfloat16}
    up = tuneforge.train(micro_config(tmp_path, precision="fp32", resume="auto", **{**base, "steps": 6}))
    assert "cast to float32" in capsys.readouterr().err and up.summary["steps"] == 6
    assert {p.dtype for p in up.model.parameters()} == {torch.float32}
    # the bfloat16 weights came back exactly (every bfloat16 is a float32), then trained one step on
    model_file, optim_file = _checkpoint(tmp_path / "run")
    assert {t.dtype for t in model_file.values()} == _moments(optim_file) == {torch.float32}


def test_resume_notes():
    assert precision.resume_note("bf16-mixed", "bf16-mixed") is None and precision.resume_note(None, "fp32") is None
    assert "updates below" in precision.resume_note(None, "bf16")
    assert "cast to float32" in precision.resume_note("bf16", "bf16-mixed")
    assert "float32 weights continue" in precision.resume_note("fp32", "bf16-mixed")
