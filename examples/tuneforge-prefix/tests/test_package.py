"""The installed package as users meet it: found through its entry points, on tuneforge's command line."""
import json
import os
import subprocess
import sys
from importlib import metadata

import tuneforge
import tuneforge_prefix


def tf(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}  # as a user's shell has it
    env["OMP_NUM_THREADS"] = "1"  # a tiny model: one thread is faster than two contending (see conftest.py)
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_tuneforge_plugins_lists_both_mechanisms_with_their_package():
    proc = tf("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    for name, entry in (("prefix", "tuneforge_prefix:PrefixTuning"), ("simpo", "tuneforge_prefix:SimPO")):
        row = rows[name]
        assert row["status"] == "loaded" and row["error"] is None and not row["builtin"]
        assert row["package"] == "tuneforge-prefix" and row["entry_point"] == entry
        assert row["version"] == "0.1.0" == metadata.version("tuneforge-prefix") == tuneforge_prefix.__version__
    assert {"tuneforge_modify_model", "tuneforge_save", "tuneforge_loss"} <= set(rows["prefix"]["hooks"])
    assert {"tuneforge_data", "tuneforge_loss", "tuneforge_evaluate"} <= set(rows["simpo"]["hooks"])


def test_the_readme_command_trains_a_prefix_with_simpo_and_load_model_rebuilds_it(well_pretrained, tmp_path):
    out = tmp_path / "prefix-simpo"
    proc = tf("train", "--init", str(well_pretrained), "-m", "prefix:tokens=4,layers=-1", "-m",
              "simpo:gamma=0.5,eval_prompts=4,max_new_tokens=8", "--data", "builtin:rankings", "--steps", "2",
              "--batch-size", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["mechanisms"]["prefix"]["tokens"] == 4 and config["mechanisms"]["simpo"]["gamma"] == 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "simpo" and summary["frozen_weights"]["unchanged"]
    model = tuneforge.load_model(out)  # the prefix comes back in the kv_prefix slot, with its trained values
    assert isinstance(model.kv_prefix, tuneforge_prefix.Prefixes)
    assert model.kv_prefix.parts["default"].keys.shape[2] == 4
