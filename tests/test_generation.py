"""`Transformer.generate` with several stop tokens, padding after a stop, early stopping, the KV cache against
recomputing the prefix, and the generation benchmark (with its decode-attention rows) run as a user runs it (timings
are never asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.models.transformer import Transformer, model_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = "tiny:n_layers=2,d_model=32,n_heads=4,max_seq_len=64"
PAD = 258


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(model_config(SMALL)).eval()


def left_padded(lengths, seed=0):
    """(B, T) random prompts of the given lengths, left-padded with PAD, and their (B, T) mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(0, 256, (n,), generator=g)
        mask[i, T - n:] = True
    return ids, mask


def sample(model, ids, n, **kw):
    """Sampled at temperature 1 from a fresh seeded generator: every call draws the same random numbers."""
    return model.generate(ids, n, temperature=1.0, generator=torch.Generator().manual_seed(7), **kw)


def expected_with_stops(free, T, stops, pad=None):
    """What ``generate`` must return given the unstopped continuation ``free`` (B, T + n): each row is cut
    after its first stop token, then filled with ``pad`` (or that stop token), and the whole output ends once
    every row has stopped."""
    rows, ends = [], []
    for row in free:
        new = row[T:].tolist()
        j = next((i for i, t in enumerate(new) if t in stops), None)
        if j is not None:
            new = new[:j + 1] + [new[j] if pad is None else pad] * (len(new) - j - 1)
        ends.append(len(new) if j is None else j + 1)
        rows.append(row[:T].tolist() + new)
    out = torch.tensor(rows)
    return out[:, :T + max(ends)], ends


def pick_stops(free, T, steps):
    """Stop ids taken from the unstopped continuation: row i's token at step steps[i]."""
    return [int(free[i, T + s]) for i, s in enumerate(steps)]


def test_each_row_stops_at_whichever_stop_id_comes_first_then_pads(model):
    ids, mask = left_padded([5, 9, 7])
    T, n = ids.size(1), 20
    free = sample(model, ids, n, key_padding_mask=mask)
    stops = pick_stops(free, T, [6, 2, 4])  # row 1 stops first; the list order is not the stopping order
    want, ends = expected_with_stops(free, T, stops, pad=PAD)
    assert len(set(ends)) > 1 and max(ends) < n  # rows stop at different steps, and all before the end
    got = sample(model, ids, n, key_padding_mask=mask, eos_id=stops, pad_id=PAD)
    assert torch.equal(got, want)
    assert got.shape == (3, T + max(ends))  # stopped early: once the last row was done
    for i, e in enumerate(ends):
        assert int(got[i, T + e - 1]) in stops and torch.all(got[i, T + e:] == PAD)


def test_without_pad_id_a_done_row_repeats_the_stop_token_it_produced(model):
    ids, mask = left_padded([4, 8, 6], seed=1)
    T, n = ids.size(1), 20
    free = sample(model, ids, n, key_padding_mask=mask)
    stops = pick_stops(free, T, [1, 3, 5])
    want, ends = expected_with_stops(free, T, stops)
    got = sample(model, ids, n, key_padding_mask=mask, eos_id=tuple(stops))
    assert torch.equal(got, want)
    produced = {int(got[i, T + e - 1]) for i, e in enumerate(ends)}
    assert len(produced) > 1  # rows stopped on different ids, and each repeats its own
    for i, e in enumerate(ends):
        assert torch.all(got[i, T + e - 1:] == got[i, T + e - 1])


def test_generation_runs_to_the_end_while_a_row_is_still_going(model):
    ids, mask = left_padded([3, 6], seed=2)
    T, n = ids.size(1), 15
    free = sample(model, ids, n, key_padding_mask=mask)
    row0 = set(free[0, T:].tolist())
    never = next(t for t in range(256) if t not in row0 and t not in free[1, T:].tolist())
    stop = int(free[1, T + 2])
    got = sample(model, ids, n, key_padding_mask=mask, eos_id=[never, stop] if stop not in row0 else [never],
                 pad_id=PAD)
    assert got.shape == (2, T + n)  # row 0 never stops, so nothing ends early
    assert torch.equal(got[0], free[0])
    # No stop id ever produced, or none given: the same as no eos_id at all.
    assert torch.equal(sample(model, ids, n, key_padding_mask=mask, eos_id=[never]), free)
    assert torch.equal(sample(model, ids, n, key_padding_mask=mask, eos_id=[], pad_id=PAD), free)


