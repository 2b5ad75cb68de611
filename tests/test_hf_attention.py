"""tuneforge's fused attention registered as the transformers attention implementation "tuneforge".

Tiny random models (no downloads) run with attn_implementation="tuneforge" and with the model's own eager
attention on the same weights; outputs, generated tokens and gradients must agree.
"""
import copy
import importlib
import sys
import warnings

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

import tuneforge.models  # noqa: E402
from tuneforge.models import hf_attention  # noqa: E402

ATOL = 1e-5
VOCAB = 97


def gpt2(**kw):
    cfg = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0, resid_pdrop=0.0,
               embd_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    cfg.update(kw)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def _llama_like(config_cls, model_cls, kv_heads: int):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return model_cls(cfg).eval()


def llama():  # grouped-query attention: 4 query heads share 2 key/value heads
    return _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM, kv_heads=2)


def qwen2():  # one key/value head for all 4 query heads
    return _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, kv_heads=1)


FAMILIES = {"gpt2": gpt2, "llama": llama, "qwen2": qwen2}


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """Registered, with fresh once-per-reason warnings, and a count of the fused kernel's calls."""
    hf_attention.register()
    monkeypatch.setattr(hf_attention, "_warned", set())
    calls = []
    kernel = hf_attention.flash_attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "flash_attention", counting)
    return calls


def pair(name):
    """The same weights twice: (tuneforge, eager)."""
    ours = FAMILIES[name]()
    theirs = copy.deepcopy(ours)
    ours.set_attn_implementation(hf_attention.attention_implementation_name)
    theirs.set_attn_implementation("eager")
    assert ours.config._attn_implementation == "tuneforge" and theirs.config._attn_implementation == "eager"
    return ours, theirs


