import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.models.transformer import PRESETS, ModelConfig, Transformer, model_config
from tuneforge.models.sampling import filter_logits, sample_next

SMALL = "tiny:n_layers=2,d_model=32,n_heads=4,max_seq_len=48"


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(model_config(SMALL)).eval()


def test_presets_sizes_and_tied_weights():
    tiny = Transformer(PRESETS["tiny"])
    assert 0.5e6 < tiny.num_params() < 1.2e6
    assert tiny.lm_head.weight is tiny.tok_emb.weight
    assert 3e6 < Transformer(PRESETS["small"]).num_params() < 8e6


def test_model_config_parsing_and_errors():
    cfg = model_config("tiny:n_layers=2,d_model=64")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == (2, 64, 4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="presets: tiny, small"):
        model_config("tinny")
    with pytest.raises(ConfigError, match="n_layer"):
        model_config("tiny:n_layer=2")
    with pytest.raises(ConfigError, match="multiple of n_heads"):
        model_config("tiny:d_model=30")
    with pytest.raises(ConfigError, match="unknown model config key"):
        ModelConfig.from_dict({"depth": 3})


def test_causality(model):
    x = torch.randint(0, 256, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 256
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_chunked_forward_with_cache_equals_full_forward(model):
    x = torch.randint(0, 256, (2, 21))
    full = model(x)
    cache = model.new_cache(2)
    parts = [model(x[:, :8], cache=cache), model(x[:, 8:9], cache=cache), model(x[:, 9:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_too_long_input_is_a_clear_error(model):
    with pytest.raises(ValueError, match="context of 48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="at most 8 new tokens fit"):
        model.generate(torch.zeros(1, 40, dtype=torch.long), 9)
    cache = model.new_cache(1, 10)  # a cache shorter than the context: its own limit, said before anything is written
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="holds 10 tokens and 11 would be in it"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert cache.length == 8


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, top_k=20), dict(temperature=0.8, top_p=0.9)])
def test_generation_with_cache_equals_without(model, kw):
    p = torch.randint(0, 256, (3, 7))
    a = model.generate(p, 25, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(p, 25, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(a, b) and a.shape == (3, 32)


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 9, 6)]
    T = max(len(p) for p in prompts)
    batch = torch.full((3, T), 258)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):], mask[i, T - len(p):] = p, True
    out = model.generate(batch, 12, temperature=0, key_padding_mask=mask)
    recomputed = model.generate(batch, 12, temperature=0, key_padding_mask=mask, use_cache=False)
    assert torch.equal(out, recomputed)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 12, temperature=0)
        assert torch.equal(out[i, T:], alone[0, len(p):]), i


