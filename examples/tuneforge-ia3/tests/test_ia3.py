"""IA³ on tuneforge's embedded model: the math, what trains, combinations, saving and rebuilding."""
import json
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tuneforge
from tuneforge.sdk import ConfigError, routing
from tuneforge.sdk.testing import changed, check_plugin, snapshot, tiny_dataset
from tuneforge.sdk.testing import tiny_model as make_model

from tuneforge_ia3 import IA3, IA3Linear, add_ia3, ia3_layers, ia3_state, load_ia3, merge

TWO_BLOCKS = "tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=64"
VECTORS = {"blocks.0.attn.k.ia3.k", "blocks.0.attn.v.ia3.v", "blocks.0.mlp.down.ia3.mlp"}  # on TINY (one block)
X = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))


def logits(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in ia3_layers(model):
            for v in layer.ia3.values():
                v.copy_(0.5 + torch.rand(v.shape, generator=g))  # within [0.5, 1.5): far from 1 everywhere


# -- the layer ----------------------------------------------------------------------------------------------------

def test_hooks_match_the_contract():
    hooks = check_plugin(IA3, "ia3")
    assert {"tuneforge_modify_model", "tuneforge_trainable_params", "tuneforge_validate", "tuneforge_save",
            "tuneforge_data", "tuneforge_loss"} <= set(hooks)


def test_new_vectors_leave_the_output_exactly_unchanged_and_keep_every_name(tiny_model):
    before, names = logits(tiny_model), {n for n, _ in tiny_model.named_parameters()}
    found = add_ia3(tiny_model)
    assert torch.equal(logits(tiny_model), before)  # bit for bit: t * 1.0 == t
    now = {n for n, _ in tiny_model.named_parameters()}
    assert now - names == VECTORS and names <= now  # the base's weights keep their names (and tensors)
    assert [tuple(v.shape) for v in found] == [(32,), (32,), (128,)]
    assert all(isinstance(tiny_model.get_submodule(p), IA3Linear) for p in ("blocks.0.attn.k", "blocks.0.mlp.down"))


def test_keys_and_values_are_scaled_at_the_output_and_the_mlp_activation_at_the_down_input(tiny_model):
    block = tiny_model.blocks[0]
    base = {name: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for name, m in (("k", block.attn.k), ("v", block.attn.v), ("down", block.mlp.down))}
    add_ia3(tiny_model)
    _randomise(tiny_model)
    x = torch.randn(2, 5, 32)  # (B, T, C)
    h = torch.randn(2, 5, 128)  # (B, T, ff): what reaches the down projection
    with torch.no_grad():
        torch.testing.assert_close(block.attn.k(x), F.linear(x, *base["k"]) * block.attn.k.ia3["k"])
        torch.testing.assert_close(block.attn.v(x), F.linear(x, *base["v"]) * block.attn.v.ia3["v"])
        torch.testing.assert_close(block.mlp.down(h), F.linear(h * block.mlp.down.ia3["mlp"], *base["down"]))
    # scaled vectors change the model's output; inside routing.base() it is the base model again, exactly
    plain = make_model(0)  # the same seed as the fixture: the model before IA³
    assert not torch.allclose(logits(tiny_model), logits(plain), atol=1e-4)
    with routing.base():
        assert torch.equal(logits(tiny_model), logits(plain))


def test_targets_and_layers_choose_the_layers():
    model = make_model(spec=TWO_BLOCKS)
    add_ia3(model, targets=["v"], layers=["-1"])
    assert [(p, layer.side, dict(layer.spans)) for p, layer in ia3_layers(model)] == [
        ("blocks.1.attn.v", "out", {"v": (0, 32)})]
    model = make_model(spec=TWO_BLOCKS)
    add_ia3(model, targets=["mlp", "k"], layers=["0"])
    assert [p for p, _ in ia3_layers(model)] == ["blocks.0.attn.k", "blocks.0.mlp.down"]
    with pytest.raises(ConfigError, match="blocks 0..1"):
        add_ia3(make_model(spec=TWO_BLOCKS), layers=["2"])


def test_bad_options_are_refused_with_the_fix(train_tiny, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'k'"):
        train_tiny("ia3:targets=kk")
    with pytest.raises(ConfigError, match="give load=PATH too"):
        train_tiny("ia3:freeze=true")
    # a layer lora took first is not IA³'s to wrap: refused before anything is written
    with pytest.raises(ConfigError, match="blocks.0.attn.v is a LoRALinear"):
        train_tiny("lora:targets=v", "ia3", out=tmp_path / "clash")
    assert not (tmp_path / "clash").exists()


# -- training ------------------------------------------------------------------------------------------------------

def test_a_few_steps_train_the_vectors_and_nothing_else(train_tiny, tiny_pretrained):
    base = tuneforge.load_model(tiny_pretrained)
    result = train_tiny("ia3", init=tiny_pretrained, steps=6, lr=0.1, out=None)
    s = result.summary
    assert s["objective"] == "ia3"  # its default objective: nothing else in the run brings one
    assert s["trainable_params"] == 32 + 32 + 128 and s["trainable_by_plugin"] == {"ia3": 192}
    assert s["frozen_weights"]["unchanged"]
    assert changed(result.model, snapshot(base)) == VECTORS  # every other tensor is bit for bit the base's
    assert s["ia3"]["vectors"] == 3 and s["ia3"]["mean_abs_change"] > 0.05


def test_the_held_out_loss_falls_on_a_new_domain(train_tiny, tiny_pretrained, tmp_path):
    """The world's reviews alone, as plain text: narrower than the mix the model was pretrained on, so there is
    something to adapt to (on the pretraining text itself a well-pretrained model leaves IA³ nothing)."""
    labelled = tiny_dataset(tmp_path, "sentiment", n=600)
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n"
                               for line in labelled.read_text().splitlines()))
    base = tuneforge.load_model(tiny_pretrained)
    result = train_tiny("ia3", init=tiny_pretrained, data=str(reviews), steps=30, lr=0.3, batch_size=8, out=None)
    task = result.run.plugins["ia3"].objective_task(result.run)  # the same held-out windows, before and after
    with torch.no_grad():
        before = task.evaluate(base, result.run)["loss"]
    after = result.metrics["eval/loss"]
    assert after < before - 0.05, (before, after)  # measured: 2.18 -> 2.06


