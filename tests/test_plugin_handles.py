"""The plugin author's handles: plugin objects registered under their declared name and rebuilt by load_model,
a mechanism's options shown with their types, defaults and help, required options, check_plugin(options=)."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import tuneforge
from tuneforge.errors import CheckpointError, ConfigError
from tuneforge.sdk import hookimpl
from tuneforge.sdk.testing import check_plugin, train_tiny

MICRO = "tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32"
RUN = dict(model=MICRO, steps=3, batch_size=2, seq_len=16, lr=0.05)
X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


class Gain(torch.nn.Module):
    def __init__(self, channels, init):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x):
        return x * self.gain  # (B, T, C)


def _scale(block, args, output):
    return block.handles_gain(output)


class BlockGain:
    """A learned gain on the last block's output: a parameterisation defined here, never installed."""

    name = "block-gain"

    @dataclasses.dataclass
    class Options:
        init: float = 1.0  # the gain's starting value

    def __init__(self, options):
        self.options = options
        self.gains = []

    @hookimpl
    def tuneforge_modify_model(self, model):
        block = model.blocks[-1]
        if not hasattr(block, "handles_gain"):
            block.add_module("handles_gain", Gain(model.config.d_model, self.options.init))
            block.register_forward_hook(_scale)
        self.gains = [block.handles_gain]

    @hookimpl
    def tuneforge_trainable_params(self):
        return [g.gain for g in self.gains]


class Nameless(BlockGain):
    name = None  # declares none: falls back to the lower-cased class name


def logits(model):
    with torch.no_grad():
        return model.eval()(X)


def test_an_object_registers_under_its_name_and_load_model_rebuilds_it_from_its_class(tmp_path):
    result = train_tiny(BlockGain(BlockGain.Options(init=0.5)), out=tmp_path / "run", **RUN)
    assert list(result.run.plugins)[:2] == ["block-gain", "finetune"]
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["lineage"][0]["block-gain"] == {"init": 0.5}  # its options, as the object held them
    assert state["plugin_classes"] == {"block-gain": f"{__name__}:BlockGain"}
    assert state["train"]["mechanisms"][0] == "block-gain"
    # the class is not installed: the error names it and says what to pass
    with pytest.raises(CheckpointError, match=rf"{__name__}:BlockGain.*load_model\(path, plugins=\[BlockGain\]\)"):
        tuneforge.load_model(tmp_path / "run")
    trained = result.model.blocks[-1].handles_gain.gain.detach()
    assert not torch.allclose(trained, torch.full_like(trained, 0.5))
    for given in (BlockGain, BlockGain(BlockGain.Options())):  # a class, or an object (its class is used)
        loaded = tuneforge.load_model(tmp_path / "run", plugins=[given])
        assert torch.equal(loaded.blocks[-1].handles_gain.gain, trained)
        assert torch.equal(logits(loaded), logits(result.model))
    # --init from it: this run's own object rebuilds the saved one; without it, the same advice
    again = train_tiny(BlockGain(BlockGain.Options()), init=str(tmp_path / "run"), out=None, **RUN)
    assert again.summary["trainable_params"] == 32
    with pytest.raises(CheckpointError, match="plugins=\\[BlockGain\\]"):
        train_tiny("lora:rank=2", init=str(tmp_path / "run"), out=None, **RUN)


def test_an_object_of_an_installed_class_registers_under_its_entry_point(tmp_path):
    from tuneforge.plugins.prompt_tuning import PromptTuning  # installed as prompt-tuning; declares no name

    result = train_tiny(PromptTuning(PromptTuning.Options(tokens=2)), out=tmp_path / "run", **RUN)
    assert "prompt-tuning" in result.run.plugins
    assert torch.equal(logits(tuneforge.load_model(tmp_path / "run")), logits(result.model))  # nothing to pass


def test_a_nameless_object_warns_and_still_reloads_given_its_class(tmp_path):
    with pytest.warns(UserWarning, match=r"declares no name; registered as 'nameless'.*set name = "):
        result = train_tiny(Nameless(Nameless.Options()), out=tmp_path / "run", **RUN)
    assert "nameless" in result.run.plugins
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # load_model(plugins=) asks for no name: no warning there
        loaded = tuneforge.load_model(tmp_path / "run", plugins=[Nameless])
    assert torch.equal(logits(loaded), logits(result.model))


def test_an_object_that_does_not_keep_its_options_or_has_a_bad_name_is_refused(tmp_path):
    class Forgetful(BlockGain):
        def __init__(self, options):
            self.gains = []

    with pytest.raises(ConfigError, match=r"'block-gain'.*keeps none as \.options.*self\.options = options"):
        train_tiny(Forgetful(BlockGain.Options()), out=tmp_path / "run", **RUN)
    assert not (tmp_path / "run").exists()

    class Spaced(BlockGain):
        name = "block gain"

    with pytest.raises(ConfigError, match="declares name 'block gain'"):
        train_tiny(Spaced(BlockGain.Options()), out=None, **RUN)


# -- options: shown, required, checked ------------------------------------------------------------------------------

