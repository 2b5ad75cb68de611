"""--checkpointing: gradients as without it (every mechanism, routed mixed batches, dropout, Hugging Face layers),
exactly the blocks asked for recomputed, none in eval / no_grad / with a cache, and real runs (one process, DDP,
FSDP2) taking the same steps as without it."""
import contextlib
import json

import pytest
import torch

import tuneforge
from tuneforge.errors import ConfigError
from tuneforge.models import checkpointing, routing
from tuneforge.models.transformer import Transformer, model_config
from tuneforge.parts.modules import set_active
from tuneforge.plugins.adapter import add_adapter
from tuneforge.plugins.lora import add_lora, lora_layers
from tuneforge.plugins.prompt_tuning import SoftPrompts
from tuneforge.tools.cli import main

from conftest import TASK_MODEL

DROPOUT = TASK_MODEL + ",dropout=0.1"  # random draws in every block: the recompute must draw the same


def _nonzero(model, seed=7):
    """Parts that change the output (new LoRA B and adapter up are zero), so their gradients reach everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n or ".up." in n and "adapters" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _pretrain(model):
    return None


def _lora(model):
    add_lora(model, "a", targets=["all"], rank=4, dropout=0.1)
    return ["a"]


def _adapter(model):
    add_adapter(model, "a", placement="serial", size=8)
    add_adapter(model, "b", placement="parallel", size=4)
    return ["a", "b"]


def _prompts(model):
    sp = SoftPrompts(model.config.d_model)
    sp.add("a", torch.randn(5, model.config.d_model))
    model.prefix = sp
    return ["a"]


def _model(spec, setup):
    torch.manual_seed(0)
    model = Transformer(model_config(spec))
    active = setup(model)
    _nonzero(model)
    if active is not None:  # parts train, the base is frozen (frozen inputs to every checkpointed block)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n or "adapters" in n or n.startswith("prefix"))
        set_active(model, active)
    return model.train()


def _grads(model, x, every, tasks=None):
    """Gradients of one step, the backward run *after* the routing block exited (as the engine's step does)."""
    checkpointing.apply(model, every)
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout draws for every variant
    with routing.rows(tasks):
        loss = model(x).pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("setup", [_pretrain, _lora, _adapter, _prompts], ids=["pretrain", "lora", "adapter",
                                                                               "prompt-tuning"])
def test_gradients_with_checkpointing_equal_those_without(setup):
    model = _model(DROPOUT, setup)
    x = torch.randint(0, 256, (3, 14))
    plain = _grads(model, x, 0)
    _assert_same(_grads(model, x, 1), plain)
    _assert_same(_grads(model, x, 2), plain)


def test_the_recompute_runs_under_the_forwards_autocast():
    """--precision bf16-mixed: the backward runs outside the autocast block, the recompute must be in bfloat16."""
    model = _model(DROPOUT, _pretrain)
    x = torch.randint(0, 256, (3, 14))

    def grads(every):
        checkpointing.apply(model, every)
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    plain, ckpt = grads(0), grads(1)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=1e-6, msg=n)


def _routed_model():
    torch.manual_seed(0)
    model = Transformer(model_config(DROPOUT))
    add_lora(model, "s", targets=["attn"], rank=4)
    add_lora(model, "t", targets=["attn", "mlp.up"], rank=2)
    add_adapter(model, "t", placement="parallel", size=4)
    sp = SoftPrompts(model.config.d_model)
    sp.add("s", torch.randn(3, model.config.d_model))
    model.prefix = sp
    _nonzero(model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or "adapters" in n or n.startswith("prefix"))
    return model.train()


def test_a_routed_mixed_batch_recomputes_each_row_with_its_own_parts(monkeypatch):
    model = _routed_model()
    x = torch.randint(0, 256, (4, 12))
    tasks = ["s", "t", "", "t"]
    plain = _grads(model, x, 0, tasks)
    _assert_same(_grads(model, x, 1, tasks), plain)
    # ...and the check can fail: a recompute that lost the routing (and applied a default to every row instead)
    # computes something else, which checkpoint notices by the tensors it saves
    set_active(model, ["t"])
    with monkeypatch.context() as m:
        m.setattr(routing, "carried", contextlib.nullcontext)  # nothing re-entered around the recompute
        with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different number of tensors"):
            _grads(model, x, 1, tasks)


