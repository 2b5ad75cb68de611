"""lora: identity at init, merge/unmerge, many LoRAs per model and mixed batches (forward and gradients), files,
the PEFT layout, and runs in which only the LoRA moves."""
import json

import pytest
import torch
from safetensors.torch import load_file

import tuneforge
from tuneforge import ConfigError
from tuneforge.parts import modules as adapters
from tuneforge.models import routing
from tuneforge.plugins.lora import LoRALinear, lora_layers, merge, unmerge
from tuneforge.models.transformer import Transformer, model_config
from tuneforge.plugins.lora import PEFT_CONFIG, PEFT_WEIGHTS, export_peft
from tuneforge.plugins.lora import add_lora, load_lora

from conftest import check_mixed_equals_alone, task_model


def _randomize(model, scale=0.5):
    """Non-zero B everywhere, so the updates really change the output (a new LoRA's B is zero)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, m in lora_layers(model):
            for b in m.lora_b.values():
                b.copy_(torch.randn(b.shape, generator=g) * scale)


def test_a_new_lora_leaves_the_output_unchanged_and_keeps_parameter_names():
    model = task_model()
    x = torch.randint(0, 256, (3, 12))
    before = model(x)
    names_before = set(model.state_dict())
    paths = add_lora(model, "a", targets=["attn", "mlp.up"], rank=4)
    assert len(paths) == 2 * 5  # q, k, v, o, up in each of 2 blocks
    assert all(isinstance(model.get_submodule(p), LoRALinear) for p in paths)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    after = set(model.state_dict())
    assert names_before <= after  # base names unchanged: base checkpoints still load
    assert after - names_before == {f"{p}.lora_{ab}.a" for p in paths for ab in "ab"}


def test_targets_and_layers_select_modules():
    model = task_model()
    assert add_lora(model, "a", targets=["v"], layers=["-1"]) == ["blocks.1.attn.v"]
    assert add_lora(model, "b", targets=["attn.*"], layers=["0"]) == [f"blocks.0.attn.{n}" for n in "qkvo"]
    with pytest.raises(ConfigError, match="match no linear layer.*block 0 has blocks.0.attn.q"):
        add_lora(model, "c", targets=["query"])
    with pytest.raises(ConfigError, match="this model has blocks 0..1"):
        add_lora(model, "c", layers=["5"])


def test_merge_and_unmerge_round_trip():
    model = task_model()
    add_lora(model, "a", targets=["all"], rank=4)
    _randomize(model)
    x = torch.randint(0, 256, (2, 10))
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    with torch.no_grad():
        unmerged = model(x)
        merge(model)
        assert model.get_submodule("blocks.0.attn.q").merged == ["a"]
        merged = model(x)
        # a merged LoRA cannot be switched off or routed: a clear error, not the wrong model
        with pytest.raises(ValueError, match="merged into the weights"):
            adapters.set_active(model, [])
        with pytest.raises(ValueError, match="merged into the weights"), routing.base():
            model(x)
        unmerge(model)
        again = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in base_weights:
            torch.testing.assert_close(p, base_weights[n], rtol=0, atol=1e-6)


def test_merged_model_runs_the_merged_weight_alone():
    model = task_model()
    add_lora(model, "a", rank=2)
    _randomize(model)
    x = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        expected = model(x)
        merge(model, ["a"])
        # with the LoRA tensors zeroed, the merged weight alone must still give the adapted output
        for _, m in lora_layers(model):
            m.lora_b["a"].zero_()
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def _two_loras(rank_b=4):
    model = task_model().train()
    add_lora(model, "a", targets=["q", "v", "mlp.up"], rank=4)
    add_lora(model, "b", targets=["q", "v", "mlp.up"], rank=rank_b, alpha=8)
    _randomize(model)
    return model


@pytest.mark.parametrize("rank_b", [4, 2])
def test_mixed_batch_equals_each_lora_alone_forward_and_gradients(rank_b):
    model = _two_loras(rank_b)
    x = torch.randint(0, 256, (6, 9))
    tasks = ["a", "b", "", "b", "a", "a"]  # "" = the base model for that row
    params = lambda: [(n, p) for n, p in model.named_parameters() if p.grad is not None]  # noqa: E731
    grads = check_mixed_equals_alone(model, tasks, x, params)
    assert any("lora_b.b" in n for n in grads) and any("lora_a.a" in n for n in grads)


def test_base_rows_equal_the_model_without_lora():
    model = _two_loras()
    plain = task_model()
    x = torch.randint(0, 256, (2, 7))
    with torch.no_grad(), routing.base():
        torch.testing.assert_close(model.eval()(x), plain(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad(), adapters.using(model, []):
        torch.testing.assert_close(model(x), plain(x), rtol=1e-6, atol=1e-6)


def test_several_active_loras_add_up():
    model = _two_loras().eval()
    x = torch.randint(0, 256, (1, 5))
    q = model.get_submodule("blocks.0.attn.q")
    h = torch.randn(3, 32)
    with torch.no_grad(), adapters.using(model, ["a", "b"]):
        both = q(h)
    expected = torch.nn.functional.linear(h, q.weight) + sum(
        q.scaling[n] * h @ q.lora_a[n].T @ q.lora_b[n].T for n in ("a", "b"))
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="holds LoRA adapters a, b: say which run"):
        model(x)
    with pytest.raises(ValueError, match="no part named 'c'"):
        adapters.set_active(model, ["c"])


def test_a_task_no_module_holds_is_a_typo():
    model = _two_loras().eval()
    with pytest.raises(ValueError, match="row 1 names task 'c', which no soft prompt, adapter or LoRA"):
        with torch.no_grad(), routing.rows(["a", "c"]):
            model(torch.randint(0, 256, (2, 5)))


def _peft_folder(tmp_path):
    model = _two_loras()
    out = export_peft(model, tmp_path / "peft-a", name="a")
    return model, out


def test_peft_export_writes_peft_names_and_shapes(tmp_path):
    model, out = _peft_folder(tmp_path)
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["attn.q", "attn.v", "mlp.up"]  # paths in a block: adapted in every block
    weights = load_file(str(out / PEFT_WEIGHTS))
    assert set(weights) == {f"base_model.model.blocks.{i}.{m}.lora_{ab}.weight"
                            for i in range(2) for m in ("attn.q", "attn.v", "mlp.up") for ab in "AB"}
    assert weights["base_model.model.blocks.0.mlp.up.lora_A.weight"].shape == (4, 32)  # (r, in)
    assert weights["base_model.model.blocks.0.mlp.up.lora_B.weight"].shape == (128, 4)  # (out, r)
    torch.testing.assert_close(weights["base_model.model.blocks.1.attn.v.lora_B.weight"],
                               model.get_submodule("blocks.1.attn.v").lora_b["a"].detach())


def test_peft_import_round_trip_gives_the_same_outputs(tmp_path):
    model, out = _peft_folder(tmp_path)
    fresh = task_model()
    assert load_lora(fresh, str(out)) == ["peft-a"]
    x = torch.randint(0, 256, (2, 8))
    with torch.no_grad(), routing.rows(["a", "a"]):
        expected = model.eval()(x)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


def test_peft_import_of_partial_layers_and_patterns(tmp_path):
    model = task_model()
    add_lora(model, "a", targets=["q"], layers=["1"], rank=2, alpha=6)
    _randomize(model)
    out = export_peft(model, tmp_path / "p")
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["target_modules"] == ["blocks.1.attn.q"]  # not every block: full paths
    # a hand-edited alpha_pattern is honoured on import
    config["alpha_pattern"] = {"attn.q": 2}
    (out / PEFT_CONFIG).write_text(json.dumps(config))
    fresh = task_model()
    load_lora(fresh, str(out))
    assert fresh.get_submodule("blocks.1.attn.q").scaling["p"] == pytest.approx(1.0)


def test_peft_import_refuses_what_it_cannot_represent(tmp_path):
    _, out = _peft_folder(tmp_path)
    config = json.loads((out / PEFT_CONFIG).read_text())
    (out / PEFT_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match="DoRA"):
        load_lora(task_model(), str(out))
    (out / PEFT_CONFIG).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="only LoRA"):
        load_lora(task_model(), str(out))


def test_loading_onto_a_base_it_does_not_fit_is_refused_and_changes_nothing(tmp_path):
    model, out = _peft_folder(tmp_path)
    torch.manual_seed(0)
    small = Transformer(model_config("tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=256"))
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(ConfigError, match="blocks.1.attn.q, which this model does not have"):
        load_lora(small, str(out))
    assert not lora_layers(small) and set(small.state_dict()) == set(before)
    wide = Transformer(model_config("tiny:n_layers=2,d_model=64,n_heads=2,max_seq_len=256"))
    with pytest.raises(ConfigError, match="is 64 -> 64 here, but 32 -> 32"):
        load_lora(wide, str(out))


# -- runs ------------------------------------------------------------------------------------------------------

def _train(tmp_path, pretrained, name, mechanisms, **kw):
    args = dict(init=str(pretrained), mechanisms=mechanisms, data="builtin:sentiment", steps=6, batch_size=8,
                lr=1e-2, warmup=1, eval_every=0, out=str(tmp_path / name))
    args.update(kw)
    return tuneforge.train(**args)


def test_only_lora_parameters_change_and_the_folder_reloads(tmp_path, pretrained):
    base = tuneforge.load_model(pretrained)
    result = _train(tmp_path, pretrained, "lora", ["lora:rank=4,targets=q,v"])
    assert result.summary["frozen_weights"]["unchanged"]
    assert result.summary["trainable_by_plugin"] == {"lora": 2 * 2 * 4 * (32 + 32)}
    trained = result.model.state_dict()
    for k, v in base.state_dict().items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=0, msg=k)
    changed = [k for k in trained if "lora_b" in k and trained[k].abs().sum() > 0]
    assert len(changed) == 4
    folder = tmp_path / "lora" / "step-00000006" / "lora" / "default"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["mechanism"] == "lora" and manifest["options"]["rank"] == 4
    assert set(manifest["points"]) == {f"blocks.{i}.attn.{m}" for i in range(2) for m in "qv"}
    # the small folder onto a fresh base gives what the trained model gives; so does the whole checkpoint
    fresh = tuneforge.load_model(pretrained)
    load_lora(fresh, str(folder))
    reloaded = tuneforge.load_model(tmp_path / "lora")
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = result.model.eval()(x)
        torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-6, atol=1e-6)


def test_lora_with_prompt_tuning_trains_and_saves_both(tmp_path, pretrained):
    result = _train(tmp_path, pretrained, "both", ["lora:rank=2", "prompt-tuning:tokens=4"])
    assert set(result.summary["trainable_by_plugin"]) == {"lora", "prompt-tuning"}
    assert result.summary["objective"] == "lora"  # the first named default objective
    ck = tmp_path / "both" / "step-00000006"
    assert (ck / "lora" / "default" / "adapter.safetensors").is_file()
    assert (ck / "prompts" / "default.safetensors").is_file()
    names = adapters.names(tuneforge.load_model(ck))
    assert names == {"soft prompts": ["default"], "LoRA adapters": ["default"]}


def test_two_loras_trained_on_mixed_data_then_served_in_one_batch(tmp_path, pretrained):
    rows = [{"text": f"good thing {i}", "label": "pos", "task": "s"} for i in range(8)]
    rows += [{"text": f"weather report {i}", "label": "rain", "task": "t"} for i in range(8)]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _train(tmp_path, pretrained, "mixed", ["lora:tasks=s,t,rank=2,holdout=0.25"], data=str(data))
    assert result.summary["trainable_by_plugin"]["lora"] == 2 * 2 * 2 * 2 * 64
    model = tuneforge.load_model(tmp_path / "mixed")
    assert adapters.names(model) == {"LoRA adapters": ["s", "t"]}
    x = torch.randint(0, 256, (3, 6))
    with torch.no_grad(), routing.rows(["s", "t", "s"]):
        mixed = model(x)
    with torch.no_grad(), routing.rows(["t"]):
        torch.testing.assert_close(mixed[1:2], model(x[1:2]), rtol=1e-5, atol=1e-5)


def test_bad_lora_options_fail_before_anything_is_written(tmp_path, pretrained):
    with pytest.raises(ConfigError, match="rank must be at least 1"):
        _train(tmp_path, pretrained, "bad", ["lora:rank=0"])
    with pytest.raises(ConfigError, match="targets=nope match no linear layer"):
        _train(tmp_path, pretrained, "bad", ["lora:targets=nope"])
    assert not (tmp_path / "bad").exists()


def test_two_saved_loras_of_one_name_load_under_new_names(tmp_path, pretrained):
    for task in ("sentiment", "topic"):
        _train(tmp_path, pretrained, task, ["lora:rank=2"], data=f"builtin:{task}", steps=2)
    model = tuneforge.load_model(pretrained)
    with pytest.raises(ConfigError, match="two parts named 'default'"):
        load_lora(model, str(tmp_path / "sentiment"), str(tmp_path / "topic"))
    model = tuneforge.load_model(pretrained)
    assert load_lora(model, f"{tmp_path / 'sentiment'}@s", f"{tmp_path / 'topic'}@t") == ["s", "t"]
    assert adapters.names(model) == {"LoRA adapters": ["s", "t"]}
    with pytest.raises(ConfigError, match="neither a saved lora folder nor a checkpoint"):
        load_lora(model, str(tmp_path / "nothing-here"))
