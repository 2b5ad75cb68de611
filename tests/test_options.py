import dataclasses
from typing import Literal, Optional

import pytest
from hypothesis import given, strategies as st

from tuneforge.errors import ConfigError
from tuneforge.common.options import build_options, describe_options, field_help, option_rows, parse_spec


@dataclasses.dataclass
class Opts:
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])
    merge: bool = False
    mode: Literal["serial", "parallel"] = "serial"
    layers: Optional[int] = None


def test_parse_spec_splits_name_and_values_with_list_continuation():
    name, values = parse_spec("lora:rank=4,targets=q,k,v,merge=yes")
    assert name == "lora"
    assert values == {"rank": "4", "targets": ["q", "k", "v"], "merge": "yes"}
    assert parse_spec("pretrain") == ("pretrain", {})


def test_build_options_converts_types():
    o = build_options(Opts, parse_spec("x:rank=4,alpha=2,targets=o,merge=true,mode=parallel,layers=none")[1], owner="x")
    assert (o.rank, o.alpha, o.targets, o.merge, o.mode, o.layers) == (4, 2.0, ["o"], True, "parallel", None)


def test_build_options_accepts_typed_toml_values():
    o = build_options(Opts, {"rank": 2, "alpha": 1, "targets": ["q"], "layers": 3}, owner="x")
    assert (o.rank, o.alpha, o.targets, o.layers) == (2, 1.0, ["q"], 3)


@pytest.mark.parametrize("values, words", [
    ({"rnak": "4"}, ["no option 'rnak'", "did you mean 'rank'", "rank (int, default 8)"]),
    ({"rank": "four"}, ["option 'rank'", "expected int", "'four'"]),
    ({"mode": "diagonal"}, ["serial", "parallel"]),
    ({"merge": "maybe"}, ["true/false"]),
    ({"rank": 2.5}, ["expected int"]),
])
def test_build_options_errors_name_the_option_and_the_fix(values, words):
    with pytest.raises(ConfigError) as err:
        build_options(Opts, values, owner="mechanism 'lora'")
    for w in words:
        assert w in str(err.value)
    assert "mechanism 'lora'" in str(err.value)


def test_no_options_class_rejects_values():
    assert build_options(None, {}, owner="m") is None
    with pytest.raises(ConfigError, match="takes no options"):
        build_options(None, {"a": "1"}, owner="m")


def test_parse_spec_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_spec("lora:rank")
    with pytest.raises(ConfigError):
        parse_spec(":rank=1")


@dataclasses.dataclass
class Documented:
    rank: int = 8  # the update's rank
    # where the update goes,
    # as module path patterns
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q"])
    alpha: float = dataclasses.field(default=1.0, metadata={"help": "the scale"})  # not this comment
    quiet: bool = False


@dataclasses.dataclass(kw_only=True)
class Required(Documented):
    span: int  # blocks it covers


def test_help_comes_from_metadata_else_the_declarations_comment_in_the_class_that_declares_it():
    assert field_help(Required) == {"rank": "the update's rank", "targets": "where the update goes, as module path "
                                    "patterns", "alpha": "the scale", "quiet": "", "span": "blocks it covers"}
    rows = {r["name"]: r for r in option_rows(Required)}
    assert rows["targets"] == {"name": "targets", "type": "list of str", "required": False, "default": ["q"],
                               "help": "where the update goes, as module path patterns"}
    assert rows["span"]["required"] and rows["span"]["default"] is None
    assert option_rows(None) == []


def test_a_required_option_left_out_is_named_with_its_type_help_and_how_to_give_it():
    with pytest.raises(ConfigError) as err:
        build_options(Required, {"rank": "2"}, owner="mechanism 'gain'", subject="gain",
                      how=lambda missing: f"pass -m gain:{missing[0]}=...")
    assert str(err.value) == "gain needs span (int): blocks it covers; pass -m gain:span=..."
    with pytest.raises(ConfigError, match=r"mechanism 'gain' needs span \(int\): blocks it covers; give it\. Its "):
        build_options(Required, {}, owner="mechanism 'gain'")
    assert build_options(Required, {"span": "3"}, owner="x").span == 3


def test_describe_options_lists_every_field():
    text = describe_options(Opts)
    for f in dataclasses.fields(Opts):
        assert f.name in text


_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)
_value = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-+", min_size=1, max_size=8)


@given(name=_word, values=st.dictionaries(_word, _value, max_size=5))
def test_parse_spec_round_trips_what_a_user_writes(name, values):
    text = name + (":" + ",".join(f"{k}={v}" for k, v in values.items()) if values else "")
    assert parse_spec(text) == (name, values)


@given(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_numbers_survive_the_string_round_trip(i, f):
    o = build_options(Opts, {"rank": str(i), "alpha": repr(f)}, owner="x")
    assert o.rank == i and o.alpha == float(repr(f))
