"""Prefix tuning on tuneforge's embedded model and a Hugging Face Llama: the keys and values, what trains, per-row
routing, saving, loading and rebuilding, refusals."""
import json
from types import SimpleNamespace

import pytest
import torch

import tuneforge
from tuneforge.sdk import ConfigError, routing, tokenizer_of
from tuneforge.sdk.testing import changed, check_plugin, snapshot, tiny_model

from tuneforge_prefix import Prefixes, PrefixTuning

X = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(1))


def _add(model, seed=0, **options):
    """Put prefixes on ``model`` as a run's modify_model would; returns the plugin."""
    plugin = PrefixTuning(PrefixTuning.Options(**options))
    run = SimpleNamespace(seed=seed, tokenizer=tokenizer_of(model), checkpoint=None, log=lambda message: None)
    plugin.tuneforge_modify_model(model, run)
    return plugin


def _logits(model, x=X, **kw):
    with torch.no_grad():
        return model.eval()(x, **kw)


def test_hooks_match_the_contract():
    hooks = check_plugin(PrefixTuning, "prefix")
    assert {"tuneforge_modify_model", "tuneforge_trainable_params", "tuneforge_save", "tuneforge_data",
            "tuneforge_loss", "tuneforge_run_end"} <= set(hooks)


def test_a_prefix_from_words_acts_as_those_words_in_front(tiny_model):
    """init=text:WORDS starts from the keys and values the model computes for those words: in the slot, in front of
    an input at positions P.., the output is the model's on the words and the input as one sequence."""
    words = tokenizer_of(tiny_model).encode("the lake")
    P = len(words)
    _add(tiny_model, tokens=P, init="text:the lake")
    assert isinstance(tiny_model.kv_prefix, Prefixes) and tiny_model.kv_prefix.parts["default"].keys.shape == \
        (1, *tiny_model.kv_shape[:1], P, tiny_model.kv_shape[1])
    T = X.size(1)
    got = _logits(tiny_model, positions=torch.arange(P, P + T).expand(3, T))
    slot, tiny_model.kv_prefix = tiny_model.kv_prefix, None
    whole = _logits(tiny_model, torch.cat([torch.tensor([words]).expand(3, P), X], 1))[:, P:]
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)
    assert (got - _logits(tiny_model)).abs().max() > 1e-2  # and it is not the model without them
    tiny_model.kv_prefix = slot


def test_rows_routed_to_different_prefixes_equal_each_alone(tiny_model):
    _add(tiny_model, tasks=["a", "b"], tokens=3)
    tiny_model.kv_prefix.parts["b"].keys.data.mul_(3)  # two prefixes that differ
    tasks = ["a", "b", "", "a"]
    x = X[[0, 1, 2, 0]]
    with routing.rows(tasks):
        mixed = _logits(tiny_model, x)
    for i, task in enumerate(tasks):
        with routing.rows([task]):
            alone = _logits(tiny_model, x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-5)
    with routing.base():
        base = _logits(tiny_model, x)
    torch.testing.assert_close(mixed[2], base[2], rtol=0, atol=1e-5)  # a row of no task: the base model
    assert (mixed[0] - base[0]).abs().max() > 1e-2 and (mixed[1] - mixed[0]).abs().max() > 1e-2


def test_the_held_out_loss_falls_and_only_the_prefix_trains(well_pretrained, train_tiny, tmp_path):
    result = train_tiny("prefix:tokens=4", init=str(well_pretrained), steps=40, lr=0.05, batch_size=8,
                        out=tmp_path / "run")
    model, summary = result.model, result.summary
    start = tuneforge.load_model(well_pretrained)
    _add(start, seed=result.run.seed, tokens=4)  # the prefix the run started from (same seed, same tokens)
    task = result.run.plugins["prefix"].objective_task(result.run)  # the same held-out windows, before and after
    with torch.no_grad():
        before = task.evaluate(start, result.run)["loss"]
    assert result.metrics["eval/loss"] < before - 0.01, (before, result.metrics["eval/loss"])
    H, D = model.kv_shape
    assert summary["trainable_params"] == 2 * H * 4 * D == summary["prefix"]["parameters"]
    assert summary["frozen_weights"]["unchanged"]
    assert changed(model, snapshot(start)) == {"kv_prefix.parts.default.keys", "kv_prefix.parts.default.values"}
    # the saved part, and the run rebuilt from its folder
    manifest = json.loads((result.checkpoint / "prefixes" / "default" / "manifest.json").read_text())
    assert manifest["mechanism"] == "prefix" and manifest["points"] == {"layers.0": {"tokens": 4, "heads": H,
                                                                                       "width": D}}
    torch.testing.assert_close(_logits(tuneforge.load_model(tmp_path / "run")), _logits(model), rtol=0, atol=0)
    onto = tuneforge.load_model(well_pretrained)
    assert PrefixTuning.load_frozen(onto, str(tmp_path / "run")) == ["default"]
    torch.testing.assert_close(_logits(onto), _logits(model), rtol=0, atol=0)
    assert not any(p.requires_grad for p in onto.kv_prefix.parameters())


def test_on_a_hugging_face_llama_train_rebuild_and_generate(hf_llama, train_tiny, tmp_path):
    result = train_tiny("prefix:tokens=4,layers=-1", model=f"hf:{hf_llama}", steps=3, lr=0.05, out=tmp_path / "run")
    model = result.model.eval()
    H, D = model.kv_shape
    assert (H, D) == (2, 8)  # grouped-query: the prefix has the key/value heads, not the query heads
    assert result.summary["trainable_params"] == 2 * H * 4 * D  # the last of 2 layers only
    assert result.summary["frozen_weights"]["unchanged"]
    x = X % model.config.vocab_size
    torch.testing.assert_close(_logits(tuneforge.load_model(tmp_path / "run"), x), _logits(model, x), rtol=0, atol=0)
    cached = model.generate(x[:, :4], 8, temperature=0)
    assert torch.equal(cached, model.generate(x[:, :4], 8, temperature=0, use_cache=False))
    with routing.base():
        base = _logits(model, x)
    assert (base - _logits(model, x)).abs().max() > 0  # the prefix is on, and routing.base() takes it off


def test_refusals(tmp_path, train_tiny, well_pretrained):
    with pytest.raises(ConfigError, match="tokens must be at least 1"):
        train_tiny("prefix:tokens=0", init=str(well_pretrained), out=None)
    with pytest.raises(ConfigError, match="init must be vocab, random or text:WORDS"):
        train_tiny("prefix:init=letters", init=str(well_pretrained), out=None)
    train_tiny("prefix:tokens=2", init=str(well_pretrained), steps=1, out=tmp_path / "small")
    other = tiny_model(spec="tiny:n_layers=1,d_model=64,n_heads=2,max_seq_len=64")
    with pytest.raises(ConfigError, match="trained on another base"):
        PrefixTuning.load_frozen(other, str(tmp_path / "small"))
    taken = tiny_model()
    taken.kv_prefix = torch.nn.Identity()
    with pytest.raises(ConfigError, match="kv_prefix slot already holds Identity"):
        _add(taken)


def test_a_hugging_face_model_without_tuneforge_attention_is_refused_before_the_run(hf_llama, train_tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"kv_prefix.*\?attn=tuneforge"):
        train_tiny("prefix:tokens=2", model=f"hf:{hf_llama}?attn=eager", steps=1, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused in validate: nothing written
