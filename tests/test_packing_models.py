"""Packed rows on both model kinds: ``forward_hidden(idx, cu_seqlens=...)`` with several documents back to back in a
row gives each document the hidden states, loss and gradients it gets alone (the embedded model, tiny random
Hugging Face GPT-2 and Llama folders), on the fused path and on hf_attention's fallbacks; what cannot be packed is
refused."""
import json
import shutil
import warnings

import pytest
import torch
from torch import nn

from tuneforge.models import checkpointing
from tuneforge.models.lm_loss import next_token_loss_of
from tuneforge.models.packing import check_offsets, document_mask, packed_positions
from tuneforge.models.protocol import Prefix
from tuneforge.models.transformer import Transformer, model_config

KINDS = ["embedded", "gpt2", "llama"]
HF_SIZES = dict(d_model=32, n_layers=2, n_heads=4, context=64, vocab_size=320)
DOCS = (5, 7, 4)  # one packed row of 3 documents, then 2 positions of padding
T = 18


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tuneforge.tools.hf_tiny import make_tiny

    root = tmp_path_factory.mktemp("packing")
    return {f: make_tiny(root / f, f, **HF_SIZES) for f in ("gpt2", "llama", "qwen2")}


def _model(kind, hf_folders=None, **load):
    if kind == "embedded":
        torch.manual_seed(0)
        return Transformer(model_config("tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=32")).eval()
    from tuneforge.models import hf

    return hf.load(hf_folders[kind], **load)


@pytest.fixture(params=KINDS)
def model(request):
    if request.param == "embedded":
        return _model("embedded")
    return _model(request.param, request.getfixturevalue("hf_folders"))


def _ids(model, batch=1, seed=0):
    return torch.randint(0, model.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


def _offsets(lengths, total=None) -> list[int]:
    """[0, l0, l0 + l1, ...], repeating the last offset up to ``total`` documents."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out + [out[-1]] * ((total or len(lengths)) - len(lengths))


def _documents(offsets):
    return [(s, e) for s, e in zip(offsets, offsets[1:]) if e > s]


def _targets(ids, offsets):
    """Next tokens within each document of one row; -100 at each document's last token and on the padding."""
    target = torch.full_like(ids, -100)
    for s, e in _documents(offsets):
        target[s:e - 1] = ids[s + 1:e]
    return target


# -- the helpers ---------------------------------------------------------------------------------------------------

def test_packed_positions_and_document_mask_follow_the_offsets():
    cu = torch.tensor([[0, 3, 3, 7, 8], [0, 2, 6, 6, 6]])  # an empty document in row 0; row 1 has 2 documents
    pos, allowed = packed_positions(cu, 2, 10), document_mask(cu, 2, 10)
    for b, row in enumerate(cu.tolist()):
        doc = [next((i for i, (s, e) in enumerate(zip(row, row[1:])) if s <= t < e), None) for t in range(10)]
        start = [row[d] if d is not None else row[-1] for d in doc]
        assert pos[b].tolist() == [t - start[t] for t in range(10)]
        expect = [[doc[t] is not None and doc[t] == doc[u] and u <= t for u in range(10)] for t in range(10)]
        assert allowed[b, 0].tolist() == expect
    shared = packed_positions(torch.tensor([0, 4, 9]), 3, 10)  # (S + 1,): the same layout in every row
    assert shared.shape == (3, 10) and shared[2].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0]


@pytest.mark.parametrize("bad, match", [([0, 5, 3], "never decrease"), ([1, 4], "start at 0"),
                                        ([0, 11], "at most"), ([0.0, 4.0], "integer"), ([0], "S >= 1")])
def test_bad_offsets_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        check_offsets(torch.tensor(bad), 1, 10)


# -- hidden states, loss, gradients ----------------------------------------------------------------------------

