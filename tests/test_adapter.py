"""adapter: identity at init, serial vs parallel placement, mixed batches (also with soft prompts and LoRA),
files, and runs in which only the adapters move."""
import copy
import json

import pytest
import torch

import tuneforge
from tuneforge import ConfigError
from tuneforge.parts import modules as adapters
from tuneforge.models import routing
from tuneforge.plugins.adapter import AdapterPoint, adapter_points
from tuneforge.models.transformer import Transformer, model_config
from tuneforge.plugins.adapter import add_adapter, load_adapters
from tuneforge.plugins.lora import add_lora
from tuneforge.plugins.prompt_tuning import SoftPrompts

from conftest import check_mixed_equals_alone, task_model
from test_engine import SignalAt


def _randomize(model, scale=0.3):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, point in adapter_points(model):
            for a in point.values():
                a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * scale)
                a.up.bias.copy_(torch.randn(a.up.bias.shape, generator=g) * scale)


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_a_new_adapter_is_the_identity(placement):
    model = task_model()
    x = torch.randint(0, 256, (3, 12))
    before = model(x)
    paths = add_adapter(model, "a", placement=placement, reduction=8)
    assert paths == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert model.get_submodule("blocks.0.attn.adapters")["a"].size == 4  # 32 / 8
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_serial_reads_the_sublayer_output_and_parallel_its_input():
    model = task_model()
    add_adapter(model, "s", placement="serial", positions=["mlp"], layers=["0"])
    add_adapter(model, "p", placement="parallel", positions=["mlp"], layers=["0"], scale=2.0)
    _randomize(model)
    mlp, point = model.blocks[0].mlp, model.blocks[0].mlp.adapters
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        point.active = ()
        plain = mlp(h)
        point.active = ("s",)
        serial = mlp(h)
        point.active = ("p",)
        parallel = mlp(h)
    f = lambda a, z: a.up(torch.nn.functional.gelu(a.down(z)))  # noqa: E731
    torch.testing.assert_close(serial, plain + f(point["s"], plain), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parallel, plain + 2.0 * f(point["p"], h), rtol=1e-5, atol=1e-5)


def test_only_the_chosen_positions_and_layers_get_adapters():
    model = task_model()
    assert add_adapter(model, "a", positions=["mlp"], layers=["-1"]) == ["blocks.1.mlp"]
    with pytest.raises(ConfigError, match="no sub-layer of that name; it has attn, mlp"):
        add_adapter(model, "b", positions=["ffn"])


def _mixed_model(placements=("serial", "parallel"), widths=(4, 8)):
    model = task_model().train()
    for name, placement, size in zip("ab", placements, widths):
        add_adapter(model, name, placement=placement, size=size)
    _randomize(model)
    return model


@pytest.mark.parametrize("placements", [("serial", "serial"), ("serial", "parallel")])
def test_mixed_batch_equals_each_adapter_alone_forward_and_gradients(placements):
    model = _mixed_model(placements)
    params = lambda: [(n, p) for n, p in model.named_parameters() if ".adapters." in n]  # noqa: E731
    grads = check_mixed_equals_alone(model, ["a", "b", "", "b", "a"], torch.randint(0, 256, (5, 8)), params)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("up.weight"))


def test_mixed_rows_route_soft_prompts_adapters_and_lora_together():
    model = _mixed_model()
    add_lora(model, "a", rank=2)  # task a: adapter + LoRA + prompt; task b: adapter + prompt; c: prompt only
    with torch.no_grad():
        for _, m in adapters.task_modules(model):
            for b in getattr(m, "lora_b", {}).values():
                b.normal_(0, 0.3)
    sp = SoftPrompts(32)
    for name, k in (("a", 3), ("b", 5), ("c", 2)):
        sp.add(name, torch.randn(k, 32))
    model.prefix = sp
    params = lambda: [(n, p) for n, p in model.named_parameters() if "lora" in n or ".adapters." in n  # noqa: E731
                      or n.startswith("prefix.")]
    check_mixed_equals_alone(model, ["a", "c", "b", "a", "", "c"], torch.randint(0, 256, (6, 7)), params)


def test_several_active_serial_adapters_stack():
    model = _mixed_model(("serial", "serial"))
    point = model.blocks[0].mlp.adapters
    h = torch.randn(1, 3, 32)
    with torch.no_grad(), adapters.using(model, ["a", "b"]):
        both = model.blocks[0].mlp(h)
    with torch.no_grad(), adapters.using(model, []):
        out = model.blocks[0].mlp(h)
    f = lambda a, z: a.up(torch.nn.functional.gelu(a.down(z)))  # noqa: E731
    out = out + f(point["a"], out)
    torch.testing.assert_close(both, out + f(point["b"], out), rtol=1e-5, atol=1e-5)


