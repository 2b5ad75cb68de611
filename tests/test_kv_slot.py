"""The attention slot for extra keys and values (``model.kv_prefix``) on both model kinds.

The reference: the keys and values a model computes for P real tokens, handed back through the slot in front of an
input at positions P.., give exactly the hidden states of those tokens and the input run as one sequence. So the
slot prepends to every layer's keys, every query sees them, positions stay the caller's, and a rotary model's keys
are used as given. Then: generation with the cache equals generation without it and the reference's greedy tokens;
rows masked off run as without the slot; gradients reach the slot's parameters (also through activation
checkpointing); hf_attention's fallbacks honour it; what cannot work is refused."""
import json
import shutil

import pytest
import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.models import checkpointing
from tuneforge.models.kv_slot import token_keys_values
from tuneforge.models.protocol import KVPrefix
from tuneforge.models.transformer import Transformer, model_config

KINDS = ["embedded", "llama", "gpt2"]
P, T = 5, 7


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    pytest.importorskip("transformers")
    from tuneforge.tools.hf_tiny import make_tiny

    root = tmp_path_factory.mktemp("kv-slot")
    return {f: make_tiny(root / f, f, d_model=32, n_layers=2, n_heads=4, context=64, vocab_size=320)
            for f in ("gpt2", "llama", "qwen2")}


def _model(kind, hf_folders=None, **load):
    if kind == "embedded":
        torch.manual_seed(0)
        return Transformer(model_config("tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=32")).eval()
    from tuneforge.models import hf

    return hf.load(hf_folders[kind], **load)


@pytest.fixture(params=KINDS)
def model(request):
    return _model(request.param, None if request.param == "embedded" else request.getfixturevalue("hf_folders"))


class Given(nn.Module):
    """A slot that returns fixed extras per layer (None for a layer not in the list)."""

    def __init__(self, extras):
        super().__init__()
        self.extras = extras

    def forward(self, layer, batch_size):
        return self.extras[layer] if layer < len(self.extras) else None


class Learned(nn.Module):
    """A trainable slot: (H_kv, P, D) keys and values per layer, one copy for every row."""

    def __init__(self, model, length=P):
        super().__init__()
        heads, width = model.kv_shape
        g = torch.Generator().manual_seed(1)
        self.k = nn.Parameter(torch.randn(len(model.blocks), heads, length, width, generator=g))
        self.v = nn.Parameter(torch.randn(len(model.blocks), heads, length, width, generator=g))

    def forward(self, layer, batch_size):
        return KVPrefix(self.k[layer][None], self.v[layer][None])  # (1, H_kv, P, D): every row


