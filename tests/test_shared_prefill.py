"""Rollouts that encode a prompt once (issue 22): ``generate(num_samples=G)`` runs each prompt through the model once
and copies its KV-cache rows and last logits to its G samples. It must give exactly the rows that generating the
prompts repeated G times gives (greedy, and sampled from the same seeded generator), on the embedded model and on
Hugging Face models (static and dynamic caches), with left padding, soft-prompt prefixes routed per row, and stop
tokens; ``rollout.sample(per_prompt=G)`` lays the samples out prompt-major. Timings: benchmarks/shared_prefill.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.models import routing
from tuneforge.models.tokenizer import ByteTokenizer
from tuneforge.models.transformer import Transformer, model_config
from tuneforge.plugins.prompt_tuning import SoftPrompts
from tuneforge.rlhf.rollout import continue_ids, sample

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = "tiny:n_layers=2,d_model=32,n_heads=4,max_seq_len=64"
G = 3
KINDS = ["embedded", "llama", "llama-eager", "gpt2"]  # llama: static cache (tuneforge attention); eager: dynamic


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    pytest.importorskip("transformers")
    from tuneforge.tools.hf_tiny import make_tiny

    root = tmp_path_factory.mktemp("hf")
    return {f: make_tiny(root / f, f, d_model=32, n_layers=2, n_heads=4, context=64, vocab_size=300)
            for f in ("llama", "gpt2")}


@pytest.fixture
def build(request):
    def make(kind):
        if kind == "embedded":
            torch.manual_seed(0)
            return Transformer(model_config(EMBEDDED)).eval()
        from tuneforge.models import hf
        family, _, attn = kind.partition("-")
        return hf.load(request.getfixturevalue("hf_folders")[family], attn=attn or "tuneforge")
    return make


def prompts(model, lengths=(5, 9, 2), seed=0):
    """(B, T) random prompts of the given lengths, left-padded, and their (B, T) mask (True = real)."""
    g = torch.Generator().manual_seed(seed)
    T, pad = max(lengths), model.config.vocab_size - 1
    ids = torch.full((len(lengths), T), pad)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, model.config.vocab_size - 1, (n,), generator=g)
        mask[i, T - n:] = True
    return ids, mask


def shared_and_repeated(model, ids, mask, new, *, seed=7, **kw):
    """The same call with a shared prefill and on the prompts repeated G times, each from a fresh seeded generator."""
    shared = model.generate(ids, new, key_padding_mask=mask, num_samples=G,
                            generator=torch.Generator().manual_seed(seed), **kw)
    repeated = model.generate(ids.repeat_interleave(G, 0), new, key_padding_mask=mask.repeat_interleave(G, 0),
                              generator=torch.Generator().manual_seed(seed), **kw)
    return shared, repeated


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_shared_prefill_equals_the_repeated_prompts_with_padding_and_stop_tokens(build, kind):
    model = build(kind)
    ids, mask = prompts(model)
    shared, repeated = shared_and_repeated(model, ids, mask, 12, temperature=0.0)
    assert shared.shape == (ids.size(0) * G, ids.size(1) + 12) and torch.equal(shared, repeated)
    assert torch.equal(shared[::G, :ids.size(1)], ids)  # prompt-major: rows i*G .. i*G+G-1 answer prompt i
    # stop tokens that really stop some rows: tokens these rows write early on
    stops = [int(repeated[0, ids.size(1) + 2]), int(repeated[G, ids.size(1) + 1])]
    pad = model.config.vocab_size - 1
    shared, repeated = shared_and_repeated(model, ids, mask, 12, temperature=0.0, eos_id=stops, pad_id=pad)
    assert torch.equal(shared, repeated)
    assert (shared[:, ids.size(1):] == pad).any()  # finished rows were padded
    # without a cache the prompts are simply repeated: the same tokens again
    fresh = model.generate(ids, 12, temperature=0.0, key_padding_mask=mask, num_samples=G, eos_id=stops, pad_id=pad,
                           use_cache=False)
    assert torch.equal(fresh, shared)


@pytest.mark.parametrize("kind", ["embedded", "llama"])
def test_sampled_shared_prefill_draws_what_the_repeated_prompts_draw(build, kind):
    model = build(kind)
    ids, mask = prompts(model)
    streamed = []
    shared, repeated = shared_and_repeated(model, ids, mask, 10, temperature=1.0, top_k=50,
                                           on_token=streamed.append)
    # the same random numbers for the same logits: the same tokens, so the same distribution
    assert torch.equal(shared, repeated)
    assert len(streamed) == 2 * 10 and streamed[0].shape == (ids.size(0) * G,)  # each step's tokens, both calls
    assert torch.equal(torch.stack(streamed[:10], 1), shared[:, ids.size(1):])
    for i in range(ids.size(0)):  # the G samples of a prompt are samples, not copies
        group = shared[i * G:(i + 1) * G, ids.size(1):]
        assert len({tuple(r.tolist()) for r in group}) > 1


def test_first_tokens_of_shared_samples_follow_the_model_distribution():
    torch.manual_seed(0)
    model = Transformer(model_config(EMBEDDED)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # a peaked next-token distribution (tied: the embedding too)
    ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(3))
    n = 3000
    out = model.generate(ids, 1, temperature=1.0, num_samples=n, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.softmax(model(ids)[0, -1], -1)  # (V,) what the first token is drawn from
    top = torch.topk(p, 3).indices
    assert float(p[top].sum()) > 0.3  # a distribution with mass where a frequency can be checked
    counts = torch.bincount(out[:, -1], minlength=p.numel()).float()
    for t in top:  # each frequency within 5 standard deviations of n * p
        expected, sd = n * float(p[t]), (n * float(p[t]) * (1 - float(p[t]))) ** 0.5
        assert abs(float(counts[t]) - expected) < 5 * sd + 1, (int(t), float(counts[t]), expected)


@pytest.mark.parametrize("kind", ["embedded", "llama", "llama-eager"])
def test_repeated_cache_rows_give_the_logits_of_the_repeated_prompts(build, kind):
    model = build(kind)
    ids, mask = prompts(model, lengths=(4, 7))
    B, T = ids.shape
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    one, many = model.new_cache(B, T + 4), model.new_cache(B * G, T + 4)
    steps = torch.randint(3, 200, (B * G, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, key_padding_mask=mask, positions=pos, cache=one)
        assert one.repeat_rows(G) is one and one.length == T
        model(ids.repeat_interleave(G, 0), key_padding_mask=mask.repeat_interleave(G, 0),
              positions=pos.repeat_interleave(G, 0), cache=many)
        m, p = mask.repeat_interleave(G, 0), pos[:, -1:].repeat_interleave(G, 0)
        for s in range(3):
            m = torch.cat([m, torch.ones(B * G, 1, dtype=torch.bool)], 1)
            kw = dict(key_padding_mask=m, positions=p + 1 + s)
            a = model(steps[:, s:s + 1], cache=one, **kw)
            b = model(steps[:, s:s + 1], cache=many, **kw)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert a[0].sub(a[G]).abs().max() > 1e-4  # different prompts: different logits (the check can fail)


@pytest.mark.parametrize("kind", ["embedded", "llama"])
def test_soft_prompt_prefixes_routed_per_prompt_are_shared_with_the_samples(build, kind):
    model = build(kind)
    sp = SoftPrompts(model.config.d_model)
    g = torch.Generator().manual_seed(0)
    sp.add("a", torch.randn(3, model.config.d_model, generator=g))
    sp.add("b", torch.randn(5, model.config.d_model, generator=g))  # prompts of different lengths: a prefix mask
    model.prefix = sp
    ids, mask = prompts(model, lengths=(5, 8))
    with routing.rows(["a"] * G + ["b"] * G):  # the output rows' tasks
        greedy = shared_and_repeated(model, ids, mask, 8, temperature=0.0)
        sampled = shared_and_repeated(model, ids, mask, 8, temperature=1.0)
    assert torch.equal(*greedy) and torch.equal(*sampled)
    with routing.rows(["a"] * G + ["b"] * G):
        plain = model.generate(ids, 8, temperature=0.0, key_padding_mask=mask, num_samples=G, use_cache=False)
    assert torch.equal(plain, greedy[0])
    with routing.rows(["b"] * G * 2):  # the prefix changes what is generated: it is really there
        other = model.generate(ids, 8, temperature=0.0, key_padding_mask=mask, num_samples=G)
    assert not torch.equal(other, greedy[0])
    with routing.rows(["a", "b", "a"] + ["b"] * G), pytest.raises(ValueError, match="samples of prompt 0"):
        model.generate(ids, 4, key_padding_mask=mask, num_samples=G)


def test_rollout_sample_per_prompt_is_prompt_major_for_text_and_chat_prompts():
    torch.manual_seed(0)
    model = Transformer(model_config("tiny:n_layers=2,d_model=32,n_heads=4,max_seq_len=128")).eval()
    tok = ByteTokenizer()
    asked = ["the river", [{"role": "user", "content": "hi?"}], "a note"]
    kw = dict(max_new_tokens=10, temperature=1.0)
    s = sample(model.generate, tok, asked, per_prompt=G, generator=torch.Generator().manual_seed(0), **kw)
    repeated = [p for p in asked for _ in range(G)]
    assert s.prompts == repeated and len(s.texts) == 3 * G and s.input.size(0) == 3 * G
    # the same rows as one sample each of the repeated prompts, drawn from the same seed (text and chat are
    # generated apart both ways, in the same order)
    alone = sample(model.generate, tok, repeated, generator=torch.Generator().manual_seed(0), **kw)
    assert s.texts == alone.texts and torch.equal(s.input, alone.input) and torch.equal(s.start, alone.start)
    assert len(set(s.texts[:G])) > 1  # samples, not copies


def test_counts_are_checked():
    torch.manual_seed(0)
    model = Transformer(model_config(EMBEDDED)).eval()
    ids = torch.ones(2, 3, dtype=torch.long)
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="num_samples"):
            model.generate(ids, 2, num_samples=bad)
    assert model.generate(ids, 0, num_samples=4).shape == (8, 3)  # nothing new: the prompts repeated
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="per_prompt"):
        continue_ids(model.generate, tok, [[1, 2]], [0], max_new_tokens=2, per_prompt=0)

    def ignores(idx, n, **kw):  # a generate callable that drops num_samples: one row per prompt
        return model.generate(idx, n, **{k: v for k, v in kw.items() if k != "num_samples"})

    with pytest.raises(ValueError, match="must take num_samples"):
        continue_ids(ignores, tok, [[1, 2]], [0], max_new_tokens=2, per_prompt=2)


def test_benchmark_quick_compares_the_same_rollouts_shared_and_per_sample():
    """The benchmark as a user runs it (a real subprocess, --quick sizes); timings are never asserted."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shared_prefill.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tokens_match"] and report["rows_equal"] == 1.0  # the two sides drew the same rollouts
    shared, per_sample = report["sides"]["shared"], report["sides"]["per_sample"]
    B, G, T, N = report["prompts"], report["samples"], report["prompt_len"], report["new_tokens"]
    assert report["rows"] == B * G and shared["tokens_through_model"] == B * T + B * G * (N - 1)
    assert per_sample["tokens_through_model"] == B * G * (T + N - 1)
    for side in (shared, per_sample):
        assert side["rollout_tokens_per_s"] > 0 and 0 < side["fraction_of_peak"]
    assert report["ratio"] > 0 and report["bound"]["ratio_by_flops"] == pytest.approx((G * T + G * (N - 1)) / (
        T + G * (N - 1)))
    assert report["sgemm_peak_gflops"] > 0 and report["machine"]
