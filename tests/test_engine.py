import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
from tuneforge import hookimpl
from tuneforge.engine.loop import lr_at
from tuneforge.errors import ConfigError, NonFiniteLossError
from tuneforge.objectives.next_token import next_token_loss

from conftest import micro_config


class SignalAt:
    """Sends a real signal to this process after a given step, as a user's Ctrl-C or a scheduler would."""

    name = "signal-at"

    def __init__(self, step, signum=signal.SIGINT):
        self.at, self.signum = step, signum

    @hookimpl
    def tuneforge_step_end(self, step):
        if step == self.at:
            os.kill(os.getpid(), self.signum)


class NaNObjective:
    """Next-token loss on random tokens, poisoned with NaN on chosen steps."""

    name = "nan-objective"

    def __init__(self, bad_steps):
        self.bad = set(bad_steps)

    @hookimpl
    def tuneforge_trainable_params(self, model):
        return list(model.parameters())

    @hookimpl
    def tuneforge_data(self, run):
        g = torch.Generator().manual_seed(run.epoch)
        return [{"x": torch.randint(0, 256, (4, 17), generator=g)} for _ in range(50)]

    @hookimpl
    def tuneforge_loss(self, model, batch, run):
        x = batch["x"]
        loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
        if run.step + 1 in self.bad:  # run.step counts finished steps
            loss = loss * float("nan")
        return loss, {}


class FailingSave:
    name = "failing-save"

    def __init__(self):
        self.calls = 0

    @hookimpl
    def tuneforge_save(self, path):
        self.calls += 1
        (path / "failing-save.json").write_text("{}")
        if self.calls == 2:
            raise RuntimeError("disk full (simulated)")


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = micro_config(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_pretraining_drops_loss_well_below_the_unigram_entropy():
    from tuneforge.objectives.next_token import TokenWindows, unigram_entropy
    from tuneforge.models.tokenizer import ByteTokenizer
    from tuneforge.data.world import builtin

    held_out = TokenWindows([r["text"] for r in builtin("text", split="test")], ByteTokenizer(), seq_len=64)
    unigram = unigram_entropy(held_out.tokens)  # nats per token
    result = tuneforge.train(model="tiny:n_layers=2,d_model=64,n_heads=4,max_seq_len=64", mechanisms=["pretrain"],
                             data="builtin:text", steps=400, batch_size=16, lr=5e-3, warmup=20, eval_every=0)
    loss = result.metrics["eval/loss"]
    assert loss < 0.5 * unigram, (loss, unigram)
    assert result.history[0]["loss"] > result.metrics["eval/loss"] + 1.0


def test_gradient_accumulation_matches_the_big_batch():
    a = tuneforge.train(micro_config(steps=3, batch_size=8, grad_accum=2))
    b = tuneforge.train(micro_config(steps=3, batch_size=16, grad_accum=1))
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), k


@pytest.mark.parametrize("grad_accum, optimizer", [(1, "adamw"), (2, "adamw"), (1, "muon")])
def test_resume_after_interrupt_equals_the_uninterrupted_run(tmp_path, grad_accum, optimizer):
    model = "tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32,dropout=0.1"  # dropout: RNG must resume too
    # few windows per epoch, so the run crosses epoch boundaries and resumes mid-epoch; muon: both halves' state
    # (Muon's momentum, AdamW's moments) goes through the checkpoint
    common = dict(model=model, steps=14, batch_size=8, grad_accum=grad_accum, eval_every=5, data="builtin:text",
                  optimizer=optimizer)
    full = tuneforge.train(micro_config(tmp_path / "full", **common))
    first = tuneforge.train(micro_config(tmp_path / "part", mechanisms=["pretrain", SignalAt(6)], **common))
    assert first.summary["status"] == "interrupted by SIGINT" and first.run.step == 6
    assert first.checkpoint.name == "step-00000006"
    resumed = tuneforge.train(micro_config(tmp_path / "part", resume="auto", **common))
    assert resumed.run.step == 14 and resumed.summary["status"] == "completed"
    assert_same_weights(weights(full.model), weights(resumed.model))
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 15))  # no duplicated or missing lines across the restart


def test_checkpoints_are_safetensors_and_json_only_and_rotate(tmp_path):
    result = tuneforge.train(micro_config(tmp_path, steps=8, save_every=2, keep_last=2))
    run = tmp_path / "run"
    ckpts = sorted(p.name for p in run.glob("step-*"))
    assert ckpts == ["step-00000006", "step-00000008"]
    assert (run / "latest").read_text().strip() == "step-00000008"
    suffixes = {p.suffix for p in (run / "step-00000008").iterdir()}
    assert suffixes <= {".safetensors", ".json"}
    loaded = load_file(str(run / "step-00000008" / "model.safetensors"))
    for k, v in loaded.items():
        assert torch.equal(v, result.model.state_dict()[k])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8


