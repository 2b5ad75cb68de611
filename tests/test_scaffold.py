"""``tuneforge new-plugin``: the package it writes installs, is discovered, and its own tests pass as generated."""
import json
import os
import subprocess
import sys

import pytest

from tuneforge import ConfigError
from tuneforge.tools.scaffold import new_plugin


def _env(**extra):
    """The environment of a fresh shell: no TUNEFORGE_* setting of this test session leaks into the child."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update(extra)
    return env


def test_generated_package_installs_is_listed_and_its_tests_pass(tmp_path, capfd):
    from tuneforge.tools.cli import main

    pkg, site = tmp_path / "pkg", tmp_path / "site"
    # `tuneforge new-plugin` by main() in this process (it only writes files; a process of its own is ~2 s more);
    # the listing and the package's tests below run in real processes
    made = main(["new-plugin", "my-gain", "--dir", str(pkg)])
    assert made == 0, capfd.readouterr().err
    assert (pkg / "tuneforge_my_gain" / "__init__.py").is_file() and (pkg / "tests" / "test_my_gain.py").is_file()

    # Into a folder of its own, so the environment the suite runs in is left as it was.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(pkg)], check=True, capture_output=True, timeout=300)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))

    listed = subprocess.run([sys.executable, "-m", "tuneforge", "plugins", "--json"], capture_output=True, text=True,
                            env=_env(PYTHONPATH=path, TUNEFORGE_LOAD_PLUGINS="my-gain"), timeout=120)
    assert listed.returncode == 0, listed.stderr
    by = {r["name"]: r for r in json.loads(listed.stdout)}
    mine = by["my-gain"]
    assert mine["status"] == "loaded", mine["error"]
    assert (mine["package"], mine["version"], mine["builtin"]) == ("tuneforge-my-gain", "0.1.0", False)
    assert mine["entry_point"] == "tuneforge_my_gain:MyGain"
    assert {"tuneforge_modify_model", "tuneforge_trainable_params", "tuneforge_data",
            "tuneforge_loss"} <= set(mine["hooks"])
    # its option shown with the help its declaration's comment gives it (tuneforge plugins my-gain prints the same)
    assert {"name": "last", "type": "int", "required": False, "default": 0,
            "help": "put gains on the last N blocks only; 0 = every block"} in mine["options"]

    # From outside the package folder, so its tests import the installed copy, found through its entry point.
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg)],
                            capture_output=True, text=True, cwd=tmp_path, env=_env(PYTHONPATH=path), timeout=300)
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-2000:]
    assert "6 passed" in tested.stdout, tested.stdout[-2000:]


@pytest.mark.parametrize("name", ["", "1gain", "-gain", "my gain", "gain:rank=2", "a,b", "gain.v2", "gäin"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="name"):
        new_plugin(name, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("name", ["lora", "prompt-tuning", "progress"])
def test_builtin_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match=f"'{name}' is a built-in"):
        new_plugin(name, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_a_non_empty_folder_is_refused_without_force(tmp_path):
    dest = tmp_path / "pkg"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--force"):
        new_plugin("my-gain", dest)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]  # nothing written

    assert new_plugin("my-gain", dest, force=True) == dest.resolve()
    assert (dest / "notes.txt").read_text() == "mine"  # force replaces the package's files, not the author's
    assert (dest / "pyproject.toml").is_file()


def test_an_empty_folder_and_the_default_folder_are_used(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert new_plugin("a", tmp_path / "empty") == (tmp_path / "empty").resolve()
    monkeypatch.chdir(tmp_path)
    assert new_plugin("my_Gain2") == (tmp_path / "tuneforge-my_Gain2").resolve()


def test_names_become_a_module_a_class_and_an_entry_point(tmp_path):
    pyproject = (new_plugin("my-gain", tmp_path / "a") / "pyproject.toml").read_text()
    assert 'name = "tuneforge-my-gain"' in pyproject
    assert 'my-gain = "tuneforge_my_gain:MyGain"' in pyproject
    module = (tmp_path / "a" / "tuneforge_my_gain" / "__init__.py").read_text()
    assert "class MyGain(" in module and 'objective_owner = "my-gain"' in module
    # A class name that would be a keyword or the module's own helper gets a suffix, and still compiles.
    for name, cls in (("none", "NoneMechanism"), ("channel-gain", "ChannelGainMechanism")):
        folder = new_plugin(name, tmp_path / name)
        source = (folder / f"tuneforge_{name.replace('-', '_')}" / "__init__.py").read_text()
        compile(source, name, "exec")
        assert f"class {cls}(DefaultObjective)" in source


def test_cli_refuses_with_a_clear_message(tmp_path):
    from tuneforge.tools.cli import main

    assert main(["new-plugin", "pretrain", "--dir", str(tmp_path / "pkg")]) == 2
    assert not (tmp_path / "pkg").exists()
