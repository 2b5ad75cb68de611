"""finetune: what trains and what does not, the head through save/load, objectives, and bad options."""
import json

import pytest
import torch

import tuneforge
from tuneforge import ConfigError, DataError
from tuneforge.plugins.finetune import ClassifierHead, classify
from tuneforge.data.world import builtin


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ft(pretrained, tmp_path, spec, **kw):
    base = dict(init=str(pretrained), mechanisms=[spec], data="builtin:sentiment", steps=6, batch_size=16,
                lr=3e-3, warmup=1, eval_every=0, out=str(tmp_path / "ft"))
    base.update(kw)
    return tuneforge.train(**base)


def test_last_block_trains_everything_below_stays_put(pretrained, tmp_path):
    before = _state(tuneforge.load_model(pretrained))
    result = _ft(pretrained, tmp_path, "finetune:layers=1,head=classify")
    after = _state(result.model)
    frozen = [k for k in before if k.startswith(("tok_emb", "pos_emb", "blocks.0."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    moved = [k for k in before if k.startswith(("blocks.1.", "ln_f."))]
    assert moved and all(not torch.equal(before[k], after[k]) for k in moved)
    assert isinstance(result.model.lm_head, ClassifierHead) and result.model.lm_head.labels == ["negative", "positive"]
    assert result.summary["frozen_weights"]["unchanged"] is True
    expected = sum(p.numel() for m in (result.model.blocks[1], result.model.ln_f, result.model.lm_head)
                   for p in m.parameters())
    assert result.summary["trainable_params"] == expected == result.summary["trainable_by_plugin"]["finetune"]


def test_lm_head_is_untied_so_the_frozen_embedding_stays(pretrained, tmp_path):
    before = _state(tuneforge.load_model(pretrained))
    result = _ft(pretrained, tmp_path, "finetune:layers=1", data="builtin:text", seq_len=32)
    model = result.model
    assert model.lm_head.weight is not model.tok_emb.weight
    assert torch.equal(model.tok_emb.weight, before["tok_emb.weight"])
    assert not torch.equal(model.lm_head.weight, before["tok_emb.weight"])
    assert "eval/bits_per_token" in result.metrics  # text -> next-token objective
    reloaded = tuneforge.load_model(result.out)  # the untied head comes back untied, with its own weights
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.tok_emb.weight, model.tok_emb.weight)


def test_all_layers_train_every_weight(pretrained, tmp_path):
    result = _ft(pretrained, tmp_path, "finetune:layers=all,head=classify")
    assert result.summary["trainable_params"] == result.summary["total_params"]
    assert "frozen_weights" not in result.summary  # nothing was frozen, so there is nothing to prove


def test_head_survives_save_and_load_with_the_same_predictions(pretrained, tmp_path):
    result = _ft(pretrained, tmp_path, "finetune:layers=2,head=classify", steps=20)
    texts = [r["text"] for r in builtin("sentiment", "test")[:64]]
    trained = classify(result.model.eval(), texts)
    loaded = tuneforge.load_model(result.out)
    assert isinstance(loaded.lm_head, ClassifierHead) and loaded.lm_head.labels == ["negative", "positive"]
    assert classify(loaded, texts) == trained
    ids = torch.tensor([[256, 104, 105, 257]])
    torch.testing.assert_close(loaded.forward_hidden(ids), result.model.forward_hidden(ids), rtol=0, atol=0)
    state = json.loads((result.checkpoint / "state.json").read_text())
    # pretrain is in the lineage too (it implements tuneforge_modify_model: a Hugging Face model restarts from
    # random weights), then this run's finetune with the labels it resolved
    assert [list(e) for e in state["lineage"]] == [["pretrain"], ["finetune"]]
    assert state["lineage"][-1] == {"finetune": state["mechanisms"]["finetune"]}
    assert state["mechanisms"]["finetune"]["labels"] == ["negative", "positive"]


def test_init_from_a_finetune_keeps_its_head(pretrained, tmp_path):
    first = _ft(pretrained, tmp_path, "finetune:layers=1,head=classify", steps=10)
    texts = [r["text"] for r in builtin("sentiment", "test")[:32]]
    again = tuneforge.train(init=str(first.out), mechanisms=["finetune:layers=1,head=classify"],
                            data="builtin:sentiment", steps=1, lr=1e-9, warmup=0, batch_size=16, eval_every=0)
    assert classify(again.model.eval(), texts) == classify(first.model.eval(), texts)


def test_lm_head_on_labelled_records_learns_the_label_words(pretrained, tmp_path):
    result = _ft(pretrained, tmp_path, "finetune:layers=1", steps=4)
    assert 0.0 <= result.metrics["eval/accuracy"] <= 1.0
    assert "eval/bits_per_token" not in result.metrics


@pytest.mark.parametrize("spec, error, words", [
    ("finetune:layers=3", ConfigError, ["layers=3", "2 blocks", "layers=0..2"]),
    ("finetune:layers=two", ConfigError, ["layers", "'two'"]),
    ("finetune:head=classify,classes=3", ConfigError, ["classes=3", "2 labels", "negative, positive"]),
    ("finetune:classes=2", ConfigError, ["head=classify"]),
    ("finetune:head=classify,labels=pos,neg", DataError, ["label 'negative'", "pos, neg", "builtin:sentiment[train]#"]),
    ("finetune:head=regress", ConfigError, ["lm, classify"]),
])
def test_bad_options_are_clear_and_write_nothing(pretrained, tmp_path, spec, error, words):
    with pytest.raises(error) as err:
        _ft(pretrained, tmp_path, spec)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not (tmp_path / "ft").exists()


def test_jsonl_with_integer_labels_and_a_bad_eval_label(pretrained, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"item {i % 3} here", "label": i % 3}) + "\n" for i in range(60)))
    result = _ft(pretrained, tmp_path, "finetune:layers=1,head=classify,classes=3", data=str(train), steps=3)
    assert result.model.lm_head.labels == ["0", "1", "2"]
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": 0}) + "\n" + json.dumps({"text": "y", "label": 7}) + "\n")
    with pytest.raises(DataError, match=r"eval.jsonl:2: label '7' never occurs"):
        _ft(pretrained, tmp_path, "finetune:layers=1,head=classify", data=str(train), eval_data=str(bad),
            out=str(tmp_path / "ft2"))


def test_something_that_trains_needs_an_objective(pretrained):
    with pytest.raises(ConfigError, match=r"prompt-tuning \(.*\) would train.*no mechanism.*objective"):
        # a plugin object offering no objective, beside a parameterisation that trains
        tuneforge.train(init=str(pretrained), mechanisms=[_NoObjectivePrompts()], data="builtin:sentiment", steps=1)


class _NoObjectivePrompts:
    name = "prompt-tuning"

    @tuneforge.hookimpl
    def tuneforge_trainable_params(self, model):
        return [model.pos_emb.weight]
