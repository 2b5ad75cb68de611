"""RLHF on the small task model: GAE by hand, the KL to the reference, the reference staying frozen, the reward
model learning the hidden preference, PPO resuming mid-rollout exactly, and DPO's reference computed once."""
import json
import math

import pytest
import torch

import tuneforge
from tuneforge import ConfigError
from tuneforge.models import routing
from tuneforge.engine.assemble import assemble
from tuneforge.rlhf.policy import Reference
from tuneforge.rlhf.rollout import compare, gae, sample
from tuneforge.models.tokenizer import ByteTokenizer
from tuneforge.data.world import builtin
from conftest import StopAt


def test_gae_matches_a_hand_computed_example():
    # one row: two prompt positions, a three-token response, one padding position (garbage outside the mask)
    rewards = torch.tensor([[7.0, 7.0, 0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[9.0, 9.0, 0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.float32)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # δ4 = 1 - 0.3 = 0.7; A4 = 0.7.  δ3 = 0 + 0.3 - 0.4 = -0.1; A3 = -0.1 + 0.95 * 0.7 = 0.565.
    # δ2 = 0 + 0.4 - 0.5 = -0.1; A2 = -0.1 + 0.95 * 0.565 = 0.43675
    torch.testing.assert_close(adv, torch.tensor([[0, 0, 0.43675, 0.565, 0.7, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[0, 0, 0.93675, 0.965, 1.0, 0]]))
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # δ3 = 0.9 * 0.3 - 0.4 = -0.13; A3 = -0.13 + 0.72 * 0.7 = 0.374; δ2 = 0.9 * 0.4 - 0.5 = -0.14;
    # A2 = -0.14 + 0.72 * 0.374 = 0.12928
    torch.testing.assert_close(adv, torch.tensor([[0, 0, 0.12928, 0.374, 0.7, 0]]))


def test_gae_keeps_rows_apart():
    rewards = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    values = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[2.0, 2.0, 0.0], [1.0, 0.0, 0.0]]))


def _assembled(pretrained, mechanisms, **kw):
    cfg = tuneforge.TrainConfig(init=str(pretrained), mechanisms=mechanisms, data="builtin:rankings", **kw)
    return assemble(cfg)


def _judge(prompts, texts):
    return [float(len(t)) for t in texts]


@pytest.mark.parametrize("mechanisms, shared", [(["lora:rank=4", "dpo"], True), (["dpo"], False),
                                                (["adapter", "dpo"], True)])
def test_the_kl_is_zero_and_the_win_rate_one_half_when_the_policy_is_the_reference(pretrained, mechanisms, shared):
    built = _assembled(pretrained, mechanisms)
    ref = Reference(built.model, built.run)
    assert ref.shared is shared  # LoRA / soft prompts: no copy; the whole model trains: the starting model
    prompts = [r["prompt"] for r in builtin("rankings", "test")[:12]]
    out = compare(built.model.eval(), ref, ByteTokenizer(), prompts, judge=_judge, max_new_tokens=24)
    assert out["kl_per_token"] == 0.0 and out["win_rate"] == 0.5 and out["ties"] == 1.0
    assert out["response_tokens"] > 0


def test_a_soft_prompt_policy_is_referenced_without_its_prompt(pretrained):
    # A new soft prompt is not the identity (it prepends tokens), so such a policy starts a little away from the
    # reference: the same model with the prompt switched off.
    built = _assembled(pretrained, ["prompt-tuning:tokens=4", "dpo"])
    ref = Reference(built.model, built.run)
    assert ref.shared
    ids = torch.randint(0, 256, (2, 10))
    start = tuneforge.load_model(pretrained)
    torch.testing.assert_close(ref(ids), start(ids), rtol=0, atol=0)
    assert not torch.allclose(built.model.eval()(ids), start(ids))


def test_the_kl_is_positive_once_the_policy_moves(pretrained):
    built = _assembled(pretrained, ["lora:rank=4", "dpo"])
    ref = Reference(built.model, built.run)
    with torch.no_grad():
        for p in built.params:
            p.add_(torch.randn_like(p) * 0.3)
    prompts = [r["prompt"] for r in builtin("rankings", "test")[:12]]
    out = compare(built.model.eval(), ref, ByteTokenizer(), prompts, judge=_judge, max_new_tokens=24)
    assert out["kl_per_token"] > 0.0


def test_samples_stop_at_a_newline_or_eos_and_lay_out_prompt_then_response(pretrained):
    model = tuneforge.load_model(pretrained)
    tok = ByteTokenizer()
    prompts = ["describe the lake.", "tell me about the old bakery by the river."]
    s = sample(model.generate, tok, prompts, max_new_tokens=30, generator=torch.Generator().manual_seed(0))
    for i, p in enumerate(prompts):
        row = s.input[i].tolist()
        assert tok.decode(row[:int(s.start[i])]) == p + " " and row[0] == tok.bos_id
        response = row[int(s.start[i]):int(s.last[i]) + 1]
        if bool(s.stopped[i]):
            assert response[-1] in (10, tok.eos_id) and tok.decode(response[:-1]) == s.texts[i]
        else:
            assert len(response) == 30 and tok.decode(response) == s.texts[i]
        assert all(t not in (10, tok.eos_id) for t in response[:-1])
    assert int(s.mask.sum()) == int(s.lengths.sum())


@pytest.fixture(scope="module")
def reward_run(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "run"
    result = tuneforge.train(init=str(pretrained), mechanisms=["reward-model:eval_limit=100"], data="builtin:rankings",
                             steps=100, batch_size=16, lr=5e-3, warmup=5, eval_every=0, out=str(out))
    return out, result


def test_the_reward_model_learns_the_hidden_preference(reward_run):
    _, result = reward_run
    acc = result.metrics["eval/pairwise_accuracy"]
    assert acc > 0.75, acc  # chance is 0.5
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert 0 < result.metrics["eval/tie_prob"] < 1 and "eval/tie_prob_on_ties" in result.metrics


def test_a_saved_reward_model_scores_text(reward_run):
    from tuneforge.sdk import score
    from tuneforge.data.world import preference

    out, _ = reward_run
    rm = tuneforge.load_model(out)
    prompts, responses = [], []
    for r in builtin("rankings", "test")[:40]:
        prompts += [r["prompt"]] * len(r["responses"])
        responses += r["responses"]
    s = score(rm, prompts, responses)
    truth = torch.tensor([preference(p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)
    assert s.shape == (len(prompts),)
    assert torch.corrcoef(torch.stack([s, truth]))[0, 1] > 0.5


def test_ppo_with_lora_keeps_the_reference_frozen_and_resumes_mid_rollout_exactly(reward_run, pretrained, tmp_path):
    rm, _ = reward_run
    ppo = f"ppo:reward={rm},rollouts=8,ppo_epochs=2,max_new_tokens=20,eval_prompts=8"
    common = dict(init=str(pretrained), data="builtin:rankings", steps=6, batch_size=4, lr=1e-2, warmup=1,
                  eval_every=0)
    full = tuneforge.train(mechanisms=["lora:rank=4", ppo], out=str(tmp_path / "full"), **common)
    # 8 responses a rollout in minibatches of 4, two passes: 4 steps a rollout; stop inside the first one
    part = tuneforge.train(mechanisms=["lora:rank=4", ppo, StopAt(2)], out=str(tmp_path / "part"), **common)
    assert part.run.step == 2
    assert (part.checkpoint / "ppo_rollout.safetensors").is_file()
    resumed = tuneforge.train(mechanisms=["lora:rank=4", ppo], out=str(tmp_path / "part"), resume="auto", **common)
    assert resumed.run.step == 6
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    # only the LoRA and the value head moved; the base (the reference) is bit-for-bit the pretrained model
    assert full.summary["frozen_weights"]["unchanged"]
    start = tuneforge.load_model(pretrained)
    ids = torch.randint(0, 256, (2, 16))
    with routing.base():
        torch.testing.assert_close(full.model.eval()(ids), start(ids), rtol=0, atol=0)
    assert not torch.equal(full.model(ids), start(ids))  # the policy itself did move
    for key in ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "eval/win_rate",
                "eval/kl_per_token"):
        assert key in full.metrics and math.isfinite(full.metrics[key]), key
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["objective"] == "ppo"


def test_ppo_adapts_the_kl_coefficient_towards_its_target(reward_run, pretrained):
    rm, _ = reward_run
    result = tuneforge.train(init=str(pretrained), data="builtin:rankings", steps=8, batch_size=4, lr=3e-2, warmup=1,
                             eval_every=0, mechanisms=["lora:rank=4", f"ppo:reward={rm},rollouts=8,ppo_epochs=1,kl_coef=0.05,"
                             "max_new_tokens=16,eval_prompts=4,kl_target=1e-6,kl_horizon=8,judge=none"])
    coefs = [h["kl_coef"] for h in result.history]
    assert coefs[0] == 0.05 and coefs[-1] > coefs[0]  # the measured KL is far above a tiny target: β grows


def test_ppo_needs_a_reward(pretrained):
    with pytest.raises(ConfigError, match="ppo needs a reward: ppo:reward=RUN"):
        tuneforge.train(init=str(pretrained), mechanisms=["ppo"], data="builtin:rankings", steps=1)
    with pytest.raises(ConfigError, match=r"longest prompt \(\d+ tokens\) \+ max_new_tokens=250 exceed"):
        tuneforge.train(init=str(pretrained), mechanisms=[f"ppo:reward={pretrained},rollouts=8,max_new_tokens=250"],
                        data="builtin:rankings", steps=1, batch_size=8)
    with pytest.raises(ConfigError, match="not a reward model"):
        tuneforge.train(init=str(pretrained), mechanisms=[f"ppo:reward={pretrained},rollouts=8"],
                        data="builtin:rankings", steps=1, batch_size=8)


def _rankings_file(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_dpo_scores_each_reference_response_once_as_needed_and_keeps_the_reference_frozen(pretrained, tmp_path,
                                                                                           monkeypatch):
    train_file = _rankings_file(tmp_path / "train.jsonl", builtin("rankings")[:70])
    eval_file = _rankings_file(tmp_path / "eval.jsonl", builtin("rankings", "test")[:20])
    calls = []  # rows of each reference call, in order
    original = Reference.logprobs
    monkeypatch.setattr(Reference, "logprobs", lambda self, ids, *a, **k: calls.append(ids.size(0))
                        or original(self, ids, *a, **k))

    def run(steps, out, **kw):
        calls.clear()
        result = tuneforge.train(init=str(pretrained), mechanisms=["dpo:judge=none,beta=0.5"], data=train_file,
                                 eval_data=eval_file, steps=steps, batch_size=8, lr=3e-3, warmup=1, eval_every=0,
                                 out=str(out), **kw)
        return result, list(calls)

    def scored(result):  # responses whose reference log-probability is cached
        return int((~result.run.plugins["dpo"].ref_logp.isnan()).sum())

    short, c_short = run(2, tmp_path / "a")
    # the first step needs only its own batch: two training batches scored, then one pass for the held-out evaluation
    assert len(c_short) == 3 and sum(c_short[:2]) == scored(short)
    assert scored(short) < sum(len(r.responses) for r in short.run.plugins["dpo"].train) / 2  # not all up front
    long, c_long = run(12, tmp_path / "b")
    # 12 batches of 8 rankings cover more than the 70 once: every response is scored once, none twice
    assert sum(c_long[:-1]) == scored(long) <= sum(len(r.responses) for r in long.run.plugins["dpo"].train)
    assert len(c_long) - 1 < 12  # later batches found their responses in the cache
    assert long.metrics["loss"] < math.log(2)  # moved away from the reference's log 2
    # every base weight trained, so the reference is a copy of the starting model, and it stayed that
    plugin = long.run.plugins["dpo"]
    assert not plugin.reference.shared
    start = dict(tuneforge.load_model(pretrained).named_parameters())
    for name, p in plugin.reference.model.named_parameters():
        assert torch.equal(p, start[name]) and not p.requires_grad, name
    assert not torch.equal(dict(long.model.named_parameters())["blocks.0.attn.q.weight"], start["blocks.0.attn.q.weight"])
    # a resumed run reads the cache from its checkpoint: it scores only responses the checkpoint had not
    more, c_more = run(14, tmp_path / "b", resume="auto")
    assert more.run.step == 14 and sum(c_more[:-1]) == scored(more) - scored(long)


def test_auto_judges_by_the_hidden_preference_where_the_data_has_one():
    from tuneforge.data.world import hidden_judge, judge_of, preference
    from tuneforge.rlhf.rollout import judge_for

    reward = lambda prompts, texts: [0.0] * len(texts)  # noqa: E731
    assert judge_of("builtin:rankings") is hidden_judge
    assert judge_of("builtin:text") is None and judge_of("rankings.jsonl") is None
    assert judge_for("auto", "builtin:rankings", reward) is hidden_judge
    assert judge_for("auto", "rankings.jsonl", reward) is reward and judge_for("auto", "rankings.jsonl") is None
    assert judge_for("world", "rankings.jsonl") is hidden_judge
    prompt, text = builtin("rankings", "test")[0]["prompt"], "a nice calm answer"
    assert hidden_judge([prompt], [text]) == [float(preference(prompt, text))]
