"""run.stop_reason: None while a run trains, then why it ends; on SIGTERM the checkpoint comes before the final
evaluation, which can see that the run is stopping on a signal."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import tuneforge
from tuneforge.sdk import hookimpl

MICRO = "tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32"
RUN = dict(model=MICRO, mechanisms=["pretrain"], batch_size=2, seq_len=16, warmup=1)


class Seen:
    """Records run.stop_reason where evaluation and the end of the run see it; stops the run at ``stop_at``."""

    name = "seen"

    def __init__(self, stop_at=None):
        self.stop_at, self.evaluated, self.ended = stop_at, [], None

    @hookimpl
    def tuneforge_step_end(self, run, step):
        if step == self.stop_at:
            run.request_stop("enough, says the test")

    @hookimpl
    def tuneforge_evaluate(self, run):
        self.evaluated.append((run.step, run.stop_reason))

    @hookimpl
    def tuneforge_run_end(self, run):
        self.ended = run.stop_reason


def test_none_while_training_then_steps():
    seen = Seen()
    result = tuneforge.train(**{**RUN, "mechanisms": ["pretrain", seen]}, steps=4, eval_every=2)
    assert seen.evaluated == [(2, None), (4, "steps")] and seen.ended == "steps"
    assert result.run.stop_reason == "steps" and result.summary["status"] == "completed"


def test_a_plugins_request_is_an_early_stop_with_its_words():
    seen = Seen(stop_at=2)
    result = tuneforge.train(**{**RUN, "mechanisms": ["pretrain", seen]}, steps=50, eval_every=0)
    assert result.run.step == 2 and seen.evaluated == [(2, "early-stop")] and seen.ended == "early-stop"
    assert result.summary["status"] == "enough, says the test"
    with pytest.raises(ValueError, match="not one of steps, signal"):
        result.run.request_stop("x", kind="tired")


SCRIPT = '''
import json, sys, time
from pathlib import Path

import tuneforge
from tuneforge.sdk import hookimpl

out = Path(sys.argv[1])


class Watch:
    name = "watch"

    @hookimpl
    def tuneforge_step_end(self, run, step):
        if step == 3:
            (out.parent / "ready").write_text("")
        time.sleep(0.02)  # the run goes on until the test's signal arrives

    @hookimpl
    def tuneforge_evaluate(self, run):
        # what a sampling evaluation looks at: is the run stopping on a signal, and is its checkpoint written?
        done = sorted(p.name for p in out.glob("step-*") if (p / "state.json").is_file())
        with open(out.parent / "evaluated.jsonl", "a") as f:
            f.write(json.dumps({"step": run.step, "stop_reason": run.stop_reason, "checkpoints": done}) + "\\n")


result = tuneforge.train(model=MODEL, mechanisms=["pretrain", Watch()], steps=100000, batch_size=2, seq_len=16,
                         eval_every=0, out=str(out))
print(json.dumps({"stop_reason": result.run.stop_reason, "status": result.summary["status"], "step": result.run.step}))
'''


def test_sigterm_writes_the_checkpoint_before_the_final_evaluation_which_sees_the_signal(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT).replace("MODEL", repr(MICRO)))
    env = {**os.environ, "TUNEFORGE_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "ready").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    ended = json.loads(out.strip().splitlines()[-1])
    assert ended["stop_reason"] == "signal" and ended["status"] == "interrupted by SIGTERM" and ended["step"] >= 3
    evaluated = [json.loads(line) for line in (tmp_path / "evaluated.jsonl").read_text().splitlines()]
    assert evaluated == [{"step": ended["step"], "stop_reason": "signal",
                          "checkpoints": [f"step-{ended['step']:08d}"]}]
