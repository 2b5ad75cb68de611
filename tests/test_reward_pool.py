"""The reward model's pooling (``reward-model:pool=last|sum|mean``): each mode against its definition computed by
hand from the hidden states, padding and other rows changing nothing, scoring laying a row out as training does
(the prompt cut, never the response), and a saved head keeping its mode."""
import pytest
import torch

import tuneforge
from tuneforge import ConfigError
from tuneforge.data.rankings import Ranking, fitted_ranking_ids, ranking_batch
from tuneforge.data.world import builtin
from tuneforge.models.tokenizer import tokenizer_of
from tuneforge.plugins.reward_model import RewardModel
from tuneforge.rlhf.reward import REWARD_POOLS, ScalarHead, rewards, score
from conftest import task_model


def _rankings(n=3):
    return [Ranking(r["prompt"], r["responses"], [[i] for i in range(len(r["responses"]))])
            for r in builtin("rankings", "test")[:n]]


@pytest.mark.parametrize("pool", REWARD_POOLS)
def test_each_pool_is_its_definition_over_the_response_tokens(pool):
    torch.manual_seed(0)
    model = task_model()
    model.lm_head = ScalarHead(model.config.d_model, "davidson", pool)
    torch.nn.init.normal_(model.lm_head.proj.weight)  # (1, C): scores far from zero, so a wrong span shows
    batch = ranking_batch(_rankings(), tokenizer_of(model), model.config.max_seq_len)
    got = rewards(model, batch["input"], batch["last"], batch["start"])  # (N,)
    with torch.no_grad():
        per_token = model.lm_head(model.forward_hidden(batch["input"])).squeeze(-1)  # (N, T)
    for i in range(batch["input"].size(0)):
        start, last = int(batch["start"][i]), int(batch["last"][i])
        span = per_token[i, start:last + 1]  # the response, its eos included
        want = {"last": span[-1], "sum": span.sum(), "mean": span.mean()}[pool]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    assert got.requires_grad
    if pool == "last":  # what a caller written before pooling passes: the same scores
        torch.testing.assert_close(rewards(model, batch["input"], batch["last"]), got)
    else:
        with pytest.raises(ValueError, match="pass start"):
            rewards(model, batch["input"], batch["last"])


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_a_pooled_score_ignores_padding_and_the_other_rows(pool):
    torch.manual_seed(1)
    model = task_model()
    model.lm_head = ScalarHead(model.config.d_model, "davidson", pool)
    torch.nn.init.normal_(model.lm_head.proj.weight)
    tok, records = tokenizer_of(model), _rankings()
    together = ranking_batch(records, tok, model.config.max_seq_len)
    padded = rewards(model, together["input"], together["last"], together["start"])
    alone = torch.cat([rewards(model, b["input"], b["last"], b["start"])
                       for b in (ranking_batch([r], tok, model.config.max_seq_len) for r in records)])
    assert together["input"].size(1) > int(together["last"].min()) + 1  # some row is padded
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    assert padded.unique().numel() == padded.numel()  # distinct responses score apart


def test_score_lays_out_a_row_as_training_does_and_a_cut_prompt_keeps_its_response():
    torch.manual_seed(2)
    model = task_model().eval()
    model.lm_head = ScalarHead(model.config.d_model, "davidson", "sum")
    torch.nn.init.normal_(model.lm_head.proj.weight)
    tok, context = tokenizer_of(model), model.config.max_seq_len
    long_prompt = "tell me about the river and " * 20 + "the bridge."
    records = _rankings(2) + [Ranking(long_prompt, ["the bridge is calm.", "the river is rude."], [[0], [1]])]
    batch = ranking_batch(records, tok, context)
    trained = rewards(model, batch["input"], batch["last"], batch["start"])
    prompts = [r.prompt for r in records for _ in r.responses]
    responses = [x for r in records for x in r.responses]
    torch.testing.assert_close(score(model, prompts, responses), trained.detach(), rtol=1e-5, atol=1e-5)
    ids, start = fitted_ranking_ids(tok, long_prompt, "the bridge is calm.", context)
    assert len(ids) == context  # the prompt lost its beginning...
    assert tok.decode(ids[start:]).startswith("the bridge is calm.")  # ...the response kept all of itself


def test_a_saved_reward_model_keeps_its_pool_and_a_bad_pool_is_refused(pretrained, tmp_path):
    out = tmp_path / "rm"
    result = tuneforge.train(init=str(pretrained), mechanisms=["reward-model:pool=sum,eval_limit=20"],
                             data="builtin:rankings", steps=20, batch_size=8, lr=5e-3, warmup=2, eval_every=0,
                             out=str(out))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    rm = tuneforge.load_model(out)
    assert (rm.lm_head.ties, rm.lm_head.pool) == ("davidson", "sum")
    r = builtin("rankings", "test")[0]
    rows = [fitted_ranking_ids(tokenizer_of(rm), r["prompt"], x, rm.config.max_seq_len) for x in r["responses"]]
    by_hand = []
    with torch.no_grad():
        for ids, start in rows:
            per_token = rm.lm_head(rm.forward_hidden(torch.tensor([ids]))).squeeze(-1)[0]  # (T,)
            by_hand.append(per_token[start:].sum())
    torch.testing.assert_close(score(rm, [r["prompt"]] * len(rows), r["responses"]), torch.stack(by_hand),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises((ConfigError, ValueError), match="pool must be one of last, sum, mean"):
        RewardModel.Options(pool="max")
    with pytest.raises(ValueError, match="pool must be one of"):
        ScalarHead(8, "davidson", "first")
