"""A third-party mechanism, pip-installed into a temporary location, found through the entry-point group."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN = '''
import dataclasses
import torch
import torch.nn.functional as F
from tuneforge import hookimpl


class ToyObjective:
    """Predict the next token of random byte strings (a stand-in for someone's own objective)."""

    @dataclasses.dataclass
    class Options:
        length: int = 16

    def __init__(self, options):
        self.options = options

    @hookimpl
    def tuneforge_trainable_params(self, model):
        return list(model.parameters())

    @hookimpl
    def tuneforge_data(self, run):
        g = torch.Generator().manual_seed(run.seed + run.epoch)
        return [torch.randint(0, 256, (4, self.options.length + 1), generator=g) for _ in range(8)]

    @hookimpl
    def tuneforge_loss(self, model, batch, run):
        x = batch.to(run.device)
        logits = model(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)), {"toy": 1.0}


class Typo:
    @hookimpl
    def tuneforge_los(self, model, batch):
        return None
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "tuneforge-toy"
version = "0.3.0"

[project.entry-points.tuneforge]
toy = "tuneforge_toy:ToyObjective"
broken = "tuneforge_toy_broken:Plugin"
typo = "tuneforge_toy:Typo"

[tool.setuptools]
py-modules = ["tuneforge_toy", "tuneforge_toy_broken"]
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "tuneforge_toy.py").write_text(textwrap.dedent(PLUGIN))
    (pkg / "tuneforge_toy_broken.py").write_text("import a_module_that_does_not_exist\n")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(pkg)], check=True, capture_output=True, timeout=300)
    return target


def tf(site, *args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    full["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, env=full,
                          timeout=300)


def test_installed_plugin_is_listed_and_the_broken_one_reported(site):
    proc = tf(site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    by = {r["name"]: r for r in json.loads(proc.stdout)}
    assert by["toy"]["status"] == "loaded" and by["toy"]["package"] == "tuneforge-toy"
    assert by["toy"]["version"] == "0.3.0" and not by["toy"]["builtin"]
    assert by["toy"]["hooks"] == ["tuneforge_trainable_params", "tuneforge_data", "tuneforge_loss"]
    assert by["broken"]["status"] == "error" and "a_module_that_does_not_exist" in by["broken"]["error"]
    assert by["typo"]["status"] == "error" and "did you mean 'tuneforge_loss'" in by["typo"]["error"]
    assert by["pretrain"]["status"] == "loaded"  # broken plugins do not stop the others


def test_third_party_mechanism_trains_with_typed_options(site, tmp_path):
    proc = tf(site, "train", "-m", "toy:length=8", "--model", "tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32",
              "--steps", "3", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["mechanisms"]["toy"] == {"length": 8}
    assert "toy" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_strict_mode_makes_a_broken_plugin_fatal(site):
    proc = tf(site, "train", "-m", "pretrain", "--steps", "1", env={"TUNEFORGE_STRICT_PLUGINS": "1"})
    assert proc.returncode == 2
    assert "'broken'" in proc.stderr and "tuneforge-toy" in proc.stderr and "STRICT" in proc.stderr


def test_allowlist_loads_only_named_third_party_plugins(site):
    names = {r["name"] for r in json.loads(tf(site, "plugins", "--json", env={"TUNEFORGE_LOAD_PLUGINS": "toy"}).stdout)}
    assert "toy" in names and "broken" not in names and "pretrain" in names
    names = {r["name"] for r in json.loads(tf(site, "plugins", "--json", env={"TUNEFORGE_LOAD_PLUGINS": ""}).stdout)}
    assert "toy" not in names and "pretrain" in names


def test_plugin_flags_on_the_command_line(site, monkeypatch, capfd):
    """The flags read by ``main`` in this process, with ``site`` on sys.path and no TUNEFORGE_* variable, as ``tf``
    starts a fresh process (each call ~2 s less). The tests above run discovery and strict mode in real processes,
    and so does the strict run here."""
    from tuneforge.tools.cli import main

    monkeypatch.syspath_prepend(str(site))

    def here(*args):
        for name in ("TUNEFORGE_LOAD_PLUGINS", "TUNEFORGE_STRICT_PLUGINS"):  # main() sets them from the flags
            monkeypatch.delenv(name, raising=False)
        capfd.readouterr()
        code = main(list(args))
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    def listed(*flags):
        proc = here(*flags, "plugins", "--json")
        assert proc.returncode == 0, proc.stderr
        return {r["name"] for r in json.loads(proc.stdout)}

    everything = listed()
    assert {"toy", "broken", "pretrain"} <= everything
    assert listed("--plugins", "toy") & {"toy", "broken"} == {"toy"} and "pretrain" in listed("--plugins", "toy")
    without = listed("--no-plugins")
    assert "toy" not in without and "broken" not in without and "lora" in without  # built-ins always load
    strict = tf(site, "--strict-plugins", "train", "-m", "pretrain", "--steps", "1")
    assert strict.returncode == 2 and "'broken'" in strict.stderr and "--strict-plugins" in strict.stderr
    # strict with the broken package left out by the allowlist: nothing broken is loaded, so the run goes on
    ok = here("--strict-plugins", "--plugins", "toy", "plugins")
    assert ok.returncode == 0, ok.stderr
    clash = here("--no-plugins", "--plugins", "toy", "plugins")
    assert clash.returncode == 2 and "contradict" in clash.stderr


def test_tiny_runs_add_the_plugin_that_declares_itself_the_test_objective(monkeypatch):
    """sdk.testing names no mechanism: the objective it adds is the installed plugin whose class says so."""
    from tuneforge import ConfigError
    from tuneforge.engine import registry
    from tuneforge.sdk import testing

    class Scales:  # a mechanism that brings no objective of its own
        pass

    scales = Scales()
    assert testing.default_objective() == "finetune"
    assert testing._tiny_run([scales], testing._INSTALLED, {})[0] == [scales, "finetune"]
    assert testing._tiny_run([scales], None, {})[0] == [scales]
    assert testing._tiny_run(["lora"], testing._INSTALLED, {})[0] == ["lora"]  # lora is a default objective
    found = registry.discover()
    monkeypatch.setattr(registry, "discover", lambda **kw: {
        n: i for n, i in found.items() if not getattr(i.obj, "test_objective", False)})
    with pytest.raises(ConfigError, match="no installed plugin is a test objective.*pass objective=NAME"):
        testing.train_tiny(scales)