def test_single_int_eos_keeps_producing_eos_and_pad_id_replaces_it(model):
    ids, mask = left_padded([6, 6, 6], seed=3)
    T, n = ids.size(1), 12
    free = sample(model, ids, n, key_padding_mask=mask)
    eos = int(free[0, T + 1])
    kept = sample(model, ids, n, key_padding_mask=mask, eos_id=eos)
    assert torch.all(kept[0, T + 1:] == eos)
    assert torch.equal(kept, expected_with_stops(free, T, [eos])[0])
    padded = sample(model, ids, n, key_padding_mask=mask, eos_id=torch.tensor(eos), pad_id=PAD)
    assert int(padded[0, T + 1]) == eos and torch.all(padded[0, T + 2:] == PAD)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_k=30)])
def test_cache_equals_recompute_with_several_stop_ids_and_left_padding(model, kw):
    ids, mask = left_padded([2, 11, 7, 5], seed=4)
    T, n = ids.size(1), 30
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    free = model.generate(ids, n, key_padding_mask=mask, generator=g(), **kw)
    stops = pick_stops(free, T, [9, 3, 20, 14])
    for pad in (PAD, None):
        a = model.generate(ids, n, key_padding_mask=mask, generator=g(), eos_id=stops, pad_id=pad, **kw)
        b = model.generate(ids, n, key_padding_mask=mask, generator=g(), eos_id=stops, pad_id=pad, use_cache=False,
                           **kw)
        assert torch.equal(a, b)
        assert torch.equal(a, expected_with_stops(free, T, stops, pad)[0])


def test_output_is_an_ordinary_tensor_a_loss_can_use(model):
    # generate decodes in inference mode; what it returns must still feed a training forward (PPO, DPO).
    ids, mask = left_padded([3, 6], seed=5)
    for kw in (dict(), dict(eos_id=[int(sample(model, ids, 2, key_padding_mask=mask)[0, -1])], pad_id=PAD)):
        out = sample(model, ids, 8, key_padding_mask=mask, **kw)
        assert not out.is_inference() and out.dtype == torch.long
        model(out).logsumexp(-1).mean().backward()
        assert model.tok_emb.weight.grad is not None
        model.zero_grad()


def test_bad_eos_id_is_a_clear_error(model):
    with pytest.raises(ValueError, match="eos_id must be a token id"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, eos_id="\n")
    with pytest.raises(ValueError, match="at least one prompt token"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 2)


def test_decoding_runs_without_onednn_and_restores_it(model):
    """The cached decode loop turns oneDNN off (its GELU opens a parallel region per call, see
    generation._without_onednn) and puts it back afterwards, also when the loop raises; recomputing keeps it."""
    seen = []
    hook = model.blocks[0].mlp.register_forward_pre_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    try:
        sample(model, torch.zeros(1, 3, dtype=torch.long), 4)
        assert seen == [False] * 4 and torch.backends.mkldnn.enabled
        sample(model, torch.zeros(1, 3, dtype=torch.long), 4, use_cache=False)  # whole prefixes: oneDNN's GELU
        assert seen[4:] == [True] * 4
        boom = model.blocks[1].register_forward_pre_hook(lambda *_: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            sample(model, torch.zeros(1, 3, dtype=torch.long), 4)
        boom.remove()
        assert torch.backends.mkldnn.enabled
    finally:
        hook.remove()


def test_generation_benchmark_quick_tokens_match():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "tokens matched" in proc.stdout and "DID NOT MATCH" not in proc.stdout
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "generation" and len(report["results"]) == 2  # the --batch and batch 1
    for r in report["results"]:
        assert r["tokens_match"] is True and r["new_tokens"] == 16
        assert r["cache_tok_s"] > 0 and r["recompute_tok_s"] > 0
        assert 0 < r["ops_per_cached_step"] < 100  # 2 layers: a few dozen, whatever the lead's kernel adds
    rows = report["decode_attention"]
    assert [(r["heads"], r["head_dim"]) for r in rows] == [(8, 64), (4, 32)]
    for r in rows:  # one query over a strided cache view: the same attention as SDPA's
        assert r["strided"] and r["max_abs_diff_vs_sdpa"] < 1e-4 and r["tuneforge_us"] > 0 and r["sdpa_us"] > 0
