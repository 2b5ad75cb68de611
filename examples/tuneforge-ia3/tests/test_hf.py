"""IA³ on Hugging Face models (``--model hf:PATH``): tiny random Llama and GPT-2 folders made in the test, as
``tuneforge hf-tiny OUT --family llama --train-steps 0`` makes them (no downloads)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import tuneforge  # noqa: E402
from tuneforge.sdk.testing import changed, snapshot, tiny_hf_folder, tiny_model  # noqa: E402

from tuneforge_ia3 import add_ia3, ia3_layers  # noqa: E402

D = 32
SMALL = dict(d_model=D, n_layers=2, n_heads=4, context=128, vocab_size=320)
# where each family keeps keys, values and the MLP's down projection (spans: the features each vector scales)
EXPECTED = {
    "llama": {"model.layers.0.self_attn.k_proj": ("out", {"k": (0, 16)}),  # grouped: 2 key/value heads of 8
              "model.layers.0.self_attn.v_proj": ("out", {"v": (0, 16)}),
              "model.layers.0.mlp.down_proj": ("in", {"mlp": (0, 80)})},
    # GPT-2's fused c_attn: q | k | v side by side; the query third keeps no vector
    "gpt2": {"transformer.h.0.attn.c_attn": ("out", {"k": (D, 2 * D), "v": (2 * D, 3 * D)}),
             "transformer.h.0.mlp.c_proj": ("in", {"mlp": (0, 4 * D)})},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: tiny_hf_folder(root / f, f, **SMALL) for f in EXPECTED}


def _ids(model):
    return torch.tensor([model.tokenizer.encode("review: the room was warm and the soup was cold", bos=True)])


@pytest.mark.parametrize("family", list(EXPECTED))
def test_vectors_go_where_the_families_table_says_and_start_as_the_identity(folders, family):
    model = tiny_model(spec=f"hf:{folders[family]}")
    ids = _ids(model)
    with torch.no_grad():
        before = model(ids)
        add_ia3(model)
        after = model(ids)
    assert torch.equal(after, before)
    placed = {p: (layer.side, dict(layer.spans)) for p, layer in ia3_layers(model)}
    assert len(placed) == 2 * len(EXPECTED[family])  # two blocks
    assert {p: v for p, v in placed.items() if ".0." in p} == EXPECTED[family]


def test_gpt2_scales_only_the_key_and_value_thirds_of_c_attn(folders):
    model = tiny_model(spec=f"hf:{folders['gpt2']}")
    c_attn = model.get_submodule("transformer.h.0.attn.c_attn")
    w, b = c_attn.weight.detach().clone(), c_attn.bias.detach().clone()
    add_ia3(model, targets=["k", "v"], layers=["0"])
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    with torch.no_grad():
        layer.ia3["k"].fill_(2.0)
        layer.ia3["v"].fill_(0.5)
        x = torch.randn(2, 7, D)  # (B, T, C)
        plain, scaled = F.linear(x, w, b), layer(x)  # (B, T, 3C)
    assert torch.equal(scaled[..., :D], plain[..., :D])  # queries: untouched, exactly
    torch.testing.assert_close(scaled[..., D:2 * D], plain[..., D:2 * D] * 2.0)
    torch.testing.assert_close(scaled[..., 2 * D:], plain[..., 2 * D:] * 0.5)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_trains_only_the_vectors_saves_them_alone_and_rebuilds(folders, family, train_tiny, tmp_path):
    start = tiny_model(spec=f"hf:{folders[family]}")
    result = train_tiny("ia3", model=f"hf:{folders[family]}", steps=3, lr=0.1, out=tmp_path / "run")
    per_block = sum(b - a for _, spans in EXPECTED[family].values() for a, b in spans.values())
    assert result.summary["trainable_params"] == 2 * per_block
    assert result.summary["frozen_weights"]["unchanged"]
    trained = result.model.eval()
    assert {n.rsplit(".ia3.", 1)[1] for n in changed(trained, snapshot(start))} == {"k", "v", "mlp"}
    assert all(".ia3." in n for n in changed(trained, snapshot(start)))
    # the frozen base stays in the model folder: the checkpoint's model file holds the vectors alone
    from safetensors import safe_open
    with safe_open(str(result.checkpoint / "model.safetensors"), framework="pt") as fh:
        assert all(".ia3." in k for k in fh.keys()) and len(list(fh.keys())) == 2 * 3
    loaded = tuneforge.load_model(tmp_path / "run")
    ids = _ids(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(ids), trained(ids))
        assert not torch.allclose(loaded(ids), start(ids), atol=1e-5)


def test_a_mechanism_that_replaces_the_model_after_ia3_is_refused(folders, train_tiny, tmp_path):
    # pretrain starts a Hugging Face model again from its config: a new model, without the IA³ layers
    with pytest.raises(tuneforge.ConfigError, match="no longer hold their IA³ layer.*pretrain"):
        train_tiny("ia3", "pretrain", model=f"hf:{folders['gpt2']}", out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