def test_with_prompt_tuning_both_train_and_both_come_back(train_tiny, tiny_pretrained, tmp_path):
    result = train_tiny("prompt-tuning:tokens=4", "ia3", init=tiny_pretrained, steps=6, lr=0.1,
                        out=tmp_path / "both")
    s = result.summary
    assert s["objective"] == "prompt-tuning"  # the first named default objective
    assert s["trainable_by_plugin"] == {"prompt-tuning": 4 * 32, "ia3": 192}
    assert s["frozen_weights"]["unchanged"] and s["ia3"]["mean_abs_change"] > 0.05
    # the prompt started as rows of the token embedding (init=vocab); trained, no row is one any more
    prompt = result.model.prefix.prompts["default"].detach()  # (4, C)
    emb = result.model.tok_emb.weight.detach()  # (V, C)
    assert (prompt[:, None, :] - emb[None]).abs().amax(-1).min() > 1e-3
    ck = result.checkpoint
    assert (ck / "ia3" / "ia3.safetensors").is_file() and (ck / "prompts" / "default.safetensors").is_file()
    assert torch.equal(logits(tuneforge.load_model(tmp_path / "both")), logits(result.model))


def test_named_first_its_objective_keeps_room_for_the_soft_prompt(train_tiny, tiny_pretrained):
    result = train_tiny("ia3", "prompt-tuning:tokens=5", init=tiny_pretrained, steps=2, out=None, seq_len=None)
    assert result.summary["objective"] == "ia3"
    plugin = result.run.plugins["ia3"]
    assert plugin.objective_reserve() == 5
    assert plugin.objective_task(result.run).train.seq_len == 64 - 5  # the whole context, less the prompt


@pytest.mark.parametrize("head", ["lm", "classify"])
def test_as_the_parameterisation_of_finetune(train_tiny, tiny_pretrained, head):
    result = train_tiny("ia3", f"finetune:head={head}", init=tiny_pretrained, data="builtin:sentiment", steps=3,
                        out=None)
    s = result.summary
    assert s["objective"] == "finetune" and s["trainable_by_plugin"]["ia3"] == 192
    # layers=auto: beside a parameterisation finetune trains only a new head (2 labels: 2 x 32 + 2)
    assert s["trainable_by_plugin"]["finetune"] == (0 if head == "lm" else 66)
    assert s["frozen_weights"]["unchanged"]


# -- saving, loading, rebuilding -------------------------------------------------------------------------------

@pytest.fixture
def trained(train_tiny, tiny_pretrained, tmp_path):
    return train_tiny("ia3", init=tiny_pretrained, steps=4, lr=0.1, out=tmp_path / "a")


