import pytest

import tuneforge
from tuneforge import hookimpl
from tuneforge.errors import ConfigError, PluginError
from tuneforge.engine.registry import build_manager, discover, hook_names


class OtherObjective:
    name = "other"

    @hookimpl
    def tuneforge_data(self, run):
        return []

    @hookimpl
    def tuneforge_loss(self, model, batch):
        return None


class Typo:
    name = "typo"

    @hookimpl
    def tuneforge_los(self, model, batch):
        return None


class BadArg:
    name = "badarg"

    @hookimpl
    def tuneforge_loss(self, model, batch, optimizer):
        return None


class Recorder:
    """A parameterisation that records the order of the calls it sees."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    @hookimpl
    def tuneforge_modify_model(self, model):
        self.log.append(self.name)


def test_builtins_are_discovered_through_entry_points():
    found = discover()
    assert {"pretrain", "progress", "metrics"} <= set(found)
    assert found["pretrain"].builtin and found["pretrain"].package == "tuneforge"
    assert "tuneforge_loss" in found["pretrain"].as_dict()["hooks"]
    assert found["progress"].autoload and not found["pretrain"].autoload


def test_hookspecs_are_in_lifecycle_order_with_documented_semantics():
    names = list(hook_names())
    assert names.index("tuneforge_modify_model") < names.index("tuneforge_trainable_params") < \
        names.index("tuneforge_data") < names.index("tuneforge_loss") < names.index("tuneforge_run_end")
    from tuneforge import hookspecs
    for n in names:
        doc = getattr(hookspecs, n).__doc__
        assert ":param" in doc and ":return:" in doc, n


def test_a_run_registers_only_what_it_uses_plus_autoload():
    reg = build_manager(["pretrain"])
    assert list(reg.plugins) == ["pretrain", "metrics", "progress"]
    assert build_manager(["pretrain"], autoload=False).plugins.keys() == {"pretrain"}


def test_two_objectives_are_an_error_naming_both_and_the_hook():
    with pytest.raises(PluginError) as err:
        build_manager(["pretrain", OtherObjective()])
    msg = str(err.value)
    assert "'pretrain'" in msg and "'other'" in msg and "tuneforge_data" in msg and "one objective" in msg


def test_no_objective_is_fine_at_registration():
    # A run that trains nothing (prompting) needs none; train() refuses it once something would train.
    assert build_manager([Recorder("r", [])]).objective is None
    assert build_manager(["pretrain"]).objective == "pretrain"


def test_unknown_hook_names_plugin_file_line_and_suggests():
    with pytest.raises(PluginError) as err:
        build_manager(["pretrain", Typo()])
    msg = str(err.value)
    assert "'typo'" in msg and "tuneforge_los" in msg and "did you mean 'tuneforge_loss'" in msg
    assert "test_registry.py:" in msg


def test_hookimpl_argument_not_in_spec():
    with pytest.raises(PluginError) as err:
        build_manager([BadArg()])
    msg = str(err.value)
    assert "'optimizer'" in msg and "tuneforge_loss" in msg and "(model, batch, run)" in msg


def test_unknown_mechanism_and_unknown_option():
    with pytest.raises(ConfigError, match=r"unknown mechanism 'pretrian'.*did you mean 'pretrain'"):
        build_manager(["pretrian"])
    with pytest.raises(ConfigError, match=r"mechanism 'pretrain' has no option 'feild'.*did you mean 'field'"):
        build_manager(["pretrain:feild=body"])
    with pytest.raises(ConfigError, match="holdout"):
        build_manager(["pretrain:holdout=0.9"])


def test_same_mechanism_twice_is_an_error():
    with pytest.raises(ConfigError, match="more than once"):
        build_manager(["pretrain", "pretrain"])


def test_modify_model_runs_in_registration_order(micro):
    log = []
    tuneforge.train(model=micro, mechanisms=[Recorder("first", log), "pretrain", Recorder("second", log)], steps=1,
                    batch_size=2)
    assert log == ["first", "second"]