def test_a_failing_save_leaves_the_previous_checkpoint_intact(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        tuneforge.train(micro_config(tmp_path, steps=8, save_every=3, mechanisms=["pretrain", FailingSave()]))
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".tmp", "step-"))) == ["step-00000003"]
    assert (run / "latest").read_text().strip() == "step-00000003"
    model = tuneforge.load_model(run)  # the kept checkpoint is complete and loads
    assert model.config.n_layers == 1


def test_non_finite_steps_are_skipped_and_counted(micro):
    result = tuneforge.train(model=micro, mechanisms=[NaNObjective({3, 5})], steps=8, eval_every=0)
    assert result.summary["skipped_steps"] == 2
    assert [m["skipped"] for m in result.history] == [0, 0, 1, 0, 1, 0, 0, 0]
    assert all(math.isfinite(p.sum().item()) for p in result.model.parameters())


def test_weights_do_not_move_on_a_skipped_step(micro):
    a = tuneforge.train(model=micro, mechanisms=[NaNObjective({3})], steps=3, eval_every=0)
    b = tuneforge.train(model=micro, mechanisms=[NaNObjective(set())], steps=2, eval_every=0, warmup=30)
    # b stopped after step 2 with the same data and lr schedule prefix; step 3 of a changed nothing
    assert a.summary["skipped_steps"] == 1
    assert_same_weights(weights(a.model), weights(b.model))


def test_too_many_non_finite_steps_stop_and_keep_the_last_good_checkpoint(tmp_path, micro):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        tuneforge.train(model=micro, mechanisms=[NaNObjective(range(5, 100))], steps=50, save_every=3,
                        max_nonfinite=4, out=str(out))
    assert "step-00000003" in str(err.value)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000003"]
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped: non-finite loss"


def test_an_existing_run_folder_is_not_overwritten(tmp_path):
    tuneforge.train(micro_config(tmp_path, steps=2))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ConfigError, match="--resume auto"):
        tuneforge.train(micro_config(tmp_path, steps=2))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    result = tuneforge.train(micro_config(tmp_path, steps=2, resume="auto"))
    assert result.run.resumed_from is None and result.run.step == 2


def test_init_starts_from_saved_weights(tmp_path):
    first = tuneforge.train(micro_config(tmp_path, steps=3))
    second = tuneforge.train(micro_config(None, model=None, init=str(tmp_path / "run"), steps=1, lr=1e-12, warmup=0))
    for k, v in first.model.state_dict().items():
        assert torch.allclose(v, second.model.state_dict()[k], atol=1e-6), k
    with pytest.raises(ConfigError, match="differs from the architecture"):
        tuneforge.train(micro_config(None, model="tiny", init=str(tmp_path / "run"), steps=1))


def test_python_api_keyword_errors_name_the_keyword():
    with pytest.raises(ConfigError, match=r"tuneforge.train\(\) has no option 'stpes'.*did you mean 'steps'"):
        tuneforge.train(stpes=3)
    with pytest.raises(ConfigError, match="grad_accum must be at least 1"):
        tuneforge.train(grad_accum=0)


KILL_DURING_SAVE = '''
import os, signal, sys
import tuneforge
from tuneforge import hookimpl

class KillDuringSecondSave:
    name = "kill"
    calls = 0

    @hookimpl
    def tuneforge_save(self, path):
        KillDuringSecondSave.calls += 1
        if KillDuringSecondSave.calls == 2:  # model and optimizer files are already in the temporary folder
            os.kill(os.getpid(), signal.SIGKILL)

tuneforge.train(model="tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32", mechanisms=["pretrain", KillDuringSecondSave()],
                steps=9, batch_size=8, save_every=3, eval_every=0, out=sys.argv[1])
'''


def test_sigkill_during_a_save_keeps_the_latest_good_checkpoint_and_resume_cleans_up(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(out)], capture_output=True, text=True,
                          env={**os.environ, "TUNEFORGE_LOAD_PLUGINS": ""}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "step-00000003" in names and "step-00000006" not in names
    assert any(n.startswith(".tmp-step-00000006") for n in names)  # the half-written one, never renamed
    assert (out / "latest").read_text().strip() == "step-00000003"
    resumed = tuneforge.train(micro_config(tmp_path, steps=9, save_every=3, resume="auto"))
    assert resumed.run.resumed_from.name == "step-00000003" and resumed.run.step == 9
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_eval_data_is_used_for_evaluation(tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("zzzz qqqq " * 400)  # nothing like the training text: a high held-out loss
    a = tuneforge.train(micro_config(steps=20))
    b = tuneforge.train(micro_config(steps=20, eval_data=str(held)))
    assert b.metrics["eval/loss"] > a.metrics["eval/loss"] + 1.0
