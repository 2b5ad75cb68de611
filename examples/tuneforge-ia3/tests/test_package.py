"""The installed package as users meet it: found through its entry point, on tuneforge's command line."""
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

import tuneforge_ia3


def tf(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}  # as a user's shell has it
    env["OMP_NUM_THREADS"] = "1"  # a tiny model: one thread is faster than two contending (see conftest.py)
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_tuneforge_plugins_lists_ia3_with_its_package_and_version():
    proc = tf("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    row = {r["name"]: r for r in json.loads(proc.stdout)}["ia3"]
    assert row["status"] == "loaded" and row["error"] is None
    assert row["package"] == "tuneforge-ia3" and not row["builtin"]
    assert row["version"] == "0.1.0" == metadata.version("tuneforge-ia3") == tuneforge_ia3.__version__
    assert row["entry_point"] == "tuneforge_ia3:IA3"
    assert row["hooks"][:3] == ["tuneforge_modify_model", "tuneforge_trainable_params", "tuneforge_validate"]
    assert "tuneforge_save" in row["hooks"] and "tuneforge_loss" in row["hooks"]


def test_the_readme_command_trains_soft_prompts_and_ia3_together(tiny_pretrained, tmp_path):
    out = tmp_path / "pt-ia3"
    proc = tf("train", "--init", str(tiny_pretrained), "-m", "prompt-tuning:tokens=4", "-m", "ia3:targets=v,mlp",
              "--data", "builtin:text", "--steps", "3", "--seq-len", "32", "--batch-size", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["mechanisms"]["ia3"]["targets"] == ["v", "mlp"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_by_plugin"] == {"prompt-tuning": 4 * 32, "ia3": 32 + 128}
    assert summary["frozen_weights"]["unchanged"]
    manifest = json.loads((out / "step-00000003" / "ia3" / "manifest.json").read_text())
    assert sorted(manifest["points"]) == ["blocks.0.attn.v", "blocks.0.mlp.down"]


def test_ia3_with_soft_prompts_on_two_processes_matches_one(tiny_pretrained, tmp_path, monkeypatch):
    """A third-party mechanism under torchrun (FSDP2 shards its vectors with the blocks): two processes train the
    same steps as one process with twice the accumulation."""
    from tuneforge.sdk.testing import losses, train_distributed

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one, two = train_distributed(tmp_path, "prompt-tuning:tokens=4", "ia3", strategy="fsdp",
                                 init=tiny_pretrained, steps=3, lr=1e-2)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5) and len(losses(one)) == 3
    moved = [json.loads((run / "summary.json").read_text())["ia3"]["mean_abs_change"] for run in (one, two)]
    assert moved[0] > 0 and moved[1] == pytest.approx(moved[0], rel=1e-4)