def test_packed_row_gives_each_document_its_hidden_states_alone(model):
    ids, offsets = _ids(model), _offsets(DOCS)
    with torch.no_grad():
        packed = model.forward_hidden(ids, cu_seqlens=torch.tensor(offsets))  # (1, T, C)
        for s, e in _documents(offsets):
            torch.testing.assert_close(packed[:, s:e], model.forward_hidden(ids[:, s:e]), rtol=0, atol=1e-5)
        unpacked = model.forward_hidden(ids)
    s, e = _documents(offsets)[1]
    assert not torch.allclose(packed[:, s:e], unpacked[:, s:e], atol=1e-3)  # packing changed what it reads


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every", [0, 1], ids=["plain", "checkpointed"])
def test_loss_and_gradients_equal_the_separate_runs(model, every):
    """Two rows with per-row offsets (3 documents and 2, padded by repeating the last offset): the packed mean
    loss and every parameter's gradient equal those of the documents run one by one (summed, weighted by tokens)."""
    model.train()
    assert checkpointing.apply(model, every) == ([0, 1] if every else [])
    rows = [_offsets(DOCS), _offsets((9, 6), total=3)]
    ids = _ids(model, batch=2, seed=1)
    target = torch.stack([_targets(ids[b], rows[b]) for b in range(2)])  # (2, T)
    loss = next_token_loss_of(model, ids, target, cu_seqlens=torch.tensor(rows))
    loss.backward()
    packed = _grads(model)
    model.zero_grad()
    counted = int((target != -100).sum())
    separate = 0
    for b, row in enumerate(rows):
        for s, e in _documents(row):
            doc_target = _targets(ids[b, s:e], [0, e - s])[None]
            n = int((doc_target != -100).sum())
            separate = separate + next_token_loss_of(model, ids[b:b + 1, s:e], doc_target) * (n / counted)
    separate.backward()
    torch.testing.assert_close(loss, separate, rtol=1e-5, atol=0)
    alone = _grads(model)
    assert packed.keys() == alone.keys() and len(packed) > 4
    for name, grad in packed.items():
        torch.testing.assert_close(grad, alone[name], rtol=1e-5, atol=1e-5 * float(alone[name].abs().max()),
                                   msg=name)


def test_padding_mask_and_own_positions_go_with_packing():
    """A key padding mask over the tail and explicit positions are honoured beside the offsets."""
    model = _model("embedded")
    ids, offsets = _ids(model), _offsets(DOCS)
    mask = torch.arange(T)[None] < offsets[-1]  # (1, T): the tail is padding
    cu = torch.tensor(offsets)
    with torch.no_grad():
        default = model.forward_hidden(ids, cu_seqlens=cu)
        masked = model.forward_hidden(ids, key_padding_mask=mask, cu_seqlens=cu)
        own = model.forward_hidden(ids, positions=packed_positions(cu, 1, T), cu_seqlens=cu)
        shifted = model.forward_hidden(ids, positions=packed_positions(cu, 1, T) + 1, cu_seqlens=cu)
    real = mask[0]
    torch.testing.assert_close(masked[:, real], default[:, real], rtol=0, atol=1e-6)
    torch.testing.assert_close(own, default, rtol=0, atol=0)
    assert not torch.allclose(shifted[:, real], default[:, real], atol=1e-3)


# -- refusals ----------------------------------------------------------------------------------------------------

class _SoftPrompt(nn.Module):
    max_length = 2

    def __init__(self, width):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(1, 2, width))

    def forward(self, batch_size):
        return Prefix(self.emb.expand(batch_size, -1, -1))


def test_packing_refuses_a_cache_and_soft_prompts(model):
    ids, cu = _ids(model), torch.tensor(_offsets(DOCS))
    with pytest.raises(ValueError, match="KV cache"):
        model.forward_hidden(ids, cu_seqlens=cu, cache=model.new_cache(1, T))
    model.prefix = _SoftPrompt(model.config.d_model)
    with pytest.raises(ValueError, match="soft prompts.*packing=false"):
        model.forward_hidden(ids, cu_seqlens=cu)
    assert model.forward_hidden(ids).shape[:2] == (1, T)  # the prompt itself still works unpacked


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_packing_needs_tuneforge_attention(hf_folders, attn):
    from tuneforge.errors import ConfigError

    model = _model("llama", hf_folders, attn=attn)
    with pytest.raises(ConfigError, match=r"\?attn=tuneforge"):
        model.forward_hidden(_ids(model), cu_seqlens=torch.tensor(_offsets(DOCS)))


