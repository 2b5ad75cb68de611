"""``tuneforge new-plugin NAME``: a pip-installable package for a new mechanism, whose tests pass as written.

The package is the smallest complete mechanism: an entry point in the group ``tuneforge``, a class with typed
``Options``, a real trainable module found by structure (a learned per-channel gain on each block's output),
and tests that train it for a few steps with :mod:`tuneforge.sdk.testing`. Its author then changes the mechanism,
not the plumbing. See ``docs/writing-mechanisms.md`` for the contract the generated code follows.
"""
from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

from tuneforge.errors import ConfigError
from tuneforge.common.names import inside

__all__ = ["new_plugin"]

# An entry-point name users type after -m: a letter first, then letters, digits, '-' and '_'. No ':', ',' or
# '=', which the NAME:key=value syntax gives meaning to.
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

# Names the generated module defines or imports itself; a class of the same name would shadow one of them.
_TAKEN = {"ChannelGain", "DefaultObjective", "ObjectiveOptions", "ConfigError", "hookimpl", "Options"}


def _module_name(name: str) -> str:
    return "tuneforge_" + name.replace("-", "_").lower()


def _class_name(name: str) -> str:
    cls = "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_]+", name) if part)
    # 'none' -> 'None' is a keyword, 'channel-gain' the template's own helper: keep the class importable.
    return cls + "Mechanism" if keyword.iskeyword(cls) or cls in _TAKEN else cls


def _builtin_names() -> set[str]:
    from tuneforge.engine.registry import discover

    return {info.name for info in discover(strict=False).values() if info.builtin}


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError("new-plugin: give the mechanism a name, e.g. 'tuneforge new-plugin my-gain'")
    if not _NAME.match(name):
        raise ConfigError(
            f"new-plugin: {name!r} cannot be a mechanism name: start with a letter and use only letters, digits, "
            "'-' and '_' (it is what users type after -m, e.g. my-gain)"
        )
    builtins = _builtin_names()
    if name in builtins:
        raise ConfigError(
            f"new-plugin: '{name}' is a built-in mechanism of tuneforge; choose another name (e.g. my-{name}). "
            f"Built-ins: {', '.join(sorted(builtins))}"
        )


def _check_dest(dest: Path, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"new-plugin: {dest} is a file, not a folder; give another --dir")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ConfigError(
            f"new-plugin: {dest} exists and is not empty; nothing was written. Give another --dir, or --force to "
            "write the package's files into it (files of the same name are replaced, others are left alone)"
        )


def new_plugin(name: str, dest: str | Path | None = None, *, force: bool = False) -> Path:
    """Write a pip-installable package for a new mechanism ``name`` into ``dest`` and return that folder.

    :param name: the entry-point name (what ``-m NAME`` uses): a letter, then letters, digits, '-' or '_';
        not the name of a built-in mechanism.
    :param dest: the folder to write (default: ``./tuneforge-NAME``); created if missing.
    :param force: write into a non-empty folder (files of the same name are replaced, others kept).
    :raises ConfigError: a bad name, or a non-empty ``dest`` without ``force``. Nothing is written then.

    The package holds ``pyproject.toml`` (entry point ``NAME = "tuneforge_NAME:ClassName"``), ``README.md``,
    the mechanism module and ``tests/`` that pass as generated: ``pip install -e DEST && pytest DEST``.
    """
    _check_name(name)
    dest = Path(dest) if dest is not None else Path.cwd() / f"tuneforge-{name}"
    _check_dest(dest, force)
    values = {"name": name, "module": _module_name(name), "cls": _class_name(name),
              "dist": f"tuneforge-{name}", "test": f"test_{name.replace('-', '_').lower()}"}
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"{values['module']}/__init__.py": _MODULE,
        "tests/conftest.py": _CONFTEST,
        f"tests/{values['test']}.py": _TESTS,
    }
    # Every file is rendered, and its path checked to stay in dest (a symbolic link there could point anywhere),
    # before the first is written, so a template error or a refused path leaves no half package.
    rendered = {inside(dest, path): Template(text).substitute(values) for path, text in files.items()}
    for target, text in rendered.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return dest.resolve()


# -- templates (string.Template: ${name} is the mechanism, ${module} its package, ${cls} its class) -------------

_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=64", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "${dist}"
version = "0.1.0"
description = "The ${name} mechanism for tuneforge"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["tuneforge"]

[project.optional-dependencies]
test = ["pytest"]

# This line is what makes the mechanism exist: tuneforge finds plugins through this entry-point group, and
# users name it with -m ${name}.
[project.entry-points.tuneforge]
${name} = "${module}:${cls}"

