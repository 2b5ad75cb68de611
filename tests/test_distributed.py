"""Training on several processes: real torchrun jobs of 2 CPU processes (gloo), checked against one process.

A run on W processes with --grad-accum k takes the optimizer steps of one process with --grad-accum W*k, so the
loss trajectory and the final weights must agree to float tolerance (only the order of the gradient sums
differs). The launches are real subprocesses, as a user runs them.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.engine import distributed
from tuneforge.tools.cli import main
from tuneforge.errors import ConfigError
from tuneforge.engine.step import Batches

MODEL = "tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=64"
COMMON = ["--model", MODEL, "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3",
          "--warmup", "1", "--lr", "3e-3"]


def _env():
    env = dict(os.environ, TUNEFORGE_LOAD_PLUGINS="", PYTHONUNBUFFERED="1")
    env.pop("TUNEFORGE_STRICT_PLUGINS", None)
    return env


def _run(args, *, timeout=240, check=True):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"step-{step:08d}" / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, atol=1e-6):
    shared = a.keys() & b.keys()  # tied weights may be stored under either name
    assert len(shared) >= len(a) - 1 and shared
    for k in shared:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, two micro-batches a step."""
    out = tmp_path_factory.mktemp("single") / "run"
    _run(["-m", "tuneforge", "train", "-m", "pretrain", *COMMON, "--grad-accum", "2", "--out", str(out)])
    return out


def test_torchrun_ddp_matches_one_process_with_the_same_global_batch(single, tmp_path):
    out = tmp_path / "ddp"
    proc = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "tuneforge", "train", "-m", "pretrain", *COMMON, "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp" and summary["status"] == "completed"
    torch.testing.assert_close(_losses(out), _losses(single), rtol=1e-5, atol=1e-6)
    _assert_same_weights(_weights(out, 6), _weights(single, 6))
    # only rank 0 speaks: one start line and one final line, not two
    assert proc.stderr.count("pretrain on 2-layer model") == 1
    assert proc.stderr.count("completed after 6 steps") == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "latest", "metrics.jsonl", "step-00000006",
                                                     "summary.json"]


def test_fsdp_through_nproc_per_node_matches_one_process(single, tmp_path):
    out = tmp_path / "fsdp"
    _run(["-m", "tuneforge", "train", "-m", "pretrain", *COMMON, "--strategy", "fsdp", "--nproc-per-node", "2",
          "--out", str(out)])
    assert json.loads((out / "summary.json").read_text())["strategy"] == "fsdp"
    torch.testing.assert_close(_losses(out), _losses(single), rtol=1e-5, atol=1e-6)
    # the checkpoint holds whole tensors, gathered from both shards, and the optimizer's moments with them
    _assert_same_weights(_weights(out, 6), _weights(single, 6))
    ours = load_file(str(out / "step-00000006" / "optimizer.safetensors"))
    theirs = load_file(str(single / "step-00000006" / "optimizer.safetensors"))
    for k in theirs:
        if not k.startswith("rng."):
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    assert {"rng.torch.rank0", "rng.torch.rank1"} <= ours.keys()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_frozen_base_mechanisms_train_under_both_strategies(tmp_path, single, strategy):
    """LoRA and prompt tuning together: only their parameters move, on every rank alike, and the saved parts load."""
    import tuneforge

    args = ["-m", "lora:rank=2", "-m", "prompt-tuning:tokens=4", "--init", str(single), "--steps", "4",
            "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--warmup", "1", "--lr", "1e-2"]
    one = tmp_path / "one"
    _run(["-m", "tuneforge", "train", *args, "--grad-accum", "2", "--out", str(one)])
    two = tmp_path / strategy
    _run(["-m", "tuneforge", "train", *args, "--strategy", strategy, "--nproc-per-node", "2", "--out", str(two)])
    summary = json.loads((two / "summary.json").read_text())
    assert summary["frozen_weights"]["unchanged"]
    assert summary["trainable_by_plugin"]["lora"] > 0 and summary["trainable_by_plugin"]["prompt-tuning"] > 0
    torch.testing.assert_close(_losses(two), _losses(one), rtol=1e-5, atol=1e-6)
    a, b = tuneforge.load_model(two), tuneforge.load_model(one)
    x = torch.randint(0, 200, (2, 16))
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


def test_reward_model_with_a_scalar_parameter_under_fsdp(tmp_path, single):
    """FSDP2 cannot shard a 0-dim parameter (the tie strength): it stays whole on each rank, its gradient averaged."""
    args = ["-m", "reward-model:eval_limit=20", "--init", str(single), "--data", "builtin:rankings", "--steps", "3",
            "--batch-size", "2", "--eval-every", "0", "--warmup", "1", "--lr", "1e-2"]
    one, two = tmp_path / "one", tmp_path / "fsdp"
    _run(["-m", "tuneforge", "train", *args, "--grad-accum", "2", "--out", str(one)])
    _run(["-m", "tuneforge", "train", *args, "--strategy", "fsdp", "--nproc-per-node", "2", "--out", str(two)])
    torch.testing.assert_close(_losses(two), _losses(one), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_weights(two, 3)["lm_head.tie_raw"], _weights(one, 3)["lm_head.tie_raw"])
    # Scores are compared up to a shared offset: the loss sees only their differences, so the head's bias has
    # a zero gradient up to rounding, which Adam turns into steps of either sign.
    import tuneforge
    from tuneforge.sdk import score

    prompts, answers = ["describe the lake."] * 4, ["calm and blue.", "it is a lake", "no", "the lake is deep."]
    a, b = (score(tuneforge.load_model(r), prompts, answers) for r in (two, one))
    torch.testing.assert_close(a - a.mean(), b - b.mean(), rtol=1e-4, atol=1e-4)