def test_hf_layers_that_drop_the_offsets_are_caught(hf_folders):
    """A model whose layers do not hand transformers' kwargs on to attention would mix documents: refused."""
    from tuneforge.errors import ConfigError
    from tuneforge.models import hf_attention

    model = _model("gpt2", hf_folders)
    attention = hf_attention.attention

    def dropping(*args, **kwargs):
        kwargs.pop(hf_attention.PACKED_KWARG, None)
        return attention(*args, **kwargs)

    from transformers import AttentionInterface
    AttentionInterface.register(hf_attention.attention_implementation_name, dropping)
    try:
        with pytest.raises(ConfigError, match="0 of .* 2 layers"):
            model.forward_hidden(_ids(model), cu_seqlens=torch.tensor(_offsets(DOCS)))
    finally:
        AttentionInterface.register(hf_attention.attention_implementation_name, attention)


# -- hf_attention's fallbacks keep documents apart ----------------------------------------------------------------

@pytest.fixture
def kernel_calls(monkeypatch):
    from tuneforge.models import hf_attention

    monkeypatch.setattr(hf_attention, "_warned", set())
    calls = []
    kernel = hf_attention.flash_attention
    monkeypatch.setattr(hf_attention, "flash_attention", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    return calls


def _check_fallback(model, warning, kernel_calls):
    ids, offsets = _ids(model), _offsets(DOCS)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        packed = model.forward_hidden(ids, cu_seqlens=torch.tensor(offsets))
        alone = [model.forward_hidden(ids[:, s:e]) for s, e in _documents(offsets)]
        unpacked = model.forward_hidden(ids)
    assert any(warning in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert kernel_calls == []  # every call took the fallback
    for (s, e), h in zip(_documents(offsets), alone):
        torch.testing.assert_close(packed[:, s:e], h, rtol=0, atol=1e-5)
    s, e = _documents(offsets)[2]
    assert not torch.allclose(packed[:, s:e], unpacked[:, s:e], atol=1e-3)


def test_fallback_for_attention_dropout_keeps_documents_apart(hf_folders, kernel_calls):
    """Training with attention dropout runs transformers' sdpa. p = 1e-12 takes that path for real while dropping
    nothing in practice (and scaling by 1 / (1 - p) = 1 in float32), so the documents can be compared."""
    model = _model("gpt2", hf_folders).train()
    for block in model.blocks:
        block.attn.attn_dropout.p = 1e-12
    _check_fallback(model, "dropout", kernel_calls)


def test_eager_fallback_keeps_documents_apart(hf_folders, kernel_calls):
    """output_attentions sends attention to the model's own eager function (an additive float mask): called as a
    Llama layer calls it (grouped-query k/v), it gives the kernel's packed output on every real query."""
    from tuneforge.kernels import flash_attention
    from tuneforge.models import hf_attention

    layer = _model("llama", hf_folders).blocks[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, T, 8, generator=g) for h in (4, 2, 2))  # 4 query heads share 2 k/v heads
    cu = torch.tensor([_offsets(DOCS), _offsets((9, 6), total=3)])
    with pytest.warns(UserWarning, match="output_attentions"):
        out, weights = hf_attention.attention(layer, q, k, v, None, scaling=8 ** -0.5, output_attentions=True,
                                              **{hf_attention.PACKED_KWARG: hf_attention.PackedRows(cu)})
    assert kernel_calls == [] and weights is not None  # eager ran: it returns the attention weights
    expect = flash_attention(q, k, v, cu_seqlens=cu).transpose(1, 2)  # (B, T, H, D)
    for b, row in enumerate(cu.tolist()):
        torch.testing.assert_close(out[b, :row[-1]], expect[b, :row[-1]], rtol=0, atol=1e-5)  # real queries
        assert float(weights[b, :, :row[-1]].masked_select(~document_mask(cu, 2, T)[b, :, :row[-1]]).abs().max()) \
            == 0  # no weight across a document boundary


def test_fallback_for_a_sliding_window_mask_keeps_documents_apart(hf_folders, tmp_path, kernel_calls):
    """A sliding window comes as transformers' 4-D bool mask; the documents narrow it further."""
    folder = tmp_path / "qwen2-sliding"
    shutil.copytree(hf_folders["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=3, max_window_layers=0, layer_types=None)
    (folder / "config.json").write_text(json.dumps(config))
    model = _model("qwen2", {"qwen2": folder})
    assert set(model.hf_model.config.layer_types) == {"sliding_attention"}
    _check_fallback(model, "4-D", kernel_calls)