[tool.setuptools]
packages = ["${module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

_README = '''\
# ${dist}

The `${name}` mechanism for tuneforge, as its own pip-installable package (written by
`tuneforge new-plugin ${name}`).

As generated it is a working mechanism: a learned per-channel gain on the output of each transformer block,
starting at 1 so the model is unchanged until it trains. Only the gains train; every weight of the base model
stays frozen. With no other objective in the run it learns the data as given (next tokens on text, label
words on labelled records), like `lora` and `adapter` do.

## Make it yours

- `${module}/__init__.py`: the mechanism, class `${cls}`.
  - `Options`: its typed options; users pass them as `-m ${name}:last=2` or in a TOML table `[mechanisms.${name}]`.
  - `tuneforge_modify_model`: what it inserts into the model. Keep it deterministic: a saved model is rebuilt
    by running it again, then loading the weights.
  - `tuneforge_trainable_params`: the parameters it trains, found by structure (the modules it inserted).
  - the comments at the end of the class: the hooks for an objective of your own (`tuneforge_data`,
    `tuneforge_loss`), for state outside the parameters (`tuneforge_save`, `tuneforge_load`) and for refusing
    combinations (`tuneforge_validate`).
- `tests/${test}.py`: change the expectations with the mechanism; keep the frozen-weights check.
- `pyproject.toml`: the entry point `${name} = "${module}:${cls}"` in the group `tuneforge`.

The hook contract is `tuneforge.hookspecs`; the guide is `docs/writing-mechanisms.md` in tuneforge.

## Run it

```bash
pip install -e '.[test]'      # offline, with tuneforge already installed: pip install --no-build-isolation -e .
pytest                        # checks the hooks, trains a few steps on a tiny model, rebuilds the saved model
tuneforge plugins             # lists ${name} with its package, version and hooks
tuneforge train -m pretrain --steps 300 --out runs/pre
tuneforge train --init runs/pre -m ${name} --data builtin:text --steps 100 --out runs/${name}
```
'''

_MODULE = '''\
"""``${name}``: a learned per-channel gain on the output of each transformer block; the base model is frozen.

Generated by ``tuneforge new-plugin ${name}`` as a starting point: replace the gain with your mechanism and keep
the shape of the class. The hook contract is ``tuneforge.hookspecs``.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from tuneforge.sdk import ConfigError, DefaultObjective, ObjectiveOptions, hookimpl

__all__ = ["${cls}", "ChannelGain"]

# The child each chosen block holds its gain under. The gain is a submodule (not a bare tensor) so that it is
# saved in model.safetensors with the rest of the model and comes back when the model is rebuilt.
SLOT = "${module}_gain"


class ChannelGain(nn.Module):
    """A learned gain per channel ``(C,)`` that multiplies a block's output ``(B, T, C)``."""

    def __init__(self, channels: int, device=None):
        super().__init__()
        # Ones: the model computes exactly what it did before, and training moves it from there.
        self.gain = nn.Parameter(torch.ones(channels, device=device))

    def forward(self, x):
        return x * self.gain.to(x.dtype)  # (B, T, C)


def _scale_output(block, args, output):
    """Forward hook of a block: its output times its gain. A hook leaves every module path as it was, so
    mechanisms that find layers by path (lora's targets=q,v) still find them, before or after this one."""
    gain = getattr(block, SLOT)
    if isinstance(output, tuple):  # blocks of Hugging Face models return (hidden, ...)
        return (gain(output[0]), *output[1:])
    return gain(output)


class ${cls}(DefaultObjective):
    """A learned per-channel gain on each block's output (the ${name} mechanism); only the gains train.

    ``DefaultObjective`` gives it a default objective (the run's data as given, hooks marked trylast): any
    other objective in the run (finetune, dpo, ppo...) takes precedence. Drop it, and ``ObjectiveOptions`` below,
    for a mechanism that only ever changes which parameters move.
    """

    # The name runs and checkpoints know it by: the entry point's name in pyproject.toml. An instance passed as an
    # object (train_tiny(${cls}(...)), tuneforge.train(mechanisms=[...])) registers under it too.
    name = "${name}"
    objective_owner = "${name}"

    @dataclasses.dataclass
    class Options(ObjectiveOptions):
        last: int = 0  # put gains on the last N blocks only; 0 = every block

        def __post_init__(self):
            super().__post_init__()
            # A ValueError here reaches the user as a ConfigError naming the mechanism and its options.
            if self.last < 0:
                raise ValueError(f"last must be 0 (every block) or a number of blocks, got {self.last}")

    def __init__(self, options: Options):
        self.options = options
        self.gains: list[ChannelGain] = []

    @hookimpl
    def tuneforge_modify_model(self, model):
        # Called once per run, and again when a saved model is rebuilt (load_model, --init, --resume) before its
        # weights are loaded: it must build the same modules from the same options every time.
        blocks = list(model.blocks)  # the embedded model and Hugging Face models (--model hf:PATH) both have them
        n = self.options.last or len(blocks)
        if n > len(blocks):
            raise ConfigError(f"${name}: last={n}, but the model has {len(blocks)} blocks")
        self.gains = []
        for block in blocks[len(blocks) - n:]:
            gain = getattr(block, SLOT, None)
            if not isinstance(gain, ChannelGain):  # a model from --init may hold gains already: train those
                gain = ChannelGain(model.config.d_model, device=next(block.parameters()).device)
                block.add_module(SLOT, gain)
                block.register_forward_hook(_scale_output)
            self.gains.append(gain)

    @hookimpl
    def tuneforge_trainable_params(self):
        # The parameters of the modules this plugin inserted; the engine freezes everything else.
        return [p for gain in self.gains for p in gain.parameters()]

    @hookimpl
    def tuneforge_run_start(self, run):
        count = sum(p.numel() for p in self.tuneforge_trainable_params())
        run.log(f"${name}: training {len(self.gains)} gains ({count:,} parameters); the base model is frozen")

    # -- more hooks, when the mechanism needs them (tuneforge.hookspecs says what each gets and returns) ---------
    #
    # An objective of its own (what is optimised): implement both, and drop DefaultObjective.
    #   @hookimpl
    #   def tuneforge_data(self, run): ...             # the batches of epoch run.epoch, deterministic in run.seed
    #   @hookimpl
    #   def tuneforge_loss(self, model, batch, run): ...   # (scalar loss tensor, {"name": float})
    #
    # State outside the model's parameters (the gains need none: they are in model.safetensors):
    #   @hookimpl
    #   def tuneforge_save(self, run, path): ...       # safetensors / JSON files under path, never pickle
    #   @hookimpl
    #   def tuneforge_load(self, run, path): ...       # read them back on --resume
    #
    # Refusing a combination it cannot work in, before anything is written:
    #   @hookimpl
    #   def tuneforge_validate(self, run, model): ...  # raise ConfigError saying what to do instead
'''

_CONFTEST = '''\
# The fixtures of tuneforge.sdk.testing: tiny_model, tiny_data, tiny_pretrained, train_tiny.
pytest_plugins = ["tuneforge.sdk.testing"]
'''

_TESTS = '''\
"""Tests of the ${name} mechanism: pip install -e . (the entry point must be installed), then pytest."""
import pytest
import torch

from tuneforge.sdk import ConfigError, load_model
from tuneforge.sdk.testing import check_plugin, losses, train_distributed

from ${module} import ChannelGain, ${cls}

NAME = "${name}"


def gains(model):
    """The gains in a model, found by their type."""
    return [m for m in model.modules() if isinstance(m, ChannelGain)]


def test_hooks_match_the_contract():
    assert ${cls}.name == NAME  # the entry point's name: runs given the class as an object record it so
    hooks = check_plugin(${cls})
    assert {"tuneforge_modify_model", "tuneforge_trainable_params"} <= set(hooks)


def test_new_gains_leave_the_output_unchanged(tiny_model):
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = tiny_model(x)
        plugin = ${cls}(${cls}.Options())
        plugin.tuneforge_modify_model(model=tiny_model)
        after = tiny_model(x)
    assert len(gains(tiny_model)) == len(tiny_model.blocks)
    torch.testing.assert_close(after, before)
    inserted = {id(p) for g in gains(tiny_model) for p in g.parameters()}
    assert {id(p) for p in plugin.tuneforge_trainable_params()} == inserted


def test_only_the_gains_train(train_tiny):
    result = train_tiny(NAME)
    found = gains(result.model)
    assert found and result.summary["objective"] == NAME  # its default objective: nothing else was added
    assert result.summary["trainable_params"] == len(found) * result.model.config.d_model
    assert result.summary["frozen_weights"]["unchanged"]  # every base weight is bit-for-bit what it was
    for g in found:
        assert not torch.equal(g.gain.detach(), torch.ones_like(g.gain)), "a gain did not move"


def test_a_saved_model_is_rebuilt_with_its_trained_gains(train_tiny):
    result = train_tiny(NAME)
    rebuilt = load_model(result.out)  # replays tuneforge_modify_model, then loads the saved weights
    assert len(gains(rebuilt)) == len(gains(result.model))
    for saved, loaded in zip(gains(result.model), gains(rebuilt)):
        torch.testing.assert_close(loaded.gain, saved.gain.detach())
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), result.model.eval()(x))


def test_bad_options_are_refused_before_training(train_tiny):
    with pytest.raises(ConfigError, match="last"):
        train_tiny(f"{NAME}:last=-1")


def test_two_processes_train_as_one(tmp_path):
    """torchrun, 2 CPU processes, FSDP2 sharding the gains with their blocks: the same steps as one process."""
    one, two = train_distributed(tmp_path, NAME, strategy="fsdp", steps=3)
    assert len(losses(one)) == 3 and losses(two) == pytest.approx(losses(one), rel=1e-5)
'''
