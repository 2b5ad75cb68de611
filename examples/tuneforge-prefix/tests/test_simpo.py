"""SimPO: the loss and its length-normalised reward, learning from rankings alone and beside a prefix, on the
embedded model and a Hugging Face Llama."""
import math

import pytest
import torch
import torch.nn.functional as F

import tuneforge
from tuneforge.sdk import ConfigError, ranking_batch, read_rankings, tokenizer_of
from tuneforge.sdk.testing import check_plugin, tiny_dataset, tiny_model

from tuneforge_prefix import SimPO, average_logprobs, simpo_loss

EVAL = "eval_prompts=8,max_new_tokens=16"  # a short win-rate evaluation: a few prompts, short samples


def test_hooks_match_the_contract():
    hooks = check_plugin(SimPO, "simpo")
    assert {"tuneforge_modify_model", "tuneforge_trainable_params", "tuneforge_data", "tuneforge_loss",
            "tuneforge_evaluate"} <= set(hooks)


def test_the_loss_of_a_pair_by_hand():
    """β = 2, γ = 1: average log-probabilities -1 (chosen) and -2 (rejected) give a reward margin of 2, one past the
    target, so the loss is -log σ(1); a pair the wrong way round costs -log σ(-3)."""
    loss, margin = simpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), beta=2.0, gamma=1.0)
    assert margin.tolist() == [2.0, -2.0]
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.exp(3))]))


def test_the_reward_is_the_average_log_probability_of_the_response(tmp_path):
    """Against log-softmax over the logits, token by token: the response's tokens only (its eos included), divided
    by their number, so a longer response is not rewarded for its length."""
    model = tiny_model()
    records = read_rankings(str(tiny_dataset(tmp_path, "rankings", n=3)))
    batch = ranking_batch(records, tokenizer_of(model), model.config.max_seq_len)
    with torch.no_grad():
        got = average_logprobs(model, batch)
        logp = F.log_softmax(model(batch["input"]).float(), -1)  # (N, T, V)
    for row in range(batch["input"].size(0)):
        ids, start, last = batch["input"][row], int(batch["start"][row]), int(batch["last"][row])
        tokens = [float(logp[row, t - 1, ids[t]]) for t in range(start, last + 1)]
        assert got[row].item() == pytest.approx(sum(tokens) / len(tokens), abs=1e-5)


def test_the_likelihood_term_adds_the_chosen_responses_nll(tmp_path):
    """nll=α adds α times each pair's chosen response's mean negative log-likelihood, pair-weighted like the rest."""
    model = tiny_model()
    records = read_rankings(str(tiny_dataset(tmp_path, "rankings", n=3)))
    batch = ranking_batch(records, tokenizer_of(model), model.config.max_seq_len, with_ties=False)
    with torch.no_grad():
        plain, _ = SimPO(SimPO.Options(nll=0)).tuneforge_loss(model, batch)
        with_nll, _ = SimPO(SimPO.Options(nll=0.5)).tuneforge_loss(model, batch)
        chosen = average_logprobs(model, batch)[batch["better"]]
    torch.testing.assert_close(with_nll - plain, -0.5 * (chosen * batch["weight"]).sum())
    assert float(with_nll - plain) > 0


def test_alone_it_trains_every_weight_and_the_held_out_pairs_come_right(well_pretrained, train_tiny):
    result = train_tiny(f"simpo:{EVAL}", init=str(well_pretrained), data="builtin:rankings", steps=30, lr=3e-3,
                        out=None)
    s = result.summary
    assert s["objective"] == "simpo" and s["trainable_params"] == s["total_params"]
    with torch.no_grad():
        before = result.run.plugins["simpo"].tuneforge_evaluate(tuneforge.load_model(well_pretrained), result.run)
    after = result.metrics
    assert after["eval/pair_accuracy"] > before["pair_accuracy"] + 0.08, (before, after)
    assert {"eval/win_rate", "eval/kl_per_token"} <= after.keys() and after["eval/kl_per_token"] > 0


def test_beside_a_prefix_only_the_prefix_trains_and_the_reference_needs_no_copy(well_pretrained, train_tiny,
                                                                                tmp_path):
    result = train_tiny("prefix:tokens=4", f"simpo:{EVAL}", init=str(well_pretrained), data="builtin:rankings",
                        steps=3, lr=0.05, out=tmp_path / "run")
    s = result.summary
    assert s["objective"] == "simpo" and s["trainable_by_plugin"]["prefix"] == s["trainable_params"] > 0
    assert s["frozen_weights"]["unchanged"]
    assert result.run.plugins["simpo"].start.shared  # the start is the policy with its prefix switched off
    assert (result.checkpoint / "prefixes" / "default").is_dir()
    x = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tuneforge.load_model(tmp_path / "run")(x), result.model.eval()(x), rtol=0, atol=0)


def test_on_a_hugging_face_llama(hf_llama, train_tiny):
    result = train_tiny("prefix:tokens=2", f"simpo:{EVAL}", model=f"hf:{hf_llama}", data="builtin:rankings",
                        steps=2, batch_size=2, lr=0.05, out=None)
    assert result.summary["frozen_weights"]["unchanged"] and math.isfinite(result.history[-1]["loss"])
    assert 0 <= result.metrics["eval/pair_accuracy"] <= 1 and "eval/win_rate" in result.metrics


def test_options_are_checked(train_tiny, well_pretrained, tmp_path):
    with pytest.raises(ConfigError, match="gamma"):
        train_tiny("simpo:gamma=-1", init=str(well_pretrained), data="builtin:rankings", out=None)
    few = tiny_dataset(tmp_path, "rankings", n=3)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train_tiny("simpo", init=str(well_pretrained), data=str(few), out=None)
