"""GRPO and rewards as plugins: group advantages by hand, a program reward a policy learns to please, rewards
summed across plugins and refused when malformed, exact resume mid-rollout, and the world's fluency measure."""
import json
import math
import textwrap

import pytest
import torch

import tuneforge
from tuneforge import ConfigError, PluginError, hookimpl
from tuneforge.data.world import builtin, in_vocabulary, vocabulary
from tuneforge.plugins.grpo import group_advantages
from tuneforge.rlhf.rollout import Samples, whole_words
from conftest import StopAt

# rollouts of 4 prompts x 4 samples, minibatches of 8: two steps a rollout
GRPO = "grpo:rollouts=4,samples=4,max_new_tokens=12,eval_prompts=4,judge=none"
COMMON = dict(data="builtin:rankings", batch_size=8, lr=1e-2, warmup=1, eval_every=0)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A verifier in a real module file, importable as ``verifier:...`` from the working directory."""
    (tmp_path / "verifier.py").write_text(textwrap.dedent('''
        def e_count(prompts, responses):
            """How many letters e a response writes: a reward a byte-level policy can learn in a few steps."""
            return [float(r.count("e")) for r in responses]

        def half_e(prompts, responses):
            return [0.5 * r.count("e") for r in responses]

        def one_short(prompts, responses):
            return [1.0] * (len(responses) - 1)

        def not_a_number(prompts, responses):
            return [float("nan")] * len(responses)
    '''))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "verifier"


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv = group_advantages(r, scale="group", eps=0.0 + 1e-12)
    torch.testing.assert_close(adv[0], torch.tensor([-1.0, 0.0, 1.0]))  # mean 2, std 1
    assert torch.equal(adv[1], torch.zeros(3))  # a flat group teaches nothing
    torch.testing.assert_close(group_advantages(r, scale="none")[0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(group_advantages(r * 10, scale="none")[0], torch.tensor([-10.0, 0.0, 10.0]))


def test_grpo_learns_a_program_reward(pretrained, reward_module):
    # the whole policy trains (the 30-step fixture gives a LoRA too little gradient to move in a few steps)
    result = tuneforge.train(init=str(pretrained), mechanisms=[f"{GRPO},reward={reward_module}:e_count"],
                             steps=24, **COMMON)
    rewards = [h["reward"] for h in result.history]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > 3 * first + 1, (first, last)  # many more e's than the starting policy wrote (~0.4 a response)
    for key in ("reward/e_count", "reward_std", "flat_groups", "kl", "kl_k3", "policy_loss", "clipfrac",
                "in_vocabulary"):
        assert key in result.metrics and math.isfinite(result.metrics[key]), key
    assert result.summary["objective"] == "grpo"


class Brevity:
    """A reward plugin: minus the response's length in bytes, scaled."""

    name = "brevity"

    def __init__(self, weight=0.1, broken=False):
        self.weight, self.broken = weight, broken
        self.calls = []

    @hookimpl
    def tuneforge_reward(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        scores = [-self.weight * len(r) for r in responses]
        return scores[:-1] if self.broken else scores


def test_rewards_from_plugins_are_summed_with_reward_and_reported_per_source(pretrained, reward_module):
    brevity = Brevity()
    result = tuneforge.train(init=str(pretrained), steps=2, mechanisms=[
        "lora:rank=4", f"{GRPO},reward={reward_module}:e_count,reward_weight=2", brevity], **COMMON)
    (prompts, responses), = brevity.calls  # one rollout, scored once
    assert len(responses) == 16 and len(prompts) == 16 and prompts[0] == prompts[3]  # 4 samples a prompt, in a row
    e = sum(r.count("e") for r in responses) / 16
    short = -0.1 * sum(len(r) for r in responses) / 16
    m = result.history[0]
    assert m["reward/e_count"] == pytest.approx(e) and m["reward/brevity"] == pytest.approx(short)
    assert m["reward"] == pytest.approx(2 * e + short, rel=1e-5)

    # a plugin alone is reward enough; one that returns a wrong count is named
    with pytest.raises(PluginError, match=r"plugin 'brevity' \(tuneforge_reward\) returned \(15,\) scores for 16"):
        tuneforge.train(init=str(pretrained), steps=1, mechanisms=["lora:rank=4", GRPO, Brevity(broken=True)], **COMMON)


def test_bad_rewards_are_refused_before_anything_is_written(pretrained, reward_module, tmp_path):
    out = tmp_path / "run"
    cases = {"": "grpo needs a reward", "nowhere:fn": "cannot import module 'nowhere'",
             f"{reward_module}:missing": "has no callable 'missing'",
             f"{reward_module}:one_short": r"reward=verifier:one_short returned \(15,\) scores for 16",
             f"{reward_module}:not_a_number": "non-finite score", str(pretrained): "not a reward model"}
    for spec, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            tuneforge.train(init=str(pretrained), steps=1, out=str(out),
                            mechanisms=["lora:rank=4", f"{GRPO},reward={spec}" if spec else GRPO], **COMMON)
        assert not out.exists(), spec
    with pytest.raises(ValueError, match="samples must be at least 2"):
        tuneforge.train(init=str(pretrained), steps=1, mechanisms=["lora:rank=4", f"{GRPO},samples=1"], **COMMON)
    with pytest.raises(ConfigError, match="rollout of 16 responses must be a multiple of --batch-size"):
        tuneforge.train(init=str(pretrained), steps=1, mechanisms=["lora:rank=4", f"{GRPO},reward=world"],
                        **{**COMMON, "batch_size": 5})


def test_grpo_resumes_mid_rollout_exactly(pretrained, tmp_path):
    grpo = f"{GRPO},reward=world,iterations=2,kl_target=0.01,kl_horizon=16"
    common = dict(init=str(pretrained), steps=6, **COMMON)
    full = tuneforge.train(mechanisms=["lora:rank=4", grpo], out=str(tmp_path / "full"), **common)
    # 16 responses a rollout in minibatches of 8, two passes: 4 steps a rollout; stop inside the first one
    part = tuneforge.train(mechanisms=["lora:rank=4", grpo, StopAt(2)], out=str(tmp_path / "part"), **common)
    assert (part.checkpoint / "grpo_rollout.safetensors").is_file()
    state = json.loads((part.checkpoint / "grpo.json").read_text())
    assert state["rollout_epoch"] == 0 and state["kl_coef"] != 0.04  # adapted after the first rollout
    resumed = tuneforge.train(mechanisms=["lora:rank=4", grpo], out=str(tmp_path / "part"), resume="auto", **common)
    assert resumed.run.step == 6
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [h["kl_coef"] for h in full.history] == [h["kl_coef"] for h in part.history + resumed.history]


def test_the_fluency_measure_counts_the_worlds_words():
    prompt = builtin("rankings", "test")[0]
    assert in_vocabulary(prompt["responses"]) == 1.0  # the world's own answers
    assert in_vocabulary(["the mare loim for a whille at last"]) == pytest.approx(5 / 8)  # loim, whille, mare
    assert in_vocabulary([""]) == 0.0
    assert {"river", "kind", "harbor"} <= vocabulary() and "loim" not in vocabulary()
    s = Samples(["p"] * 2, ["the river is kind", "the lake was whil"], torch.zeros(2, 1, dtype=torch.long),
                torch.zeros(2), torch.zeros(2), torch.tensor([True, False]))
    assert whole_words(s) == ["the river is kind", "the lake was "]  # a word cut by max_new_tokens is no word


def test_ppo_takes_the_same_rewards_and_evaluation_skips_sampling_on_a_signal(pretrained, reward_module):
    brevity = Brevity(weight=0.01)
    result = tuneforge.train(init=str(pretrained), steps=2, mechanisms=[
        "lora:rank=4", f"ppo:rollouts=8,ppo_epochs=1,max_new_tokens=12,eval_prompts=4,reward={reward_module}:e_count",
        brevity], **COMMON)
    assert {"reward/e_count", "reward/brevity", "in_vocabulary", "eval/win_rate", "eval/in_vocabulary",
            "eval/in_vocabulary_reference"} <= set(result.metrics)
    ppo = result.run.plugins["ppo"]
    result.run.stop_reason = "signal"  # as the engine sets it on SIGTERM: the checkpoint is written, no sampling
    assert ppo.tuneforge_evaluate(model=result.model, run=result.run) is None
    result.run.stop_reason = "steps"
    assert ppo.tuneforge_evaluate(model=result.model, run=result.run)["win_rate"] >= 0


class Zero:
    name = "zero"

    @hookimpl
    def tuneforge_reward(self, responses):
        return [0.0] * len(responses)


def test_a_response_cut_by_max_new_tokens_pays_the_stop_penalty(pretrained):
    # 4 new tokens: most responses are cut before their newline or eos
    result = tuneforge.train(init=str(pretrained), steps=2, mechanisms=[
        "lora:rank=4", "grpo:rollouts=4,samples=4,max_new_tokens=4,judge=none,stop_penalty=1.5", Zero()], **COMMON)
    m = result.history[0]
    assert m["stopped"] < 1
    assert m["reward"] == pytest.approx(-1.5 * (1 - m["stopped"])) == pytest.approx(m["reward/stop_penalty"])


@pytest.mark.parametrize("combine, expected", [("sum", 1.5), ("mean", 0.75), ("min", 0.5)])
def test_several_reward_sources_combine(pretrained, reward_module, combine, expected):
    result = tuneforge.train(init=str(pretrained), steps=1, mechanisms=[
        "lora:rank=4", f"{GRPO},reward={reward_module}:e_count,{reward_module}:half_e,combine={combine}"], **COMMON)
    m = result.history[0]
    assert m["reward/half_e"] == pytest.approx(0.5 * m["reward/e_count"])
    assert m["reward"] == pytest.approx(expected * m["reward/e_count"], rel=1e-5)


@pytest.mark.parametrize("value_trunk", [False, True])
def test_ppos_value_loss_trains_the_policy_only_with_value_trunk(pretrained, reward_module, value_trunk):
    # three steps: the value head starts at zero (no gradient reaches the states through it before it moved)
    result = tuneforge.train(init=str(pretrained), steps=3, mechanisms=["lora:rank=4", (
        f"ppo:reward={reward_module}:e_count,rollouts=8,ppo_epochs=1,max_new_tokens=12,judge=none,"
        f"value_trunk={value_trunk}")], **COMMON)
    ppo, model = result.run.plugins["ppo"], result.model.train()
    batch = next(ppo.current.minibatches(8))
    batch["advantages"] = torch.zeros_like(batch["advantages"])  # no policy gradient: only the value loss is left
    batch["returns"] = batch["returns"] + 1.0
    model.zero_grad(set_to_none=True)
    loss, _ = ppo.tuneforge_loss(model=model, batch=batch)
    loss.backward()
    head = list(model.value_head.parameters())
    lora = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in head)]
    assert float(model.value_head.weight.detach().abs().sum()) > 0  # it learned something in the three steps
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    moved = any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert moved == value_trunk