def _ids(model, *shape, seed=0):
    return torch.randint(3, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _with_token_prefix(model, batch=2):
    """(prefix ids (1, P), input ids (batch, T)); the model's slot then holds the prefix tokens' keys and values."""
    pids, ids = _ids(model, 1, P, seed=1), _ids(model, batch, T)
    model.kv_prefix = Given(token_keys_values(model, pids))
    return pids, ids


def test_token_keys_values_in_the_slot_equal_the_tokens_in_front(model):
    pids, ids = _with_token_prefix(model)
    positions = torch.arange(P, P + T).expand(2, T)
    with torch.no_grad():
        got = model.forward_hidden(ids, positions=positions)
        slot, model.kv_prefix = model.kv_prefix, None
        whole = model.forward_hidden(torch.cat([pids.expand(2, P), ids], 1))[:, P:]
        plain = model.forward_hidden(ids, positions=positions)
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the extras did change the output
    model.kv_prefix = slot
    with torch.no_grad():  # the positions are the caller's: the default ones give another output
        assert (model.forward_hidden(ids) - got).abs().max() > 1e-3


def test_generation_with_the_cache_equals_without_and_the_reference(model):
    pids, ids = _with_token_prefix(model)
    prompt, new = ids[:, :3], 6
    mask = torch.ones_like(prompt, dtype=torch.bool)
    mask[1, 0] = False  # row 1 left-padded by one: the padding mask is widened over the extras too
    cached = model.generate(prompt, new, temperature=0, key_padding_mask=mask)
    uncached = model.generate(prompt, new, temperature=0, key_padding_mask=mask, use_cache=False)
    assert torch.equal(cached, uncached)
    slot, model.kv_prefix = model.kv_prefix, None
    for row in range(2):  # greedy on the whole sequence, prefix tokens in front (their own positions 0..P-1, the
        # row's from 0 as generate gives them), one row at a time
        seq = torch.cat([pids, prompt[row:row + 1, int(not mask[row].all()):]], 1)
        with torch.no_grad():
            for _ in range(new):
                positions = torch.cat([torch.arange(P), torch.arange(seq.size(1) - P)])[None]
                seq = torch.cat([seq, model(seq, positions=positions)[:, -1:].argmax(-1)], 1)
        assert seq[0, -new:].tolist() == cached[row, -new:].tolist()
    model.kv_prefix = slot


def test_a_row_masked_off_runs_as_without_the_slot(model):
    _, ids = _with_token_prefix(model)
    extras = [KVPrefix(e.keys.expand(2, -1, -1, -1), e.values.expand(2, -1, -1, -1),
                       torch.tensor([[True] * P, [False] * P])) for e in model.kv_prefix.extras]
    model.kv_prefix = Given(extras)
    with torch.no_grad():
        got = model.forward_hidden(ids)
        model.kv_prefix = None
        plain = model.forward_hidden(ids)
    torch.testing.assert_close(got[1], plain[1], rtol=0, atol=1e-5)
    assert (got[0] - plain[0]).abs().max() > 1e-2


def test_a_layer_without_extras_and_gradients_into_the_slot(model):
    slot = model.kv_prefix = Learned(model)
    ids = _ids(model, 2, T)
    model.forward_hidden(ids).pow(2).sum().backward()
    assert slot.k.grad.abs().sum(dim=(1, 2, 3)).min() > 0 and slot.v.grad.abs().sum() > 0  # every layer's
    with torch.no_grad():
        both = model.forward_hidden(ids)
        model.kv_prefix = Given([None, KVPrefix(slot.k[1][None], slot.v[1][None])])  # the last layer only
        last = model.forward_hidden(ids)
        model.kv_prefix = None
        plain = model.forward_hidden(ids)
    assert (last - plain).abs().max() > 1e-3 and (last - both).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["embedded", "llama"])
