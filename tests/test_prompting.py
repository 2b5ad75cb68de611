"""prompting: nothing trains and the summary proves it; zero/few-shot with right and wrong labels; clear errors."""
import json

import pytest
import torch

import tuneforge
from tuneforge import ConfigError
from tuneforge.data.labelled import Template, verbalizer


def _prompting(pretrained, tmp_path, *specs, **kw):
    base = dict(init=str(pretrained), mechanisms=list(specs), data="builtin:sentiment", out=str(tmp_path / "p"))
    base.update(kw)
    return tuneforge.train(**base)


def test_zero_shot_changes_no_weight_and_says_so(pretrained, tmp_path):
    before = {k: v.clone() for k, v in tuneforge.load_model(pretrained).state_dict().items()}
    result = _prompting(pretrained, tmp_path, "prompting:limit=40,generate=2,max_new_tokens=5")
    s = result.summary
    assert s["trainable_params"] == 0 and s["steps"] == 0
    proof = s["frozen_weights"]
    assert proof["unchanged"] is True and proof["sha256_before"] == proof["sha256_after"]
    assert proof["values"] == s["total_params"]
    assert all(torch.equal(before[k], v) for k, v in result.model.state_dict().items())
    assert 0 <= result.metrics["eval/accuracy"] <= 1 and result.metrics["eval/records"] == 40
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["frozen_weights"]["unchanged"] is True
    lines = (tmp_path / "p" / "prompting" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"input", "continuation"} <= json.loads(lines[0]).keys()
    assert s["prompting"]["template"] == "review: {input} verdict: {label}."
    assert not list((tmp_path / "p").glob("step-*"))  # nothing trained, nothing to checkpoint


def test_few_shot_reports_right_and_wrong_labels(pretrained, tmp_path):
    result = _prompting(pretrained, tmp_path, "prompting:shots=2,limit=30")
    m = result.metrics
    assert {"eval/accuracy", "eval/accuracy_wrong_labels", "eval/accuracy_zero_shot"} <= m.keys()
    examples = result.summary["prompting"]["examples"]
    assert [e["label"] for e in examples] == ["negative", "positive"]  # labels taken in turn


def test_wrong_labels_change_what_the_model_sees():
    from tuneforge.plugins.prompting import Prompting

    class _Task:
        labels, words = ["negative", "positive"], {"negative": "bad", "positive": "good"}
        template = Template("review: {input} verdict: {label}.", owner="t")

    p = Prompting(Prompting.Options(shots=1))
    p.task, p.examples = _Task(), [("nice soup", "positive")]
    assert p.prompt_texts(["x"]) == ["review: nice soup verdict: good.\nreview: x verdict: "]
    assert p.prompt_texts(["x"], wrong=True) == ["review: nice soup verdict: bad.\nreview: x verdict: "]
    assert p.prompt_texts(["x"], shots=False) == ["review: x verdict: "]


def test_prompting_beside_a_mechanism_that_trains_is_refused_before_anything_is_written(pretrained, tmp_path):
    with pytest.raises(ConfigError, match=r"prompting changes no weight, but 'finetune' would train [\d,]+ parameters"):
        _prompting(pretrained, tmp_path, "prompting", "finetune:layers=1,head=classify")
    assert not (tmp_path / "p").exists()


def test_a_plugin_that_writes_into_frozen_weights_is_caught(pretrained, tmp_path):
    class Vandal:
        name = "vandal"

        @tuneforge.hookimpl
        def tuneforge_evaluate(self, model):
            model.blocks[0].mlp.up.weight.view(-1)[0] += 1e-3

    result = _prompting(pretrained, tmp_path, "prompting:limit=4", Vandal())
    assert result.summary["frozen_weights"]["unchanged"] is False


@pytest.mark.parametrize("spec, words", [
    ("prompting:template=review: the soup. verdict: {label}", ["no {input} slot"]),
    ("prompting:template={input} {mood}", ["{mood}", "only {input} and {label}"]),
    ("prompting:verbalizer=positive:good,neutral:meh", ["unknown label 'neutral'", "negative, positive"]),
    ("prompting:verbalizer=positive:bad", ["two labels to the word 'bad'"]),
    ("prompting:shots=12", ["shots=12", "do not fit", "context of 256"]),
])
def test_bad_prompting_options(pretrained, tmp_path, spec, words):
    with pytest.raises(ConfigError) as err:
        _prompting(pretrained, tmp_path, spec)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_template_and_verbalizer_parsing():
    t = Template("q: {input}\na: {label}!", owner="x")
    assert t.prompt("hi") == "q: hi\na: " and t.full("hi", "yes") == "q: hi\na: yes!"
    assert Template("{input}", owner="x").full("a", "b") == "a b"  # the label goes after a space at the end
    with pytest.raises(ConfigError, match="before {input}"):
        Template("{label} {input}", owner="x")
    assert verbalizer(["a=x", "b: y"], ["a", "b", "c"], "data.jsonl", owner="o") == {"a": "x", "b": "y", "c": "c"}
    assert verbalizer(None, ["negative", "positive"], "builtin:sentiment", owner="o") == \
        {"negative": "bad", "positive": "good"}
    with pytest.raises(ConfigError, match="LABEL:WORD"):
        verbalizer(["nonsense"], ["a"], "x", owner="o")