def test_lora_on_a_hugging_face_model_under_fsdp_stores_only_the_lora(tmp_path):
    """The folder's frozen weights stay in the folder (known before sharding), as in one process."""
    pytest.importorskip("transformers")
    import tuneforge
    from tuneforge.tools.hf_tiny import make_tiny

    folder = make_tiny(tmp_path / "llama", "llama", d_model=32, n_layers=2, n_heads=4, context=64, vocab_size=256)
    args = ["-m", "lora:rank=2", "--model", f"hf:{folder}", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
            "--eval-every", "0", "--warmup", "1", "--lr", "1e-2"]
    one, two = tmp_path / "one", tmp_path / "fsdp"
    _run(["-m", "tuneforge", "train", *args, "--grad-accum", "2", "--out", str(one)])
    _run(["-m", "tuneforge", "train", *args, "--strategy", "fsdp", "--nproc-per-node", "2", "--out", str(two)])
    torch.testing.assert_close(_losses(two), _losses(one), rtol=1e-5, atol=1e-6)
    state = json.loads((two / "step-00000003" / "state.json").read_text())
    stored = _weights(two, 3)
    assert stored and all(".lora_" in k or "lora" in k for k in stored), sorted(stored)[:4]
    assert "model.embed_tokens.weight" in state["folder_weights"]["names"]
    x = torch.randint(0, 200, (2, 12))
    torch.testing.assert_close(tuneforge.load_model(two)(x), tuneforge.load_model(one)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_two_process_run_resumes_to_the_same_weights(tmp_path, strategy):
    # d_model 32 and 32-token rows (were 64 and 64): ~17 ms a step on 2 busy cores instead of ~31, so the three
    # launches take ~2 s less each. 120 steps stay: the signal, sent after step 10, still has ~110 steps (~2 s) to
    # land before the run would end.
    model = "tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=32"
    args = ["-m", "tuneforge", "train", "-m", "pretrain", "--model", model,
            "--steps", "120", "--batch-size", "8", "--seq-len", "32", "--eval-every", "0", "--warmup", "5",
            "--strategy", strategy, "--nproc-per-node", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    _run([*args, "--out", str(full)])
    proc = subprocess.Popen([sys.executable, *args, "--out", str(part)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    metrics = part / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 10):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends: torchrun passes it to both ranks
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    saved = sorted(p.name for p in part.glob("step-*"))
    assert len(saved) == 1 and saved[0] != "step-00000120", err[-2000:]
    stopped = int(saved[0].split("-")[1])
    assert err.count("interrupted at step") == 1  # rank 0 says it once
    _run([*args, "--out", str(part), "--resume", "auto"])
    _assert_same_weights(_weights(part, 120), _weights(full, 120), atol=0)
    losses = _losses(part)
    assert len(losses) == 120 and losses[stopped:] == _losses(full)[stopped:]


# -- the pieces, in one process ------------------------------------------------------------------------------------


class _Rank:
    """A stand-in for the Parallel of one rank: which share of the stream a rank takes."""

    def __init__(self, rank, world):
        self.rank, self.world_size = rank, world

    def gathered(self, model):
        import contextlib
        return contextlib.nullcontext()


def test_ranks_take_disjoint_micro_batches_and_count_the_stream_alike():
    from tuneforge.engine.run import Run
    from tuneforge import TrainConfig

    def data(run):
        return iter(range(run.epoch * 100, run.epoch * 100 + 5))  # 5 micro-batches an epoch

    seen = {}
    for rank in (0, 1):
        run = Run(TrainConfig(), None, None, torch.device("cpu"), {}, None)
        b = Batches(run, data, None, _Rank(rank, 2))
        seen[rank] = [b.next() for _ in range(5)]
        assert (run.epoch, run.batch_in_epoch) == (1, 5)  # 10 drawn in all: epoch 0's five, then epoch 1's five
    assert seen[0] == [0, 2, 4, 101, 103] and seen[1] == [1, 3, 100, 102, 104]
    assert not set(seen[0]) & set(seen[1])


def test_one_process_is_plain():
    par = distributed.start("fsdp", "cpu")  # no torchrun: the strategy has nothing to do
    assert type(par) is distributed.Parallel and not par.distributed
    assert par.reduce({"loss": 2.0}, True) == ({"loss": 2.0}, True) and par.any(True) and not par.any(False)
    with pytest.raises(ConfigError, match="strategy"):
        distributed.start("zero3", "cpu")


def test_nproc_per_node_becomes_torchrun_without_itself(monkeypatch):
    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    main(["--no-plugins", "train", "-m", "pretrain", "--nproc-per-node", "2", "--steps", "3", "--strategy", "fsdp"])
    (argv,) = calls
    assert argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert argv[6:] == ["tuneforge", "--no-plugins", "train", "-m", "pretrain", "--steps", "3", "--strategy", "fsdp"]


def test_launch_refusals(monkeypatch, capsys):
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("must not launch"))
    assert main(["train", "-m", "pretrain", "--nproc-per-node", "two"]) == 2
    assert "--nproc-per-node 'two'" in capsys.readouterr().err
    assert main(["train", "-m", "pretrain", "--strategy", "zero3", "--nproc-per-node", "2"]) == 2  # checked first
    assert "strategy" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "-m", "pretrain", "--nproc-per-node", "2"]) == 2
    assert "torchrun already started" in capsys.readouterr().err