def test_the_checkpoint_holds_the_vectors_and_load_model_rebuilds_the_same_function(trained, tiny_pretrained):
    folder = trained.checkpoint / "ia3"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "tuneforge-ia3" and manifest["parameters"] == 192
    assert manifest["points"]["blocks.0.attn.k"] == {"side": "out", "in": 32, "out": 32, "roles": {"k": [0, 32]}}
    assert manifest["points"]["blocks.0.mlp.down"]["side"] == "in"
    from safetensors.torch import load_file
    saved, held = load_file(str(folder / "ia3.safetensors")), ia3_state(trained.model)[0]
    assert saved.keys() == held.keys() == VECTORS
    assert all(torch.equal(saved[k], held[k].detach()) for k in saved)
    loaded = tuneforge.load_model(trained.out)  # base rebuilt, ia3 replayed from the lineage, weights loaded
    assert torch.equal(logits(loaded), logits(trained.model))
    assert not torch.allclose(logits(loaded), logits(tuneforge.load_model(tiny_pretrained)), atol=1e-4)


def test_load_brings_saved_vectors_and_freeze_keeps_them(train_tiny, trained, tiny_pretrained, tmp_path):
    before = {k: v.detach().clone() for k, v in ia3_state(trained.model)[0].items()}
    frozen = train_tiny(f"ia3:load={trained.out},freeze=true", "prompt-tuning:tokens=4", init=tiny_pretrained,
                        steps=3, lr=0.1, out=tmp_path / "b")
    assert frozen.summary["trainable_by_plugin"] == {"ia3": 0, "prompt-tuning": 128}
    now = ia3_state(frozen.model)[0]
    assert all(torch.equal(now[k], before[k]) for k in before)
    assert torch.equal(logits(tuneforge.load_model(tmp_path / "b")), logits(frozen.model))
    # without freeze the loaded vectors go on training from where they were
    going_on = train_tiny(f"ia3:load={trained.checkpoint / 'ia3'}", init=tiny_pretrained, steps=2, lr=0.1, out=None)
    moved = ia3_state(going_on.model)[0]
    assert going_on.summary["trainable_by_plugin"] == {"ia3": 192}
    assert all(0 < (moved[k] - before[k]).abs().max() < 0.5 for k in before)  # moved a little from the loaded ones
    # and onto a plain model from Python, frozen
    model = tuneforge.load_model(tiny_pretrained)
    found = load_ia3(model, str(trained.out))
    assert not any(v.requires_grad for v in found)
    assert torch.equal(logits(model), logits(trained.model))


def test_loading_onto_a_base_it_does_not_fit_is_refused(trained):
    other = make_model(spec="tiny:n_layers=1,d_model=64,n_heads=2,max_seq_len=64")
    with pytest.raises(ConfigError, match="trained on another base"):
        load_ia3(other, str(trained.out))
    assert not ia3_layers(other)  # checked before anything changed


def test_a_run_from_an_ia3_run_goes_on_with_the_vectors_it_names(train_tiny, trained, tmp_path):
    result = train_tiny("ia3:targets=k", init=trained.out, steps=2, lr=0.1, out=tmp_path / "c")
    assert result.summary["trainable_by_plugin"] == {"ia3": 32}  # the held v and mlp vectors stay frozen
    assert changed(result.model, snapshot(trained.model)) == {"blocks.0.attn.k.ia3.k"}
    assert torch.equal(logits(tuneforge.load_model(tmp_path / "c")), logits(result.model))


def test_resume_continues_exactly(train_tiny, tiny_pretrained, tmp_path):
    full = train_tiny("ia3", init=tiny_pretrained, steps=6, lr=0.1, save_every=3, out=tmp_path / "full")
    (tmp_path / "cut").mkdir()  # a run stopped right after its step-3 checkpoint
    shutil.copytree(tmp_path / "full" / "step-00000003", tmp_path / "cut" / "step-00000003")
    resumed = train_tiny("ia3", init=tiny_pretrained, steps=6, lr=0.1, save_every=3, resume="auto",
                         out=tmp_path / "cut")
    assert resumed.summary["steps"] == 6 and len(resumed.history) == 3
    a, b = ia3_state(full.model)[0], ia3_state(resumed.model)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_merge_folds_the_vectors_into_plain_linear_layers(trained):
    model = trained.model.eval()
    expected = logits(model)
    paths = merge(model)
    assert paths == ["blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.mlp.down"]
    assert all(type(model.get_submodule(p)) is nn.Linear for p in paths) and not ia3_layers(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
