"""Testing a mechanism: a tiny model, tiny data, and a short real run with your plugin in it.

Everything here runs in seconds on a laptop CPU and touches nothing outside the folders it is given. Use the
functions directly, or load the pytest fixtures with one line in your ``conftest.py``::

    pytest_plugins = ["tuneforge.sdk.testing"]

    def test_my_mechanism_trains(train_tiny):
        result = train_tiny("my-mechanism:rank=2")          # + finetune, since my-mechanism is no objective
        assert result.summary["trainable_params"] > 0
        assert result.summary["frozen_weights"]["unchanged"]

:func:`train_distributed` runs a plugin on 2 processes under torchrun and on one, for comparing their
:func:`losses`: a mechanism that keeps per-rank state, or writes files on every rank, shows up there.

A run names mechanisms exactly as ``tuneforge train -m`` does: an installed plugin by its entry-point name
(``"ia3:targets=k,v"``), or a plugin object (``MyPlugin(MyPlugin.Options(...))``) to test one before it is
installed. A run must have one objective: :func:`train_tiny` adds the installed plugin that declares itself the
test objective (``test_objective = True`` on its class: tuneforge's ``finetune``, next-token prediction on the
text; see :func:`default_objective`) when none of the named mechanisms brings one. Beside a plugin that chooses
what trains, ``finetune`` trains nothing of its own, so a parameterisation (LoRA-like) plugin is tested with
everything else frozen.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

try:  # the fixtures need pytest; the functions do not
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

__all__ = [
    "TINY", "tiny_model", "tiny_hf_folder", "tiny_dataset", "pretrained_tiny", "train_tiny", "train_distributed", "losses",
    "check_plugin", "snapshot", "changed", "needs_objective", "default_objective", "PRETRAINED_STEPS",
]

#: A one-block model with a 64-token context: a step takes milliseconds on one CPU core.
TINY = "tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=64"

# The settings of every tiny run unless the caller overrides them: short, no evaluation in between.
_RUN_DEFAULTS = dict(data="builtin:text", steps=4, batch_size=4, seq_len=32, warmup=1, lr=3e-3, eval_every=0)


class _Installed:
    """The default ``objective=`` of the tiny runs: :func:`default_objective`, looked up only when one is needed."""

    def __repr__(self) -> str:
        return "<the installed test objective>"


_INSTALLED: Any = _Installed()


def tiny_model(seed: int = 0, *, spec: str = TINY) -> torch.nn.Module:
    """The model ``spec`` names (default :data:`TINY`; any ``--model`` spec, e.g. ``hf:PATH`` of a folder from
    :func:`tiny_hf_folder`), built as a run builds it, seeded, in eval mode."""
    from tuneforge.models.factory import build

    return build(spec, seed=seed)[0].eval()


def tiny_hf_folder(folder: str | Path, family: str = "llama", *, d_model: int = 32, n_layers: int = 2,
                   n_heads: int = 4, context: int = 128, vocab_size: int = 320) -> Path:
    """A tiny random Hugging Face model folder of ``family`` (gpt2, llama, qwen2) with its tokenizer, written by
    ``tuneforge hf-tiny`` as a user would run it (no download); returns the folder (use it as ``hf:FOLDER``)."""
    import subprocess
    import sys

    folder = Path(folder)
    command = [sys.executable, "-m", "tuneforge", "hf-tiny", str(folder), "--family", family, "--d-model",
               str(d_model), "--layers", str(n_layers), "--heads", str(n_heads), "--context", str(context),
               "--vocab", str(vocab_size), "--train-steps", "0"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return folder


def tiny_dataset(folder: str | Path, kind: str = "text", *, n: int = 64) -> Path:
    """Write ``n`` records of the embedded world as a JSON-lines file in ``folder`` and return its path.

    :param kind: ``text`` (``{"text"}``), ``sentiment`` or ``topic`` (``{"text", "label"}``), or ``rankings``
        (``{"prompt", "responses", "ranking"}``): the shapes the built-in objectives read.
    """
    from tuneforge.data.world import builtin

    records = builtin(kind, split="train")[:n]
    path = Path(folder) / f"tiny-{kind}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


#: Pretraining steps of :func:`pretrained_tiny`: the fewest after which a soft prompt, LoRA and IA³ each lower their
#: held-out loss on a domain the model was not adapted to (the world's reviews as text) within 30 steps. Measured:
#: after 150 or 300 steps none does reliably (a soft prompt and LoRA end higher than they start); after 600, LoRA
#: -0.07 to -0.08 nats, IA³ -0.12, a 4-token soft prompt -0.03 to -0.04. About 4 s on one CPU core.
PRETRAINED_STEPS = 600


def pretrained_tiny(folder: str | Path, *, steps: int = PRETRAINED_STEPS, seed: int = 0) -> Path:
    """Pretrain :data:`TINY` for ``steps`` steps (default :data:`PRETRAINED_STEPS`) into ``folder`` and return the
    run folder: the ``init`` of runs that adapt a model rather than start from noise, trained far enough that a
    parameterisation has something to adapt."""
    from tuneforge.engine.loop import train

    out = Path(folder)
    train(model=TINY, mechanisms=["pretrain"], out=str(out), seed=seed, **{**_RUN_DEFAULTS, "steps": steps})
    return out


def needs_objective(mechanisms: list) -> bool:
    """Whether none of ``mechanisms`` (names with options, or plugin objects) implements the objective hooks."""
    from tuneforge.hookspecs import OBJECTIVE_HOOKS
    from tuneforge.common.options import parse_spec
    from tuneforge.engine.registry import discover, plugin_hooks

    available = None
    for m in mechanisms:
        if isinstance(m, (str, tuple)):
            name = parse_spec(m)[0] if isinstance(m, str) else m[0]
            available = discover() if available is None else available
            info = available.get(name)
            hooks = plugin_hooks(info.obj) if info is not None and info.loaded else []
        else:
            hooks = plugin_hooks(m)
        if all(h in hooks for h in OBJECTIVE_HOOKS):
            return False
    return True


def default_objective() -> str:
    """The name of the objective a tiny run adds when none of its mechanisms brings one: the installed plugin
    whose class says ``test_objective = True`` (tuneforge's own first, then by name).

    :raises tuneforge.ConfigError: no installed plugin says so.
    """
    from tuneforge.engine.registry import offering
    from tuneforge.errors import ConfigError

    found = offering("test_objective", accept=lambda value: value is True)
    if not found:
        raise ConfigError("tuneforge.sdk.testing: no installed plugin is a test objective (a plugin class with "
                          "test_objective = True, as tuneforge's finetune), and none of this run's mechanisms brings "
                          "an objective: pass objective=NAME, or reinstall tuneforge (pip install tuneforge)")
    return found[0][0]


def train_tiny(*mechanisms, out: str | Path | None = None, objective: str | None = _INSTALLED, **config: Any):
    """Train :data:`TINY` (or ``config["model"]`` / ``config["init"]``'s model) for a few steps with
    ``mechanisms`` and return the :class:`tuneforge.TrainResult`.

    :param mechanisms: ``"NAME:key=value"`` strings, ``(name, options_dict)`` pairs or plugin objects, in
        registration order.
    :param out: run folder (checkpoints, summary.json); None writes nothing.
    :param objective: appended when no named mechanism implements ``tuneforge_data`` and ``tuneforge_loss``;
        default: :func:`default_objective` (``finetune``); None: never.
    :param config: any :class:`tuneforge.TrainConfig` field, e.g. ``steps=10``, ``init=path``, ``data=path``.
    """
    from tuneforge.engine.loop import train

    mechanisms, values = _tiny_run(mechanisms, objective, config)
    return train(mechanisms=mechanisms, out=str(out) if out is not None else None, **values)


def _tiny_run(mechanisms, objective: str | None, config: dict) -> tuple[list, dict]:
    """The mechanisms (with ``objective`` added where none is named) and the TrainConfig values of a tiny run."""
    mechanisms = list(mechanisms)
    if objective is not None and needs_objective(mechanisms):
        mechanisms.append(default_objective() if objective is _INSTALLED else objective)
    values = {**_RUN_DEFAULTS, **config}
    if "model" not in values and "init" not in values:
        values["model"] = TINY
    return mechanisms, values


def train_distributed(folder: str | Path, *mechanisms: str, strategy: str = "ddp", nproc: int = 2,
                      objective: str | None = _INSTALLED, **config: Any) -> tuple[Path, Path]:
    """Train the same tiny run twice, as users launch them: one process with ``--grad-accum nproc * k``, and
    ``nproc`` processes under torchrun (gloo on CPU) with ``--grad-accum k``. The two take the same optimizer
    steps, so their losses (:func:`losses`) must agree to float tolerance, whatever the plugin does.

    :param folder: where the two run folders (``one``, ``many``) go.
    :param mechanisms: installed plugins as ``"NAME:key=value"`` (the runs are separate processes).
    :param strategy: ``ddp`` or ``fsdp``.
    :param config: :class:`tuneforge.TrainConfig` fields, e.g. ``steps=3``, ``init=path``.
    :return: (the one-process run folder, the ``nproc``-process run folder).
    :raises AssertionError: a run failed; the message holds the end of its stderr.
    """
    import subprocess
    import sys

    mechanisms, values = _tiny_run(mechanisms, objective, config)
    accum = int(values.pop("grad_accum", 1))
    args = [a for m in mechanisms for a in ("-m", m)]
    args += [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    one, many = Path(folder) / "one", Path(folder) / "many"
    for command in ([*args, "--grad-accum", str(accum * nproc), "--out", str(one)],
                    [*args, "--grad-accum", str(accum), "--strategy", strategy, "--nproc-per-node", str(nproc),
                     "--out", str(many)]):
        proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", *command], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"tuneforge train {' '.join(command)} failed:\n{proc.stderr[-3000:]}"
    return one, many


def losses(run: str | Path) -> list[float]:
    """The loss of every step of a run folder, from its metrics.jsonl."""
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def check_plugin(plugin_cls, name: str | None = None, *, options: dict | str | None = None) -> list[str]:
    """Check a plugin class as discovery does (every hookimpl is a hook of the spec and takes only its
    arguments; ``Options`` builds from ``options``) and return the hooks it implements, in lifecycle order.

    :param name: the name it is checked under (default: its declared ``name``, else its lower-cased class name).
    :param options: its options as ``-m`` gives them: a dict (``{"tokens": 8}``) or a spec string (``"tokens=8"``
        or ``"NAME:tokens=8"``); default none, so options without a default (required ones) must be given here.
    :raises tuneforge.PluginError: a hook name or argument the spec does not have, with the fix.
    :raises tuneforge.ConfigError: an option unknown, of the wrong type, out of range, or required and not given.
    """
    from tuneforge.engine.registry import check_class, plugin_hooks

    declared = getattr(plugin_cls, "name", None)
    name = name or (declared if isinstance(declared, str) else plugin_cls.__name__.lower())

    def how(missing: list[str]) -> str:
        given = ", ".join(f"{o!r}: ..." for o in missing)
        return f"pass check_plugin({plugin_cls.__name__}, options={{{given}}})"

    check_class(plugin_cls, name, _option_values(options, name), how)
    return plugin_hooks(plugin_cls)


def _option_values(options: dict | str | None, name: str) -> dict:
    """check_plugin's ``options=`` as a dict of values: a dict as given, a spec string parsed as -m parses it."""
    from tuneforge.common.options import parse_spec
    from tuneforge.errors import ConfigError

    if options is None or isinstance(options, dict):
        return dict(options or {})
    head, colon, _ = options.partition(":")
    if colon and "=" not in head:  # "NAME:key=value,..."
        given, values = parse_spec(options)
        if given != name:
            raise ConfigError(f"check_plugin: options {options!r} name '{given}', but the plugin is checked as "
                              f"'{name}'; drop the name ('key=value,...') or pass name='{given}'")
        return values
    return parse_spec(f"{name}:{options}")[1]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name: compare later with :func:`changed`."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """Names of parameters whose values differ from ``before`` (new parameters count as changed)."""
    now = dict(model.named_parameters())
    return {n for n, p in now.items() if n not in before or not torch.equal(p.detach(), before[n])}


# -- pytest fixtures (pytest_plugins = ["tuneforge.sdk.testing"]) ----------------------------------------------------

if pytest is not None:

    @pytest.fixture(name="tiny_model")
    def _tiny_model_fixture():
        """A fresh :data:`TINY` model (seed 0, eval mode)."""
        return tiny_model()


    @pytest.fixture(name="tiny_data")
    def _tiny_data_fixture(tmp_path):
        """A 64-record text JSON-lines file in the test's temporary folder."""
        return tiny_dataset(tmp_path, "text")


    @pytest.fixture(name="tiny_pretrained", scope="session")
    def _tiny_pretrained_fixture(tmp_path_factory):
        """A :data:`TINY` run pretrained for :data:`PRETRAINED_STEPS` steps (about 4 s), once per test session: pass
        it as ``init=``; a soft prompt, LoRA or IA³ lowers its held-out loss on new text within 30 steps."""
        return pretrained_tiny(tmp_path_factory.mktemp("tuneforge-pretrained") / "run")


    @pytest.fixture(name="train_tiny")
    def _train_tiny_fixture(tmp_path):
        """:func:`train_tiny` writing into the test's temporary folder (``out=None`` to write nothing)."""
        def run(*mechanisms, out: str | Path | None = tmp_path / "run", **config):
            return train_tiny(*mechanisms, out=out, **config)

        return run