def _calls_per_block(model):
    """A counter of forward calls of each block's sub-layers (hooks on the block itself run once either way),
    divided by their number: 1 per step for a block that is not checkpointed, 2 for one that is."""
    counts = [0] * len(model.blocks)
    handles = []
    for i, block in enumerate(model.blocks):
        subs = list(block.children())

        def hook(*_, i=i, n=len(subs)):
            counts[i] += 1 / n
        handles += [m.register_forward_hook(hook) for m in subs]
    return counts, handles


def test_every_n_checkpoints_exactly_every_nth_block_and_only_when_training():
    torch.manual_seed(0)
    model = Transformer(model_config("tiny:n_layers=5,d_model=32,n_heads=2,max_seq_len=64")).train()
    x = torch.randint(0, 256, (2, 10))
    assert checkpointing.apply(model, 2) == [0, 2, 4]
    counts, _ = _calls_per_block(model)
    model(x).sum().backward()
    assert [round(c) for c in counts] == [2, 1, 2, 1, 2]
    assert checkpointing.apply(model, 3) == [0, 3] and checkpointing.apply(model, 9) == [0]
    assert checkpointing.apply(model, 0) == [] and not any(b.gradient_checkpointing for b in model.blocks)
    checkpointing.apply(model, 1)
    counts[:] = [0] * 5
    with torch.no_grad():
        model(x)
    model.eval()(x).sum().backward()  # eval: nothing recomputed, though gradients flow
    assert [round(c) for c in counts] == [2] * 5
    counts[:] = [0] * 5
    model.train()
    with torch.no_grad():  # a cache is written once: the generation path never recomputes
        out = model.generate(x[:, :4], 3, temperature=0)
    assert out.shape[1] == 7 and all(round(c) >= 1 for c in counts)
    cache = model.new_cache(2)
    counts[:] = [0] * 5
    model(x, cache=cache).sum().backward()
    assert [round(c) for c in counts] == [1] * 5 and cache.length == 10


def test_a_model_without_checkpointable_blocks_is_refused():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(ConfigError, match=r"--checkpointing: this model's blocks \(Linear\) cannot"):
        checkpointing.apply(Plain(), 1)
    assert checkpointing.apply(Plain(), 0) == []
    with pytest.raises(ConfigError, match="has no blocks"):
        checkpointing.apply(torch.nn.Linear(2, 2), 1)


def test_bad_values_are_the_flags_error(capsys):
    for bad in ("every:0", "every", "sometimes"):
        assert main(["--no-plugins", "train", "-m", "pretrain", "--checkpointing", bad]) == 2
        assert "--checkpointing must be none, blocks or every:N" in capsys.readouterr().err


