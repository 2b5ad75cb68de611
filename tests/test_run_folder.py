"""The run folder under stress: signals at the end, a second signal in the loop, two processes on one --out, links
planted in the folder, damaged checkpoints, a kill during rotation, a full or read-only disk."""
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

import tuneforge
from tuneforge.engine import checkpoint as ckpt
from tuneforge import hookimpl
from tuneforge.tools.cli import main
from tuneforge.errors import CheckpointError

from conftest import MICRO, StopAt, micro_config

ENV = {**os.environ, "TUNEFORGE_LOAD_PLUGINS": ""}


def one_error_line(capsys, code, expect):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tuneforge: error")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0], lines[0]
    return lines[0]


def train_cli(out, *extra):
    return main(["train", "-m", "pretrain", "--model", MICRO, "--batch-size", "4", "--seq-len", "16",
                 "--eval-every", "0", "--out", str(out), *extra])


# -- signals ---------------------------------------------------------------------------------------------------

SIGNAL_IN_FINAL_EVAL = '''
import os, signal, sys
import tuneforge
from tuneforge import hookimpl

class TermDuringFinalEval:
    name = "term-at-end"

    @hookimpl
    def tuneforge_evaluate(self, run):
        if run.step == 4:  # the final evaluation: the loop is over
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

result = tuneforge.train(model="%s", mechanisms=["pretrain", TermDuringFinalEval()], steps=4, batch_size=4,
                         seq_len=16, eval_every=0, out=sys.argv[1])
print(result.summary["status"])
''' % MICRO


def test_a_signal_after_the_last_step_still_saves_the_run(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_IN_FINAL_EVAL, str(out)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr  # the handler, not the default action (which killed it: rc -15)
    assert proc.stdout.strip() == "interrupted by SIGTERM"
    assert ckpt.find_latest(out).name == "step-00000004"
    assert json.loads((out / "summary.json").read_text())["checkpoint"].endswith("step-00000004")


class TwoSignals:
    """Sends SIGINT twice in one step, as a user pressing Ctrl-C twice quickly."""

    name = "two-signals"

    @hookimpl
    def tuneforge_step_end(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)


def test_a_second_signal_aborts_inside_the_loop(tmp_path):
    cfg = micro_config(tmp_path, steps=50)
    with pytest.raises(KeyboardInterrupt):
        tuneforge.train(cfg.replace(mechanisms=["pretrain", TwoSignals()]))
    assert ckpt.list_checkpoints(tmp_path / "run") == []  # aborted without saving, as the message promises


# -- one process per folder ------------------------------------------------------------------------------------

def start_long_run(out):
    cmd = [sys.executable, "-m", "tuneforge", "train", "-m", "pretrain", "--model", MICRO, "--steps", "100000",
           "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").stat().st_size:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.1)
    return proc


def test_two_processes_on_one_out_the_second_is_refused_and_a_dead_owner_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    first = start_long_run(out)
    try:
        config_before = (out / "config.json").read_text()
        line = one_error_line(capsys, train_cli(out, "--steps", "3", "--resume", "auto"), "is in use by pid")
        assert str(first.pid) in line and str(out) in line
        assert (out / "config.json").read_text() == config_before and first.poll() is None
    finally:
        first.kill()  # SIGKILL: the owner dies holding the lock
        first.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid  # what a dead owner leaves
    assert train_cli(out, "--steps", "3", "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of pid {first.pid}" in err and "no longer running" in err
    assert not (out / ".lock").exists()  # released: removed by its owner at the end


# -- links and pointers ----------------------------------------------------------------------------------------

def test_resume_writes_nothing_through_a_link(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "--steps", "2") == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    one_error_line(capsys, train_cli(out, "--steps", "4", "--resume", "auto"), "metrics.jsonl is a symbolic link")
    assert victim.read_text() == "precious\n"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]


def test_a_latest_pointer_that_leaves_the_run_folder_is_refused(tmp_path, capsys):
    other, out = tmp_path / "other", tmp_path / "run"
    assert train_cli(other, "--steps", "3") == 0
    assert train_cli(out, "--steps", "2") == 0
    (out / "latest").write_text("../other/step-00000003\n")
    one_error_line(capsys, train_cli(out, "--steps", "4", "--resume", "auto"), "outside the run folder")
    assert ckpt.find_latest(other).name == "step-00000003"
    with pytest.raises(CheckpointError, match="outside the run folder"):
        tuneforge.load_model(str(out))


def test_a_step_folder_that_is_a_link_is_no_checkpoint_of_the_run(tmp_path):
    assert train_cli(tmp_path / "other", "--steps", "3") == 0
    out = tmp_path / "run"
    out.mkdir()
    (out / "step-00000009").symlink_to(tmp_path / "other" / "step-00000003")
    assert ckpt.list_checkpoints(out) == [] and ckpt.find_latest(out) is None
    (out / "latest").write_text("step-00000009\n")
    with pytest.raises(CheckpointError, match="symbolic link"):
        ckpt.find_latest(out)


# -- damaged checkpoints ---------------------------------------------------------------------------------------

def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage_latest(out):
    (out / "latest").write_text("\x00\x17 nonsense\n")


def step_without_step(out):
    state = out / "step-00000004" / "state.json"
    s = json.loads(state.read_text())
    del s["step"]
    state.write_text(json.dumps(s))