def left_padded(batch_lengths=(9, 5, 2), T=9, seed=1):
    """ids (B, T) and a 0/1 attention mask with each row's real tokens at its right end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(batch_lengths), T), generator=g)
    mask = torch.zeros(len(batch_lengths), T, dtype=torch.long)
    for b, n in enumerate(batch_lengths):
        mask[b, T - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_eager(name, registered):
    ours, theirs = pair(name)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # the fused kernel did the work: once per layer, causal, no padding mask (the mask function said "none")
    assert len(registered) == ours.config.num_hidden_layers
    assert all(c["causal"] and c["key_padding_mask"] is None for c in registered)


def test_gpt2_layer_scaling_reaches_kernel(registered):
    """GPT-2 folds scale_attn_by_inverse_layer_idx into module.scaling, passed as `scaling`: layer i divides by i+1."""
    ours = gpt2(scale_attn_by_inverse_layer_idx=True)
    theirs = copy.deepcopy(ours)
    ours.set_attn_implementation("tuneforge")
    theirs.set_attn_implementation("eager")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=ATOL, rtol=0)
    head = 32 // 4
    assert [c["scale"] for c in registered] == pytest.approx([head ** -0.5, head ** -0.5 / 2])


def test_from_config_with_attn_implementation():
    model = transformers.LlamaForCausalLM._from_config(llama().config, attn_implementation="tuneforge")
    assert model.config._attn_implementation == "tuneforge"


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_batch(name, registered):
    ours, theirs = pair(name)
    ids, mask = left_padded()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = theirs(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)
    # the padding reached the kernel as a (B, Tk) bool mask
    assert registered and all(c["key_padding_mask"].shape == mask.shape for c in registered)
    assert torch.equal(registered[0]["key_padding_mask"], real)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_matches_eager(name):
    ours, theirs = pair(name)
    ids, mask = left_padded(T=6, batch_lengths=(6, 3))
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        a, b = ours.generate(ids, **kw), theirs.generate(ids, **kw)
    assert a.shape == (2, 14)
    assert torch.equal(a, b)


def test_static_cache_generation_matches_eager():
    ours, theirs = pair("llama")
    ids, mask = left_padded(T=6, batch_lengths=(6, 3))
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=5, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), theirs.generate(ids, **kw))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_incremental_decoding_matches_full_forward(name, registered):
    """Prefill, then a chunk of 2 new tokens (Tq=2 < Tk: bottom-right causal), then 1, against one full forward."""
    ours, theirs = pair(name)
    ids, mask = left_padded(T=10, batch_lengths=(10, 6))
    real = mask.bool()
    with torch.no_grad():
        pieces, past = [], None
        for start, stop in ((0, 7), (7, 9), (9, 10)):
            # positions count real tokens only (as generate does), the same for the full forward below
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:stop]
            out = ours(ids[:, start:stop], attention_mask=mask[:, :stop], cache=past, use_cache=True,
                       position_ids=pos)
            pieces.append(out.logits)
            past = out.past_key_values
        full = theirs(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], atol=ATOL, rtol=0)
    # the last two steps were the kernel's, with the cached keys: Tq < Tk
    assert any(c["key_padding_mask"].shape[-1] == 10 for c in registered)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gradients_match_eager(name):
    ours, theirs = pair(name)
    ours.train(), theirs.train()
    ids, mask = left_padded()
    # Next-token loss on real -> real pairs only. (HF's labels=ids.masked_fill(pad, -100) would also train the last
    # padding position to predict the first real token; that query sees no key, and what it gets then is
    # implementation-defined: eager averages every value, the kernel gives zeros.)
    pairs = (mask[:, :-1] * mask[:, 1:]).bool()  # (B, T-1)
    for model in (ours, theirs):
        logits = model(ids, attention_mask=mask).logits  # (B, T, V)
        torch.nn.functional.cross_entropy(logits[:, :-1][pairs], ids[:, 1:][pairs]).backward()
    grads = {n: p.grad for n, p in theirs.named_parameters()}
    checked = 0
    for n, p in ours.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], atol=ATOL, rtol=0, msg=n)
            checked += 1
    assert checked > 10
    # and they are not all zero: the comparison had something to compare
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "attn" in n and g is not None)


def test_dropout_in_training_falls_back_and_applies_dropout(registered):
    model = gpt2(attn_pdrop=0.5)
    model.set_attn_implementation("tuneforge")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        evaluated = model(ids).logits
    assert len(registered) == 2  # eval: dropout is off, the kernel runs
    model.train()
    with pytest.warns(UserWarning, match="dropout") as caught, torch.no_grad():
        trained = model(ids).logits
        model(ids)
    assert len([w for w in caught if "dropout" in str(w.message)]) == 1  # once, not per layer or call
    assert len(registered) == 2  # training with dropout never reached the kernel
    assert torch.isfinite(trained).all()
    assert not torch.allclose(trained, evaluated, atol=1e-3)  # dropout was really applied


def test_output_attentions_falls_back_to_eager():
    ours, theirs = pair("llama")
    ids, mask = left_padded()
    with pytest.warns(UserWarning, match="output_attentions"), torch.no_grad():
        a = ours(ids, attention_mask=mask, output_attentions=True)
    with torch.no_grad():
        b = theirs(ids, attention_mask=mask, output_attentions=True)
    assert len(a.attentions) == 2 and all(w is not None for w in a.attentions)
    for wa, wb in zip(a.attentions, b.attentions):
        torch.testing.assert_close(wa, wb, atol=ATOL, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=ATOL, rtol=0)


def test_packed_sequences_fall_back_correctly(registered):
    """position_ids restarting mid-row mean packed sequences: a mask the padding mask cannot express."""
    ours, theirs = pair("llama")
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with pytest.warns(UserWarning, match="4-D"), torch.no_grad():
        a = ours(ids, position_ids=pos, use_cache=False).logits
    with torch.no_grad():
        b = theirs(ids, position_ids=pos, use_cache=False).logits
        causal_only = ours(ids, position_ids=torch.arange(10)[None], use_cache=False).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert not torch.allclose(a, causal_only, atol=1e-3)  # packing changed the result: it was not dropped
    assert len(registered) == 2  # only the unpacked forward ran the kernel


def test_caller_4d_float_mask_falls_back():
    ours, theirs = pair("llama")
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    allowed[3, 1] = False  # not a causal + padding pattern
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with pytest.warns(UserWarning, match="4-D"), torch.no_grad():
        a = ours(ids, attention_mask=additive).logits
    with torch.no_grad():
        b = theirs(ids, attention_mask=additive).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_register_is_idempotent():
    hf_attention.register()
    hf_attention.register()
    assert transformers.AttentionInterface._global_mapping["tuneforge"] is hf_attention.attention
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionMaskInterface._global_mapping["tuneforge"] is hf_attention.padding_mask
    ours, theirs = pair("gpt2")
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=ATOL, rtol=0)


def test_module_imports_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    monkeypatch.delitem(sys.modules, "tuneforge.models.hf_attention")
    monkeypatch.setattr(tuneforge.models, "hf_attention", hf_attention)  # restored afterwards, whatever import sets
    fresh = importlib.import_module("tuneforge.models.hf_attention")
    assert fresh.attention_implementation_name == "tuneforge"
    with pytest.raises(ImportError):
        fresh.register()


def test_no_warning_on_the_fused_path():
    ours, _ = pair("llama")
    ids, mask = left_padded()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            ours(ids, attention_mask=mask)


def test_static_cache_without_attention_mask(registered):
    """A preallocated cache hands attention all its slots; with no mask given, the empty ones must still be dropped."""
    ours, theirs = pair("llama")
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    cache = transformers.StaticCache(config=ours.config, max_cache_len=16)
    with torch.no_grad():
        first = ours(ids[:, :5], cache=cache, use_cache=True).logits
        rest = ours(ids[:, 5:], cache=cache, use_cache=True).logits
        full = theirs(ids).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=ATOL, rtol=0)
    assert registered[-1]["key_padding_mask"].shape == (2, 7)  # 7 of the 16 slots filled


def test_gpt2_cross_attention_with_encoder_padding(registered):
    """Cross-attention: not causal, Tq != Tk, the encoder's padding as the (B, Tk) mask."""
    ours = gpt2(add_cross_attention=True)
    theirs = copy.deepcopy(ours)
    ours.set_attn_implementation("tuneforge")
    theirs.set_attn_implementation("eager")
    ids, mask = left_padded()
    enc = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(2))
    enc_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]])
    kw = dict(attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    with torch.no_grad():
        a, b = ours(**kw, input_ids=ids).logits, theirs(**kw, input_ids=ids).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)
    assert any(not c["causal"] and c["key_padding_mask"].shape == (3, 4) for c in registered)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_grouped_query_attention_reaches_the_kernel_with_its_kv_heads(name, registered, monkeypatch):
    """k/v go to the kernel with their Hkv heads (never repeated to H), and the result is transformers' own: eager's
    and sdpa's, on a left-padded batch."""
    shapes = []
    counting = hf_attention.flash_attention

    def recording(q, k, v, **kwargs):
        shapes.append((q.size(1), k.size(1), v.size(1)))
        return counting(q, k, v, **kwargs)

    monkeypatch.setattr(hf_attention, "flash_attention", recording)
    ours, eager = pair(name)
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    ids, mask = left_padded()
    real = mask.bool()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        for theirs in (eager, sdpa):
            torch.testing.assert_close(a[real], theirs(ids, attention_mask=mask).logits[real], atol=ATOL, rtol=0)
    kv_heads = ours.config.num_key_value_heads
    assert kv_heads < ours.config.num_attention_heads
    assert shapes and all(s == (ours.config.num_attention_heads, kv_heads, kv_heads) for s in shapes)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_folder_generates_the_same_with_and_without_its_cache_read_in_place(family, tmp_path, monkeypatch):
    """An HF tiny folder through tuneforge's wrapper: sampled tokens with the cache equal recomputing the prefix, and
    every decode step's attention reads key/value views of the preallocated cache, with their Hkv heads."""
    from tuneforge.models import hf
    from tuneforge.tools.hf_tiny import make_tiny

    model = hf.load(make_tiny(tmp_path / family, family, d_model=32, n_layers=2, n_heads=4, context=64,
                              vocab_size=320))
    caches, reads = [], []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a: caches.append(new_cache(*a)) or caches[-1])
    kernel = hf_attention.flash_attention

    def recording(q, k, v, **kwargs):
        if q.size(2) == 1:  # a decode step
            reads.append((k.data_ptr(), v.data_ptr(), k.size(1), k.is_contiguous()))
        return kernel(q, k, v, **kwargs)

    monkeypatch.setattr(hf_attention, "flash_attention", recording)
    ids, mask = left_padded(T=7, batch_lengths=(7, 4, 2))
    ids = ids.clamp(max=300)
    gen = lambda **kw: model.generate(ids, 12, temperature=1.0, key_padding_mask=mask.bool(),  # noqa: E731
                                      generator=torch.Generator().manual_seed(5), **kw)
    cached, fresh = gen(), gen(use_cache=False)
    assert torch.equal(cached, fresh) and cached.shape == (3, 19)
    layers = caches[0].kv.layers
    stored = {(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in layers}
    kv_heads = getattr(model.hf_model.config, "num_key_value_heads", None) or model.config.n_heads
    assert len(reads) == 11 * len(layers)  # 11 decode steps after the prompt's, every layer
    assert all((kp, vp) in stored and heads == kv_heads and not contiguous for kp, vp, heads, contiguous in reads)


def test_hf_static_cache_says_when_it_is_full(tmp_path):
    from tuneforge.models import hf
    from tuneforge.tools.hf_tiny import make_tiny

    model = hf.load(make_tiny(tmp_path / "llama", "llama", d_model=32, n_layers=2, n_heads=4, context=64,
                              vocab_size=320))
    cache = model.new_cache(1, 6)
    assert isinstance(cache.kv, transformers.StaticCache)
    ids = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
        with pytest.raises(ValueError, match="holds 6 tokens and 7 would be in it"):
            model(ids[:, 5:], cache=cache)
    assert cache.length == 5