# -- Hugging Face decoder layers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    pytest.importorskip("transformers")
    from tuneforge.tools.hf_tiny import make_tiny
    root = tmp_path_factory.mktemp("hf")
    return {f: make_tiny(root / f, f, d_model=32, n_layers=3, n_heads=4, context=64, vocab_size=260)
            for f in ("gpt2", "llama")}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hugging_face_layers_with_lora(hf_folders, family):
    from tuneforge.models import hf
    torch.manual_seed(0)
    model = hf.load(hf_folders[family])
    add_lora(model, "a", targets=["all"], rank=4)
    add_lora(model, "b", targets=["attn"], rank=2)
    _nonzero(model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    model.train()
    x = torch.randint(0, 250, (3, 10))
    tasks = ["a", "b", "a"]
    plain = _grads(model, x, 0, tasks)
    counts, _ = _calls_per_block(model)
    assert checkpointing.apply(model, 2) == [0, 2]
    _assert_same(_grads(model, x, 2, tasks), plain)
    assert [round(c) for c in counts] == [2, 1, 2]
    _assert_same(_grads(model, x, 1, tasks), plain)


# -- runs ------------------------------------------------------------------------------------------------------

def _train(tmp_path, name, checkpointing_value, **kw):
    args = dict(model=DROPOUT, mechanisms=["pretrain"], data="builtin:text", steps=3, batch_size=4, seq_len=32,
                lr=3e-3, warmup=1, eval_every=0, out=str(tmp_path / name), checkpointing=checkpointing_value)
    args.update(kw)
    return tuneforge.train(**args)


def _losses(result):
    return [h["loss"] for h in result.history if "loss" in h]


def test_a_run_takes_the_same_steps_and_records_the_blocks(tmp_path):
    plain = _train(tmp_path, "plain", "none")
    ckpt = _train(tmp_path, "blocks", "blocks")
    assert plain.summary["checkpointed_blocks"] == [] and ckpt.summary["checkpointed_blocks"] == [0, 1]
    assert json.loads((tmp_path / "blocks" / "summary.json").read_text())["checkpointed_blocks"] == [0, 1]
    torch.testing.assert_close(_losses(ckpt), _losses(plain), rtol=0, atol=1e-6)
    a, b = plain.model.state_dict(), ckpt.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_a_run_on_mixed_task_data_routes_the_recompute(tmp_path):
    """Two LoRAs and no default: a recompute without the rows' routing would not know which to apply."""
    rows = [{"text": f"good thing {i}", "label": "pos", "task": "s"} for i in range(6)]
    rows += [{"text": f"weather report {i}", "label": "rain", "task": "t"} for i in range(6)]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(model=TASK_MODEL, mechanisms=["lora:tasks=s,t,rank=2"], data=str(data), lr=1e-2)
    plain = _train(tmp_path, "plain", "none", **kw)
    ckpt = _train(tmp_path, "blocks", "blocks", **kw)
    torch.testing.assert_close(_losses(ckpt), _losses(plain), rtol=0, atol=1e-6)
    moved = [n for n, m in lora_layers(ckpt.model) for b in m.lora_b.values() if b.abs().sum() > 0]
    assert moved


# -- under torchrun: 2 CPU processes (gloo), as tests/test_distributed.py launches them ------------------------------

DIST = ["--model", "tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=64", "--steps", "3", "--batch-size", "4",
        "--seq-len", "32", "--eval-every", "0", "--warmup", "1", "--lr", "3e-3"]


def _launch(args):
    import os
    import subprocess
    import sys
    env = dict(os.environ, TUNEFORGE_LOAD_PLUGINS="", PYTHONUNBUFFERED="1")
    env.pop("TUNEFORGE_STRICT_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", *args], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process without checkpointing, two micro-batches a step (the global batch of 2 ranks)."""
    out = tmp_path_factory.mktemp("one") / "run"
    _launch(["-m", "pretrain", *DIST, "--grad-accum", "2", "--out", str(out)])
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_with_checkpointing_take_the_same_steps(one_process, tmp_path, strategy):
    from safetensors.torch import load_file
    out = tmp_path / strategy
    _launch(["-m", "pretrain", *DIST, "--checkpointing", "blocks", "--strategy", strategy, "--nproc-per-node", "2",
             "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == strategy
    assert summary["checkpointed_blocks"] == [0, 1]
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (out, one_process)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    a, b = (load_file(str(run / "step-00000003" / "model.safetensors")) for run in (out, one_process))
    shared = a.keys() & b.keys()  # tied weights may be stored under either name
    assert len(shared) >= len(b) - 1
    for k in shared:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_benchmark_runs_and_its_variants_take_the_same_steps():
    """benchmarks/checkpointing.py --quick as a user runs it: figures for every variant, and the same losses
    (memory and time are reported, never asserted)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "checkpointing.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["variants"]) == {"none", "every:2", "blocks"}
    for row in report["variants"].values():
        assert row["max_loss_diff"] <= 1e-6 and row["step_ms"] > 0 and row["baseline_mib"] > 0