@pytest.mark.parametrize("damage, set_aside", [
    (lambda out: truncate(out / "step-00000004" / "model.safetensors"), True),
    (lambda out: truncate(out / "step-00000004" / "optimizer.safetensors"), True),
    (step_without_step, True),
    (lambda out: (out / "step-00000004" / "state.json").write_text("{not json"), True),
    (garbage_latest, False),
], ids=["model-truncated", "optimizer-truncated", "state-without-step", "state-not-json", "latest-garbage"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage, set_aside, capsys):
    out = tmp_path / "run"
    whole = tuneforge.train(micro_config(tmp_path / "whole", steps=6, save_every=2))
    tuneforge.train(micro_config(tmp_path, steps=6, save_every=2, mechanisms=["pretrain", StopAt(4)]))
    damage(out)
    capsys.readouterr()
    resumed = tuneforge.train(micro_config(tmp_path, steps=6, save_every=2, resume="auto"))
    err = capsys.readouterr().err
    expected = "step-00000002" if set_aside else "step-00000004"
    assert resumed.run.resumed_from.name == expected
    kept = [p.name for p in out.iterdir() if ".damaged-" in p.name]
    if set_aside:  # named in one line, renamed (never deleted) so it can be looked at
        assert len(kept) == 1 and kept[0].startswith("step-00000004.damaged-") and "step-00000004" in err
    else:
        assert kept == []
    a, b = load_file(str(whole.checkpoint / "model.safetensors")), load_file(str(resumed.checkpoint / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the fallback resumed exactly


def test_every_checkpoint_damaged_is_an_error_and_nothing_moves(tmp_path, capsys):
    out = tmp_path / "run"
    tuneforge.train(micro_config(tmp_path, steps=2))
    truncate(out / "step-00000002" / "model.safetensors")
    code = train_cli(out, "--steps", "4", "--resume", "auto")
    one_error_line(capsys, code, "every checkpoint in")
    assert (out / "step-00000002").is_dir()
    one_error_line(capsys, train_cli(out, "--steps", "2"), "already holds a run")  # a fresh run would overwrite it
    assert (out / "step-00000002" / "model.safetensors").stat().st_size > 0
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable"):
        tuneforge.load_model(str(out / "step-00000002"))


def test_a_kill_during_rotation_leaves_nothing_that_is_not_cleaned(tmp_path):
    out = tmp_path / "run"
    tuneforge.train(micro_config(tmp_path, steps=4, save_every=2, keep_last=1))
    assert [p.name for p in out.iterdir() if p.name.startswith("step-")] == ["step-00000004"]
    # What a kill inside a deletion leaves: by the old rmtree, a step folder with state.json already gone; by the
    # rename-then-delete of today, a hidden .old-step folder.
    half = out / "step-00000001"
    half.mkdir()
    (half / "optimizer.safetensors").write_bytes(b"partial")
    old = out / ".old-step-00000003-999"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"partial")
    resumed = tuneforge.train(micro_config(tmp_path, steps=6, save_every=2, keep_last=1, resume="auto"))
    assert resumed.run.resumed_from.name == "step-00000004"
    assert sorted(p.name for p in out.iterdir() if "step" in p.name) == ["step-00000006"]


def test_rotation_deletes_only_step_folders_it_can_identify(tmp_path):
    out = tmp_path / "run"
    notes = out / "step-notes"
    notes.mkdir(parents=True)
    (notes / "mine.txt").write_text("keep")
    tuneforge.train(micro_config(tmp_path, steps=4, save_every=1, keep_last=2))
    assert (notes / "mine.txt").read_text() == "keep"
    with pytest.raises(CheckpointError, match="refusing to delete"):
        ckpt.remove_step(notes)


# -- changed options on resume ---------------------------------------------------------------------------------

def test_resume_with_changed_options_says_so_and_records_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "--steps", "2") == 0
    capsys.readouterr()
    assert train_cli(out, "--steps", "4", "--batch-size", "2", "--resume", "auto") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "changed options" in line]
    assert len(lines) == 1 and "steps 2 -> 4" in lines[0] and "batch_size 4 -> 2" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resume_changes"] == {"steps": [2, 4], "batch_size": [4, 2]}


# -- the output folder and the disk ----------------------------------------------------------------------------

def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    one_error_line(capsys, train_cli(out, "--steps", "2"), "is a file, not a folder")
    assert out.read_text() == "mine"


def test_a_refused_run_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code = main(["train", "-m", "pretrian", "--out", str(out)])
    one_error_line(capsys, code, "pretrian")
    assert not out.exists()


@pytest.fixture
def mount(tmp_path):
    """A small tmpfs of its own (root only): a disk that fills, or one that is read-only."""
    made = []

    def make(options):
        where = tmp_path / f"mnt{len(made)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        made.append(where)
        return where

    yield make
    for where in made:
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(mount, capsys):
    disk = mount("size=256k")
    out = disk / "run"
    one_error_line(capsys, train_cli(out, "--steps", "2"), "No space left on device")
    assert not out.exists()  # the run created it and saved nothing: removed, the space given back


def test_a_full_disk_mid_run_keeps_the_last_checkpoint(mount, capsys):
    disk = mount("size=12m")  # room for one checkpoint of the micro model, not for ever more of them
    out = disk / "run"
    code = train_cli(out, "--steps", "400", "--save-every", "1", "--keep-last", "400")
    line = one_error_line(capsys, code, "No space left on device")
    assert "the last complete one is" in line
    assert ckpt.damage(ckpt.find_latest(out)) is None  # the newest complete checkpoint is whole


def test_a_read_only_disk_is_one_line(mount, capsys):
    disk = mount("size=1m,ro")
    one_error_line(capsys, train_cli(disk / "run", "--steps", "2"), "read-only")