SPAN_GAIN = '''
import dataclasses

from tuneforge.sdk import hookimpl


class SpanGain:
    """A gain over the last SPAN blocks (only its options matter here)."""

    name = "span-gain"

    @dataclasses.dataclass
    class Options:
        span: int  # how many blocks, counted from the last, the gain covers
        scale: float = 1.0  # the starting gain
        mode: str = dataclasses.field(default="mul", metadata={"help": "mul or add"})  # metadata wins over this

    def __init__(self, options):
        self.options = options

    @hookimpl
    def tuneforge_trainable_params(self, model):
        return []
'''


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """span-gain as an installed distribution (a module and its dist-info with the entry point), seen by this
    process and by the subprocesses of tf()."""
    site = tmp_path / "site"
    (site / "tuneforge_span_gain-0.2.0.dist-info").mkdir(parents=True)
    (site / "tuneforge_span_gain.py").write_text(textwrap.dedent(SPAN_GAIN))
    (site / "tuneforge_span_gain-0.2.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tuneforge-span-gain\nVersion: 0.2.0\n")
    (site / "tuneforge_span_gain-0.2.0.dist-info" / "entry_points.txt").write_text(
        "[tuneforge]\nspan-gain = tuneforge_span_gain:SpanGain\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("TUNEFORGE_LOAD_PLUGINS", "span-gain")
    return site


def tf(site, *args):
    env = {**os.environ, "TUNEFORGE_LOAD_PLUGINS": "span-gain",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, env=env,
                          timeout=300)


NEEDS = "span-gain needs span (int): how many blocks, counted from the last, the gain covers; pass -m span-gain:span=..."


def test_a_required_option_left_out_is_named_before_anything_runs(installed, tmp_path):
    proc = tf(installed, "train", "-m", "span-gain", "-m", "finetune", "--model", MICRO, "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and NEEDS in proc.stderr, proc.stderr
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError) as err:
        tuneforge.train(mechanisms=["span-gain", "finetune"], out=str(tmp_path / "b"), **RUN)
    assert NEEDS in str(err.value) and "[mechanisms.span-gain]" in str(err.value)
    assert not (tmp_path / "b").exists()
    # with the option given it registers (and trains nothing of its own)
    result = tuneforge.train(mechanisms=["span-gain:span=1", "finetune:layers=0"], out=None, **RUN)
    assert result.run.plugins["span-gain"].options.span == 1


def test_plugins_name_and_help_spec_print_the_options(installed, capsys):
    from tuneforge.tools.cli import main

    shown = tf(installed, "plugins", "span-gain")  # as a user runs it; the rest in this process, to save seconds
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[0]: line.split() for line in shown.stdout.splitlines()[3:]}
    assert lines["span"][:3] == ["span", "int", "(required)"] and "counted from the last" in shown.stdout
    assert lines["scale"][:4] == ["scale", "float", "1.0", "the"]
    assert lines["mode"][:4] == ["mode", "str", "mul", "mul"]  # the metadata's help, not the comment
    assert "span-gain (tuneforge-span-gain 0.2.0, mechanism)" in shown.stdout
    capsys.readouterr()
    assert main(["train", "-m", "span-gain:help"]) == 0
    assert capsys.readouterr().out == shown.stdout
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["span-gain"]["options"] == [
        {"name": "span", "type": "int", "required": True, "default": None,
         "help": "how many blocks, counted from the last, the gain covers"},
        {"name": "scale", "type": "float", "required": False, "default": 1.0, "help": "the starting gain"},
        {"name": "mode", "type": "str", "required": False, "default": "mul", "help": "mul or add"}]
    assert {"name": "rank", "type": "int", "required": False, "default": 8, "help": "r: the update's rank"} in \
        listed["lora"]["options"]
    assert main(["plugins", "span-gian"]) == 2 and "did you mean 'span-gain'" in capsys.readouterr().err


def test_check_plugin_takes_the_options_a_required_one_needs(installed):
    from tuneforge_span_gain import SpanGain

    with pytest.raises(ConfigError, match=r"span-gain needs span \(int\).*check_plugin\(SpanGain, options=\{'span'"):
        check_plugin(SpanGain)
    for options in ({"span": 2}, "span=2", "span-gain:span=2,scale=0.5"):
        assert check_plugin(SpanGain, options=options) == ["tuneforge_trainable_params"]
    with pytest.raises(ConfigError, match="expected int"):
        check_plugin(SpanGain, options="span=two")
    with pytest.raises(ConfigError, match="name 'other'"):
        check_plugin(SpanGain, options="other:span=2")


# -- the pretrained fixture ----------------------------------------------------------------------------------------

def test_the_pretrained_fixture_is_strong_enough_for_a_soft_prompt_and_lora_to_learn(tmp_path):
    """What tiny_pretrained promises: on text of a narrower domain (the world's reviews), a soft prompt and LoRA
    lower their held-out loss within 30 steps. (After 30 or 150 pretraining steps neither does.)"""
    from tuneforge.sdk.testing import pretrained_tiny, tiny_dataset

    pre = pretrained_tiny(tmp_path / "pre")
    labelled = tiny_dataset(tmp_path, "sentiment", n=600)
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n"
                               for line in labelled.read_text().splitlines()))
    for mechanism, lr, gain in (("prompt-tuning:tokens=4", 0.03, 0.01), ("lora:rank=4", 3e-2, 0.04)):
        runs = [train_tiny(mechanism, init=str(pre), data=str(reviews), steps=steps, lr=rate, batch_size=8, out=None)
                for steps, rate in ((1, 1e-12), (30, lr))]  # as inserted (a step too small to move it), trained
        before, after = (r.metrics["eval/loss"] for r in runs)
        assert after < before - gain, (mechanism, before, after)  # measured: -0.023, -0.068
