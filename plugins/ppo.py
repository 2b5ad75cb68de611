"""``ppo``: RLHF with proximal policy optimisation, on a KL leash to the reference policy.

One data epoch is one **rollout** (the online pattern of :class:`tuneforge.sdk.OnlineObjective`): ``rollouts=``
prompts are drawn from the data, the policy answers each by sampling with the KV cache, and every response gets

- its reward at its last token: ``reward=`` (a reward model trained with ``-m reward-model``, a
  ``module:function`` program, or ``world``) plus every ``tuneforge_reward`` plugin of the run, minus
- a per-token KL penalty ``β (log π - log π_ref)`` to the frozen reference policy, with ``β = kl_coef`` fixed
  or adapted towards ``kl_target`` nats per token (Ziegler et al., 2019);

a value head on the policy's hidden states estimates returns, GAE turns rewards into advantages (whitened per
rollout), and the rollout is trained for ``ppo_epochs`` passes in minibatches of ``--batch-size`` responses
with the clipped policy loss and a clipped value loss. ``--steps`` counts optimizer steps, so a rollout lasts
``ppo_epochs * rollouts / batch-size`` of them.

The policy is any parameterisation: with ``lora``/``adapter``/``prompt-tuning`` in the run only those parts
(and the value head) train and the reference is the same model with them switched off, no second copy in
memory; alone (``layers=auto`` -> all) or with ``layers=N`` the reference is the starting model, loaded once and
frozen. Evaluation samples the policy and the reference on held-out prompts and reports the policy's win rate
judged by ``judge=`` (``world``: the embedded world's hidden preference, default on ``builtin:rankings``;
``reward``: the run's rewards), the KL per token and, on the world's data, the share of in-vocabulary words.

A prompt (``prompt_field``) is text or a conversation, a list of ``{"role", "content"}`` messages ending with a user
turn: the policy then answers after the model's chat template's generation prompt and stops at its end-of-turn
token (the tokenizer's eos), and a reward model reads the conversation through the same template, as it was
trained (:func:`tuneforge.sdk.ranking_ids`). The world's judge reads a conversation's last user message.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from tuneforge.sdk import (OnlineObjective, OnlineOptions, check_range, gae, hookimpl,
                           hidden_logprobs, masked_mean, model_logprobs, sample, whiten)

__all__ = ["PPO", "ValueHead"]


class ValueHead(nn.Linear):
    """Beside the LM head: the value of each position's state, (..., C) -> (..., 1); starts at zero."""

    def __init__(self, d_model: int):
        super().__init__(d_model, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class PPO(OnlineObjective):
    """RLHF: PPO on rewards (a reward model, a program, plugins) minus a KL penalty to the frozen reference."""

    name = "ppo"

    @dataclasses.dataclass
    class Options(OnlineOptions):
        ppo_epochs: int = 2  # passes over each rollout
        kl_coef: float = 0.1  # β: weight of the per-token KL penalty (the starting value when adaptive)
        value_clip: float = 0.2  # how far a value may move from its rollout estimate per update
        value_coef: float = 0.5  # weight of the value loss
        gamma: float = 1.0  # the discount per token (1: an answer is one episode, its reward at the end)
        lam: float = 1.0  # GAE's λ (1: every token sees the final reward; 0.95^50 leaves 8% for a 50-token answer)
        value_trunk: bool = False  # let the value loss train the policy's own weights too (a shared critic)

        def __post_init__(self):
            super().__post_init__()
            if self.ppo_epochs < 1:
                raise ValueError(f"ppo_epochs must be at least 1, got {self.ppo_epochs}")
            check_range(self, "value_clip", "(0, inf)")
            check_range(self, "value_coef", "[0, inf)")
            check_range(self, "gamma", "[0, 1]", " (a discount)")
            check_range(self, "lam", "[0, 1]", " (GAE's λ)")

    def passes(self) -> int:
        return self.options.ppo_epochs

    def own_parameters(self, model) -> list:
        return list(model.value_head.parameters())

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        super().tuneforge_modify_model(model, run)
        if not isinstance(getattr(model, "value_head", None), ValueHead):
            model.value_head = ValueHead(model.config.d_model).to(model.tok_emb.weight.device)

    def rollout(self, run, model) -> tuple[dict, dict]:
        o, tok = self.options, run.tokenizer
        prompts, generator = self.draw(run)
        s = sample(model.generate, tok, prompts, max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                   generator=generator, device=run.device)
        hidden = model.forward_hidden(s.input)  # (R, T, C)
        logp = hidden_logprobs(model, hidden, s.input, temperature=o.temperature)  # (R, T-1)
        values = model.value_head(hidden).squeeze(-1)[:, :-1].float()  # (R, T-1): the state before each token
        ref_logp = model_logprobs(self.reference, s.input, temperature=o.temperature)  # (R, T-1)
        mask = s.mask.float()  # (R, T-1)
        scores, sources = self.score(s)  # (R,)
        kl = (logp - ref_logp) * mask  # (R, T-1): log π - log π_ref on each response token
        rewards = -self.kl_coef * kl
        rewards[torch.arange(len(prompts), device=run.device), s.last - 1] += scores  # at the last response token
        adv, returns = gae(rewards, values, mask, gamma=o.gamma, lam=o.lam)
        kl_token = float(kl.sum() / mask.sum())
        stats = {"reward": float(scores.mean()), **sources, "kl": kl_token, "kl_coef": self.kl_coef,
                 "response_tokens": float(mask.sum(-1).mean()), "stopped": float(s.stopped.float().mean())}
        stats.update(self.judged(run, s))
        self.adapt_kl(kl_token)
        buffer = {"input": s.input, "start": s.start, "last": s.last, "logp": logp, "values": values,
                  "advantages": whiten(adv, mask), "returns": returns, "mask": mask}
        return buffer, stats

    @hookimpl
    def tuneforge_loss(self, model, batch):
        o = self.options
        ids, mask = batch["input"], batch["mask"]
        hidden = model.forward_hidden(ids)  # (B, T, C)
        logp = hidden_logprobs(model, hidden, ids, temperature=o.temperature)  # (B, T-1)
        # The value head reads the policy's states without training them (unless value_trunk): fitting returns
        # through the policy's LoRA or blocks pulls its language towards whatever predicts them.
        values = model.value_head(hidden if o.value_trunk else hidden.detach()).squeeze(-1)[:, :-1].float()  # (B, T-1)
        ratio = torch.exp(logp - batch["logp"])
        adv = batch["advantages"]
        policy_loss = masked_mean(torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - o.clip, 1 + o.clip)), mask)
        clipped = batch["values"] + (values - batch["values"]).clamp(-o.value_clip, o.value_clip)
        value_loss = 0.5 * masked_mean(torch.maximum((values - batch["returns"]) ** 2,
                                                     (clipped - batch["returns"]) ** 2), mask)
        with torch.no_grad():
            clipfrac = masked_mean(((ratio - 1).abs() > o.clip).float(), mask)
            approx_kl = masked_mean(0.5 * (logp - batch["logp"]) ** 2, mask)
        metrics = self.rollout_stats(batch)
        metrics.update(policy_loss=float(policy_loss.detach()), value_loss=float(value_loss.detach()),
                       clipfrac=float(clipfrac), approx_kl=float(approx_kl), tokens=float(mask.sum()))
        return policy_loss + o.value_coef * value_loss, metrics