def test_a_copied_model_keeps_working_adapters():
    model = _mixed_model()
    twin = copy.deepcopy(model)
    x = torch.randint(0, 256, (2, 5))
    with torch.no_grad(), routing.rows(["a", "b"]):
        torch.testing.assert_close(twin(x), model(x))
        with torch.no_grad():
            for _, point in adapter_points(twin):
                point["a"].up.bias.add_(1.0)
        assert not torch.allclose(twin(x)[0], model(x)[0])  # the copy's hook uses the copy's adapters


def test_loading_onto_a_base_it_does_not_fit_is_refused(tmp_path, pretrained):
    tuneforge.train(init=str(pretrained), mechanisms=["adapter:reduction=8"], data="builtin:sentiment", steps=2,
                    batch_size=8, eval_every=0, out=str(tmp_path / "a"))
    folder = tmp_path / "a" / "step-00000002" / "adapters" / "default"
    torch.manual_seed(0)
    other = Transformer(model_config("tiny:n_layers=2,d_model=64,n_heads=2,max_seq_len=256"))
    with pytest.raises(ConfigError, match="is 32 wide; this model's hidden width is 64"):
        load_adapters(other, str(folder))
    assert not adapter_points(other)
    shallow = Transformer(model_config("tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=256"))
    with pytest.raises(ConfigError, match="blocks.1.attn, which this model does not have"):
        load_adapters(shallow, str(folder))
    with pytest.raises(ConfigError, match="holds a 'adapter', not a lora"):
        from tuneforge.plugins.lora import load_lora
        load_lora(task_model(), str(folder))


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_only_adapter_parameters_change_and_the_folder_reloads(tmp_path, pretrained, placement):
    base = tuneforge.load_model(pretrained)
    result = tuneforge.train(init=str(pretrained), mechanisms=[f"adapter:placement={placement},reduction=8"],
                             data="builtin:sentiment", steps=6, batch_size=8, lr=1e-2, warmup=1, eval_every=0,
                             out=str(tmp_path / placement))
    # 4 points x (down 32->4 + bias, up 4->32 + bias)
    assert result.summary["trainable_by_plugin"] == {"adapter": 4 * (32 * 4 + 4 + 4 * 32 + 32)}
    assert result.summary["frozen_weights"]["unchanged"]
    trained = result.model.state_dict()
    for k, v in base.state_dict().items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=0, msg=k)
    assert all(trained[k].abs().sum() > 0 for k in trained if k.endswith("up.weight") and ".adapters." in k)
    folder = tmp_path / placement / "step-00000006" / "adapters" / "default"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["points"]["blocks.0.mlp"] == {"d_model": 32, "size": 4, "placement": placement,
                                                 "activation": "gelu", "scale": 1.0}
    fresh = tuneforge.load_model(pretrained)
    assert load_adapters(fresh, str(folder)) == ["default"]
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = result.model.eval()(x)
        torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(tuneforge.load_model(tmp_path / placement)(x), expected, rtol=1e-6, atol=1e-6)


def test_adapter_with_lora_trains_and_saves_both_and_resumes(tmp_path, pretrained):
    mechanisms = ["adapter:reduction=8", "lora:rank=2"]
    args = dict(init=str(pretrained), data="builtin:sentiment", steps=6, batch_size=8, lr=1e-2, warmup=1,
                eval_every=0, out=str(tmp_path / "both"))
    full = tuneforge.train(mechanisms=mechanisms, **{**args, "out": str(tmp_path / "full")})
    first = tuneforge.train(mechanisms=mechanisms + [SignalAt(3)], **args)  # Ctrl-C after step 3
    assert first.run.step == 3 and first.checkpoint.name == "step-00000003"
    resumed = tuneforge.train(mechanisms=mechanisms, resume="auto", **args)
    assert set(resumed.summary["trainable_by_plugin"]) == {"adapter", "lora"}
    ck = tmp_path / "both" / "step-00000006"
    assert (ck / "adapters" / "default").is_dir() and (ck / "lora" / "default").is_dir()
    for k, v in full.model.state_dict().items():  # a resumed run ends where an uninterrupted one does
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_an_adapter_point_knows_its_parts():
    model = _mixed_model()
    point = model.blocks[0].attn.adapters
    assert isinstance(point, AdapterPoint) and point.task_names() == ["a", "b"]
    assert adapters.names(model) == {"adapters": ["a", "b"]}


def test_adapters_and_lora_on_a_bfloat16_model():
    model = task_model().to(torch.bfloat16)
    add_adapter(model, "a", placement="parallel")
    add_lora(model, "a", rank=2)
    point = model.blocks[0].mlp.adapters
    assert point["a"].up.weight.dtype == torch.bfloat16
    x = torch.randint(0, 256, (2, 6))
    with torch.no_grad(), routing.rows(["a", ""]):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