def test_the_guides_online_objective_learns_and_checkpoints_its_rollout(pretrained, reward_module, tmp_path):
    """The REINFORCE skeleton of docs/writing-mechanisms.md, as a third party would write it, on OnlineObjective."""
    import re
    from pathlib import Path

    guide = Path(__file__).resolve().parents[1] / "docs" / "writing-mechanisms.md"
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", guide.read_text(), re.S) if "class Reinforce" in b]
    namespace: dict = {}
    exec(compile(code, str(guide), "exec"), namespace)
    Reinforce = namespace["Reinforce"]
    spec = dict(reward=[f"{reward_module}:e_count"], rollouts=16, max_new_tokens=12, eval_prompts=4, judge="none")
    result = tuneforge.train(init=str(pretrained), steps=24, mechanisms=[Reinforce(Reinforce.Options(**spec))],
                             out=str(tmp_path / "run"), **COMMON)
    rewards = [h["reward"] for h in result.history]
    assert sum(rewards[-4:]) / 4 > 2 * sum(rewards[:4]) / 4 + 0.5, rewards  # it learns to write e's
    assert (result.checkpoint / "reinforce_rollout.safetensors").is_file()
    assert json.loads((result.checkpoint / "reinforce.json").read_text())["rollout_epoch"] == 11  # 2 steps a rollout