def test_padded_chunked_forward_with_cache_equals_full_forward(model):
    # The mask given with a cache covers every key so far; positions are the caller's (here from the mask).
    x = torch.randint(0, 256, (2, 15))
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, :4] = False  # row 0 is left-padded by 4
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    full = model(x, key_padding_mask=mask, positions=pos)
    cache = model.new_cache(2)
    a = model(x[:, :6], key_padding_mask=mask[:, :6], positions=pos[:, :6], cache=cache)
    b = model(x[:, 6:], key_padding_mask=mask, positions=pos[:, 6:], cache=cache)
    assert cache.length == 15
    torch.testing.assert_close(torch.cat([a, b], 1)[mask], full[mask], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(a).all()  # padding rows see no key: finite, not NaN
    with pytest.raises(ValueError, match=r"cached \+ new tokens"):
        model(x[:, :1], key_padding_mask=mask[:, :1], cache=cache)


def test_module_paths_and_attention_goes_through_the_kernel(model, monkeypatch):
    # Adapters, LoRA and heads find submodules by these paths; attention math lives only in the kernel.
    names = dict(model.named_modules())
    for path in ("tok_emb", "pos_emb", "drop", "ln_f", "lm_head", "blocks.1.ln1", "blocks.1.ln2",
                 "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v", "blocks.1.attn.o",
                 "blocks.1.mlp.up", "blocks.1.mlp.down"):
        assert path in names, path
    import tuneforge.kernels
    import tuneforge.models.transformer

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return tuneforge.kernels.flash_attention(*args, **kwargs)

    monkeypatch.setattr(tuneforge.models.transformer, "flash_attention", counting)
    model(torch.randint(0, 256, (1, 5)))
    assert len(calls) == model.config.n_layers


def test_decode_step_hands_attention_views_of_the_cache(model, monkeypatch):
    """A cached step writes its keys/values into the preallocated cache and attention reads the filled part where it
    lies: the k/v it gets share the cache's storage (strided, rows max_len apart), and nothing copies the cache."""
    import tuneforge.kernels
    import tuneforge.models.transformer

    seen = []

    def recording(q, k, v, **kwargs):
        seen.append((q.shape, k, v))
        return tuneforge.kernels.flash_attention(q, k, v, **kwargs)

    monkeypatch.setattr(tuneforge.models.transformer, "flash_attention", recording)
    cache = model.new_cache(2, 40)
    x = torch.randint(0, 256, (2, 9))
    with torch.inference_mode():
        model(x[:, :8], cache=cache)
        seen.clear()
        step = model(x[:, 8:], positions=torch.full((2, 1), 8), cache=cache)
    assert len(seen) == model.config.n_layers
    for layer, (q_shape, k, v) in enumerate(seen):
        assert q_shape == (2, 4, 1, 8) and k.shape == v.shape == (2, 4, 9, 8)
        assert k.data_ptr() == cache.k[layer].data_ptr() and v.data_ptr() == cache.v[layer].data_ptr()
        assert not k.is_contiguous() and k.stride(1) == 40 * 8  # the view of a 40-slot cache, not a copy
    torch.testing.assert_close(step, model(x)[:, 8:], atol=1e-5, rtol=1e-5)


def test_attention_on_a_strided_cache_view_equals_a_contiguous_copy():
    from tuneforge.kernels import flash_attention
    from tuneforge.kernels.reference import attention_reference

    g = torch.Generator().manual_seed(0)
    for heads, kv_heads, tq in ((4, 4, 1), (4, 4, 3), (6, 2, 1), (6, 3, 2)):  # one query or a few; GQA too
        q = torch.randn(2, heads, tq, 16, generator=g)
        cache = torch.randn(2, 2, kv_heads, 50, 16, generator=g)  # (k|v, B, Hkv, Lmax, D)
        k, v = cache[0, :, :, :37], cache[1, :, :, :37]  # filled part: strided views
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[1, :5] = False  # a left-padded row
        assert not k.is_contiguous()
        for kpm in (None, mask):
            got = flash_attention(q, k, v, causal=True, key_padding_mask=kpm)
            want = flash_attention(q, k.contiguous(), v.contiguous(), causal=True, key_padding_mask=kpm)
            truth = attention_reference(q.double(), k.double(), v.double(), causal=True, key_padding_mask=kpm)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
            torch.testing.assert_close(got.double(), truth, atol=1e-5, rtol=0)


def test_a_decode_step_dispatches_no_copy_of_the_cache(model):
    """The ops one cached token costs on the model's side (the kernel's inside is its own): no cat, clone, repeat or
    contiguous of keys/values, and no dropout call in eval mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    cache = model.new_cache(1, 16)
    with torch.inference_mode():
        model(torch.randint(0, 256, (1, 5)), cache=cache)
        with Ops() as ops:
            model(torch.randint(0, 256, (1, 1)), positions=torch.full((1, 1), 5), cache=cache)
    copies = {"cat", "clone", "repeat_interleave", "repeat", "contiguous", "_to_copy", "dropout", "index_select"}
    assert not copies & set(ops.names), sorted(copies & set(ops.names))
    assert ops.names.count("copy_") == 2 * model.config.n_layers  # the new key and value, written in place


def test_eos_rows_stay_finished(model):
    p = torch.randint(0, 256, (4, 5))
    first = model.generate(p, 1, temperature=0)[:, -1]
    out = model.generate(p, 10, temperature=0, eos_id=int(first[0]))
    assert torch.all(out[0, 5:] == first[0])


def test_top_k_one_is_greedy_and_sampling_stays_inside_the_kept_set():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, top_k=1), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    top5 = logits.topk(5).indices
    for _ in range(200):
        s = sample_next(logits, top_k=5, generator=g)
        assert all(int(s[i]) in top5[i].tolist() for i in range(4))
    probs = torch.softmax(logits, -1)
    kept = torch.isfinite(filter_logits(logits, top_p=0.5))
    for i in range(4):  # the nucleus: the smallest set of most likely tokens with mass >= 0.5
        order = probs[i].argsort(descending=True)
        n = int((probs[i][order].cumsum(0) < 0.5).sum()) + 1
        assert set(order[:n].tolist()) == set(kept[i].nonzero().flatten().tolist())
    for _ in range(300):
        s = sample_next(logits, top_p=0.5, generator=g)
        assert kept[torch.arange(4), s].all()
    # top_p <= 0 still keeps the single most likely token, so it is greedy rather than NaN.
    assert torch.equal(sample_next(logits, top_p=0.0, generator=g), logits.argmax(-1))
    both = torch.isfinite(filter_logits(logits, top_k=3, top_p=0.99))
    assert both.sum(-1).le(3).all() and both[torch.arange(4), logits.argmax(-1)].all()


def test_overfits_a_short_string():
    torch.manual_seed(0)
    m = Transformer(model_config(SMALL))
    x = torch.tensor([list(b"the river runs to the sea. " * 2)])[:, :48]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        first = first or float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # From ~ln(259) = 5.6 (uniform over bytes) to memorised: the model, its gradients and init all work.
    assert first > 4.5 and float(loss.detach()) < 0.5