def test_gradients_through_activation_checkpointing_equal(kind, hf_folders):
    model = _model(kind, hf_folders).train()
    slot = model.kv_prefix = Learned(model)
    ids = _ids(model, 2, T)
    grads = []
    for every in (0, 1):
        checkpointing.apply(model, every)
        slot.zero_grad()
        model.forward_hidden(ids).pow(2).sum().backward()
        grads.append((slot.k.grad.clone(), slot.v.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_wrong_shapes_and_packed_rows_are_refused(model):
    heads, width = model.kv_shape
    ids = _ids(model, 2, T)
    model.kv_prefix = Given([KVPrefix(torch.zeros(1, heads + 1, P, width), torch.zeros(1, heads + 1, P, width))])
    with pytest.raises(ValueError, match=r"kv_shape is \(H_kv, D\)"):
        model.forward_hidden(ids)
    model.kv_prefix = Given([(torch.zeros(1, heads, P, width),) * 2])
    with pytest.raises(TypeError, match="KVPrefix"):
        model.forward_hidden(ids)
    model.kv_prefix = Learned(model)
    with pytest.raises(ValueError, match="packed rows .* packing=false"):
        model.forward_hidden(ids, cu_seqlens=torch.tensor([0, 3, T]))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_needs_tuneforge_attention(hf_folders, attn):
    model = _model("llama", hf_folders, attn=attn)
    model.kv_prefix = Learned(model)
    with pytest.raises(ConfigError, match=r"kv_prefix.*\?attn=tuneforge"):
        model.forward_hidden(_ids(model, 1, T))


def test_hf_layers_that_drop_the_extras_are_caught(hf_folders):
    from transformers import AttentionInterface

    from tuneforge.models import hf_attention

    model = _model("gpt2", hf_folders)
    model.kv_prefix = Learned(model)
    attention = hf_attention.attention

    def dropping(*args, **kwargs):
        kwargs.pop(hf_attention.KV_PREFIX_KWARG, None)
        return attention(*args, **kwargs)

    AttentionInterface.register(hf_attention.attention_implementation_name, dropping)
    try:
        with pytest.raises(ConfigError, match="reached 0 of .* 2 layers"):
            model.forward_hidden(_ids(model, 1, T))
    finally:
        AttentionInterface.register(hf_attention.attention_implementation_name, attention)


# -- hf_attention's fallbacks honour the extras -------------------------------------------------------------------

@pytest.fixture
def kernel_calls(monkeypatch):
    from tuneforge.models import hf_attention

    monkeypatch.setattr(hf_attention, "_warned", set())
    calls = []
    kernel = hf_attention.flash_attention
    monkeypatch.setattr(hf_attention, "flash_attention", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    return calls


def _check_fallback(model, kernel_calls, warning):
    """With the fallback taken on every call, the slot still equals the prefix tokens run in front."""
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, :2] = False  # left padding: a padding mask to widen as well
    with pytest.warns(UserWarning, match=warning), torch.no_grad():
        pids, ids = _with_token_prefix(model)  # read in eval mode: dropout off, so through the kernel
        kernel_calls.clear()
        got = model.forward_hidden(ids, key_padding_mask=mask, positions=(mask.long().cumsum(-1) - 1).clamp(min=0)
                                   + P)
        slot, model.kv_prefix = model.kv_prefix, None
        whole = [model.forward_hidden(torch.cat([pids, ids[r:r + 1, int((~mask[r]).sum()):]], 1))[:, P:]
                 for r in range(2)]
    model.kv_prefix = slot
    assert kernel_calls == []  # every call took the fallback
    for r in range(2):
        torch.testing.assert_close(got[r:r + 1, int((~mask[r]).sum()):], whole[r], rtol=0, atol=1e-5)


def test_fallback_for_attention_dropout_honours_the_extras(hf_folders, kernel_calls):
    model = _model("gpt2", hf_folders).train()
    for block in model.blocks:
        block.attn.attn_dropout.p = 1e-12  # takes sdpa's path for real, drops nothing in practice
    _check_fallback(model, kernel_calls, "dropout")


def test_fallback_for_a_sliding_window_honours_the_extras(hf_folders, tmp_path, kernel_calls):
    """A sliding window comes as a 4-D bool mask, widened with columns every query may see. The window (8) is longer
    than the sequence, so the reference without the slot is unchanged by it."""
    folder = tmp_path / "qwen2-sliding"
    shutil.copytree(hf_folders["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=16, max_window_layers=0, layer_types=None)
    (folder / "config.json").write_text(json.dumps(config))
    _check_fallback(_model("qwen2", {"qwen2": folder}), kernel_calls, "4-D")


def test_eager_fallback_honours_the_extras(hf_folders, kernel_calls):
    """output_attentions sends attention to the model's eager function (an additive float mask): called as a Llama
    layer calls it, it gives the kernel's output with the extras in front, and weights over P + T keys."""
    from tuneforge.kernels import flash_attention
    from tuneforge.models import hf_attention

    layer = _model("llama", hf_folders).blocks[1].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, T, 8, generator=g) for h in (4, 2, 2))  # 4 query heads share 2 k/v heads
    pk, pv = (torch.randn(2, 2, P, 8, generator=g) for _ in range(2))
    extras = hf_attention.ExtraKeys([None, KVPrefix(pk, pv)])
    with pytest.warns(UserWarning, match="output_attentions"):
        out, weights = hf_attention.attention(layer, q, k, v, None, scaling=8 ** -0.5, output_attentions=True,
                                              **{hf_attention.KV_PREFIX_KWARG: extras})
    assert kernel_calls == [] and weights.shape[-1] == P + T and extras.calls == 1
    expect = flash_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2)).transpose(1, 2)  # (B, T, H, D)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-5)
    assert float(weights[..., :P].min()) > 0  # the first query too attends to every extra key
