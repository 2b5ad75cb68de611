"""``grpo``: group relative policy optimisation (Shao et al., 2024): online RL without a value model.

One data epoch is one **rollout** (:class:`tuneforge.sdk.OnlineObjective`): ``rollouts=`` prompts are drawn, the
policy answers each ``samples=`` times (G responses that share one prefill of the prompt), and every response is
scored by the run's rewards (``reward=``: a program ``module:function``, a reward model, or ``world``; plus every
``tuneforge_reward`` plugin). A response's **advantage** is its reward against its own group's:
``(r - mean_G) / (std_G + eps)`` (``scale=group``), or ``r - mean_G`` (``scale=none``, as Dr. GRPO argues, so
groups whose answers barely differ are not blown up). The same advantage goes to every token of the response.

The loss of a minibatch is the mean over its response tokens of the clipped ratio objective plus ``β`` times the
k3 estimate of the KL to the frozen reference, ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, never negative):

    -min(ratio A, clip(ratio, 1 - ε, 1 + ε) A) + β k3,   ratio = π / π_old

``iterations`` passes over each rollout (``μ``; with 1, the ratio differs from 1 only once the first minibatch has
moved the policy). ``β = kl_coef``, fixed or adapted towards ``kl_target`` nats per token. The policy is any
parameterisation, and the reference is shared or a frozen copy exactly as for ``ppo`` (see docs/rlhf.md).

A group whose G rewards are all equal teaches nothing (every advantage is 0): ``flat_groups`` in the metrics is the
share of them, a sign to raise ``samples``, the temperature, or to make the reward finer.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from tuneforge.sdk import (OnlineObjective, OnlineOptions, check_range, hookimpl, hidden_logprobs,
                           masked_mean, model_logprobs, sample)

__all__ = ["GRPO", "group_advantages"]


def group_advantages(rewards: torch.Tensor, *, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """(R, G) rewards of G responses to each of R prompts -> (R, G) advantages: each reward less its group's mean,
    divided by the group's standard deviation (+ ``eps``) with ``scale="group"``; 0 for a group of equal rewards."""
    adv = rewards - rewards.mean(1, keepdim=True)
    return adv / (rewards.std(1, keepdim=True) + eps) if scale == "group" else adv


class GRPO(OnlineObjective):
    """Online RL: G samples per prompt, advantages relative to the group, clipped ratio, k3 KL to the reference."""

    name = "grpo"

    @dataclasses.dataclass
    class Options(OnlineOptions):
        rollouts: int = 16  # prompts per rollout (each answered `samples` times)
        samples: int = 8  # G: responses per prompt
        iterations: int = 1  # μ: passes over each rollout
        scale: Literal["group", "none"] = "group"  # divide advantages by the group's std (group) or not (none)
        kl_coef: float = 0.04  # β: weight of the k3 KL to the reference (the starting value when adaptive)

        def __post_init__(self):
            super().__post_init__()
            if self.samples < 2:
                raise ValueError(f"samples must be at least 2 (advantages compare a response with its group), "
                                 f"got {self.samples}")
            if self.iterations < 1:
                raise ValueError(f"iterations must be at least 1, got {self.iterations}")
            check_range(self, "kl_coef", "[0, inf)")

    def passes(self) -> int:
        return self.options.iterations

    def rollout_rows(self) -> int:
        return self.options.rollouts * self.options.samples

    def rollout(self, run, model) -> tuple[dict, dict]:
        o, tok = self.options, run.tokenizer
        prompts, generator = self.draw(run)
        s = sample(model.generate, tok, prompts, per_prompt=o.samples, max_new_tokens=o.max_new_tokens,
                   temperature=o.temperature, generator=generator, device=run.device)  # (R·G rows, prompt-major)
        logp = model_logprobs(model, s.input, temperature=o.temperature)  # (R·G, T-1): π_old
        ref_logp = model_logprobs(self.reference, s.input, temperature=o.temperature)  # (R·G, T-1)
        mask = s.mask.float()  # (R·G, T-1)
        scores, sources = self.score(s)  # (R·G,)
        groups = scores.view(o.rollouts, o.samples)  # (R, G)
        adv = group_advantages(groups, scale=o.scale)
        kl_token = float(((logp - ref_logp) * mask).sum() / mask.sum())
        stats = {"reward": float(scores.mean()), **sources, "reward_std": float(groups.std(1).mean()),
                 "flat_groups": float((groups.std(1) == 0).float().mean()), "kl": kl_token, "kl_coef": self.kl_coef,
                 "response_tokens": float(mask.sum(-1).mean()), "stopped": float(s.stopped.float().mean())}
        stats.update(self.judged(run, s))
        self.adapt_kl(kl_token)
        buffer = {"input": s.input, "start": s.start, "last": s.last, "logp": logp, "ref_logp": ref_logp,
                  "advantages": adv.reshape(-1), "mask": mask}
        return buffer, stats

    @hookimpl
    def tuneforge_loss(self, model, batch):
        o = self.options
        ids, mask = batch["input"], batch["mask"]
        logp = hidden_logprobs(model, model.forward_hidden(ids), ids, temperature=o.temperature)  # (B, T-1)
        ratio = torch.exp(logp - batch["logp"])
        adv = batch["advantages"][:, None]  # (B, 1): one advantage for every token of a response
        policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - o.clip, 1 + o.clip))  # (B, T-1)
        delta = batch["ref_logp"] - logp
        k3 = torch.exp(delta) - delta - 1  # (B, T-1): KL(π ‖ π_ref) per token, unbiased and >= 0
        policy_loss, kl = masked_mean(policy, mask), masked_mean(k3, mask)
        with torch.no_grad():
            clipfrac = masked_mean(((ratio - 1).abs() > o.clip).float(), mask)
        metrics = self.rollout_stats(batch)
        metrics.update(policy_loss=float(policy_loss.detach()), kl_k3=float(kl.detach()), clipfrac=float(clipfrac),
                       tokens=float(mask.sum()))
        return policy_loss + self.kl_coef * kl, metrics
