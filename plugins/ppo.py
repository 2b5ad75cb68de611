"""``ppo``: RLHF with proximal policy optimisation against a trained reward model, on a KL leash.

One data epoch is one **rollout**: ``rollouts=`` prompts are drawn from the data, the policy answers each by
sampling with the KV cache, and every response gets

- the reward model's score (``reward=``, a run trained with ``-m reward-model``) at its last token, minus
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
``reward``: the reward model) and the KL per token.

A prompt (``prompt_field``) is text or a conversation, a list of ``{"role", "content"}`` messages ending with a user
turn: the policy then answers after the model's chat template's generation prompt and stops at its end-of-turn
token (the tokenizer's eos), and the reward model reads the conversation through the same template, as it was
trained (:func:`tuneforge.sdk.ranking_ids`). The world's judge reads a conversation's last user message.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn

from tuneforge.sdk import (ConfigError, Reference, RolloutBuffer, ScalarHead, block_parameters, check_layers,
    check_range, compare, epoch_generator, gae, hookimpl, judge_for, load_model, masked_mean, prompt_ids,
    read_records, resolve_layers, sample, score, split_held_out, hidden_logprobs, model_logprobs, untie_head, whiten)

__all__ = ["PPO", "ValueHead"]

STATE = "ppo.json"
ROLLOUT = "ppo_rollout.safetensors"


class ValueHead(nn.Linear):
    """Beside the LM head: the value of each position's state, (..., C) -> (..., 1); starts at zero."""

    def __init__(self, d_model: int):
        super().__init__(d_model, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class PPO:
    """RLHF: PPO on rewards from a trained reward model minus a KL penalty to the frozen reference policy."""

    @dataclasses.dataclass
    class Options:
        reward: str = ""  # the reward model: a checkpoint or run folder trained with -m reward-model
        layers: str = "auto"  # policy weights that train: all, N (last N blocks), 0, auto (all, or none beside lora)
        rollouts: int = 64  # prompts answered per rollout (a multiple of --batch-size)
        ppo_epochs: int = 4  # passes over each rollout
        max_new_tokens: int = 64  # the longest response
        temperature: float = 1.0  # sampling temperature of rollouts and evaluation
        kl_coef: float = 0.05  # β: weight of the per-token KL penalty (the starting value when adaptive)
        kl_target: Optional[float] = None  # nats per token; set to adapt β towards it (None: β stays fixed)
        kl_horizon: int = 10000  # responses over which the adaptive β may move by ~20%
        clip: float = 0.2  # ε of the clipped policy ratio
        value_clip: float = 0.2  # how far a value may move from its rollout estimate per update
        value_coef: float = 0.5  # weight of the value loss
        gamma: float = 1.0
        lam: float = 0.95  # GAE's λ
        prompt_field: str = "prompt"
        judge: Literal["auto", "world", "reward", "none"] = "auto"
        eval_prompts: int = 128  # held-out prompts per evaluation
        holdout: float = 0.1  # share of a file's prompts held out when there is no --eval-data

        def __post_init__(self):
            check_layers(self.layers)
            for name in ("rollouts", "ppo_epochs", "max_new_tokens", "eval_prompts", "kl_horizon"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
            check_range(self, "temperature", "(0, inf)", " (PPO needs the sampling distribution)")
            check_range(self, "kl_coef", "[0, inf)")
            check_range(self, "kl_target", "(0, inf)", " (nats per token)")
            check_range(self, "clip", "(0, 1)", " (the policy ratio is clipped to [1 - clip, 1 + clip])")
            check_range(self, "value_clip", "(0, inf)")
            check_range(self, "value_coef", "[0, inf)")
            check_range(self, "gamma", "[0, 1]", " (a discount)")
            check_range(self, "lam", "[0, 1]", " (GAE's λ)")
            check_range(self, "holdout", "[0, 0.5)", " (a share of the file)")

    def __init__(self, options: Options):
        self.options = options
        self.kl_coef = options.kl_coef
        self.prompts = self.held_out = None
        self.chat = False  # some prompts are conversations (the world's judge then reads their last user message)
        self.reward_model = self.reference = None
        # The rollout being trained on. Checkpoints save it; a resumed run replays it.
        self.current: RolloutBuffer | None = None

    # -- setup -------------------------------------------------------------------------------------------------

    def _read(self, run) -> None:
        if self.prompts is not None:
            return
        name, tok = self.options.prompt_field, run.tokenizer

        def read(spec, split):  # text, or a conversation ending with a user turn: validated here, file:line named
            records = read_records(spec, split=split, fields={name: (str, list)})
            for r, where in zip(records.items, records.where):
                if isinstance(r[name], list):  # through the chat template, so one it refuses is named here
                    prompt_ids(tok, r[name], where=where)
            return [r[name] for r in records.items]

        self.prompts, held_out = split_held_out(run.config, read, self.options.holdout)
        self.held_out = held_out[: self.options.eval_prompts]
        self.chat = any(isinstance(p, list) for p in self.prompts + self.held_out)

    def _setup(self, run, model) -> None:
        if self.reference is None:
            self.reference = Reference(model, run, own=model.value_head.parameters())
            run.log(f"ppo: the reference policy is {self.reference.note}")
        if self.reward_model is None:
            self.reward_model = load_model(self.options.reward, device=str(run.device)).requires_grad_(False)
            if not isinstance(self.reward_model.lm_head, ScalarHead):
                raise ConfigError(f"ppo: reward={self.options.reward} is not a reward model (no scalar head); train "
                                  "one with -m reward-model on rankings")

    def _reward(self, prompts: list, texts: list[str]) -> list[float]:
        return score(self.reward_model, prompts, texts).tolist()

    # -- hooks -------------------------------------------------------------------------------------------------

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        if not self.options.reward and run.checkpoint is None:
            raise ConfigError("ppo: reward= is required: a checkpoint or run folder of a reward model (train one "
                              "with -m reward-model --data builtin:rankings)")
        layers = resolve_layers(self.options.layers, run, self)
        if layers not in ("all", "0"):
            untie_head(model)  # the head trains with the last blocks; the input embedding stays frozen
        if not isinstance(getattr(model, "value_head", None), ValueHead):
            model.value_head = ValueHead(model.config.d_model).to(model.tok_emb.weight.device)

    @hookimpl
    def tuneforge_trainable_params(self, model, run):
        layers = resolve_layers(self.options.layers, run, self)
        policy = block_parameters(model, layers) if layers != "0" else []
        return policy + [p for p in model.value_head.parameters() if all(p is not q for q in policy)]

    @hookimpl
    def tuneforge_validate(self, run):
        o = self.options
        if o.rollouts % run.config.batch_size:
            raise ConfigError(f"ppo: rollouts={o.rollouts} must be a multiple of --batch-size "
                              f"({run.config.batch_size}): each rollout is cut into minibatches of that size")
        self._read(run)
        longest = max(len(prompt_ids(run.tokenizer, p)) for p in self.prompts + self.held_out)
        if longest + o.max_new_tokens > run.model_config.max_seq_len:
            raise ConfigError(f"ppo: the longest prompt ({longest} tokens) + max_new_tokens={o.max_new_tokens} exceed "
                              f"the model's context of {run.model_config.max_seq_len}; lower max_new_tokens to at most "
                              f"{run.model_config.max_seq_len - longest} or shorten the prompts")

    @hookimpl
    def tuneforge_data(self, run, model):
        self._read(run)
        return self._epoch(run, model)

    def _epoch(self, run, model):
        self._setup(run, model)
        if self.current is None or self.current.epoch != run.epoch:  # else resumed inside this rollout
            rows, stats = self._rollout(run, model)
            self.current = RolloutBuffer(rows, epoch=run.epoch, stats=stats)
        yield from self.current.minibatches(run.config.batch_size, passes=self.options.ppo_epochs,
                                            generator=epoch_generator(run.seed, run.epoch, salt=3))

    @torch.no_grad()
    def _rollout(self, run, model) -> tuple[dict, dict]:
        o, tok = self.options, run.tokenizer
        g = epoch_generator(run.seed, run.epoch, salt=4)
        prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (o.rollouts,), generator=g).tolist()]
        was_training = model.training
        model.eval()
        try:
            s = sample(model.generate, tok, prompts, max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                       generator=torch.Generator(device=run.device).manual_seed(int(torch.randint(2**62, (1,), generator=g))),
                       device=run.device)
            hidden = model.forward_hidden(s.input)  # (R, T, C)
            logp = hidden_logprobs(model, hidden, s.input, temperature=o.temperature)  # (R, T-1)
            values = model.value_head(hidden).squeeze(-1)[:, :-1].float()  # (R, T-1): the state before each token
            ref_logp = model_logprobs(self.reference, s.input, temperature=o.temperature)  # (R, T-1)
        finally:
            model.train(was_training)
        mask = s.mask.float()  # (R, T-1)
        scores = score(self.reward_model, prompts, s.texts)  # (R,)
        kl = (logp - ref_logp) * mask  # (R, T-1): log π - log π_ref on each response token
        rewards = -self.kl_coef * kl
        rewards[torch.arange(len(prompts), device=run.device), s.last - 1] += scores  # at the last response token
        adv, returns = gae(rewards, values, mask, gamma=o.gamma, lam=o.lam)
        kl_token = float(kl.sum() / mask.sum())
        stats = {"reward": float(scores.mean()), "kl": kl_token, "kl_coef": self.kl_coef,
                 "response_tokens": float(mask.sum(-1).mean()), "stopped": float(s.stopped.float().mean())}
        judge = judge_for(o.judge, run.config.data, self._reward, chat=self.chat)
        if judge is not None and o.judge != "reward":
            stats["judge_score"] = sum(judge(prompts, s.texts)) / len(prompts)
        if o.kl_target is not None:  # proportional controller on the measured KL, clipped to ±20% per horizon
            error = max(-0.2, min(0.2, kl_token / o.kl_target - 1))
            self.kl_coef *= 1 + error * o.rollouts / o.kl_horizon
        buffer = {"input": s.input, "start": s.start, "last": s.last, "logp": logp, "values": values,
                  "advantages": whiten(adv, mask), "returns": returns, "mask": mask}
        return buffer, stats

    @hookimpl
    def tuneforge_loss(self, model, batch):
        o = self.options
        ids, mask = batch["input"], batch["mask"]
        hidden = model.forward_hidden(ids)  # (B, T, C)
        logp = hidden_logprobs(model, hidden, ids, temperature=o.temperature)  # (B, T-1)
        values = model.value_head(hidden).squeeze(-1)[:, :-1].float()  # (B, T-1)
        ratio = torch.exp(logp - batch["logp"])
        adv = batch["advantages"]
        policy_loss = masked_mean(torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - o.clip, 1 + o.clip)), mask)
        clipped = batch["values"] + (values - batch["values"]).clamp(-o.value_clip, o.value_clip)
        value_loss = 0.5 * masked_mean(torch.maximum((values - batch["returns"]) ** 2,
                                                     (clipped - batch["returns"]) ** 2), mask)
        with torch.no_grad():
            clipfrac = masked_mean(((ratio - 1).abs() > o.clip).float(), mask)
            approx_kl = masked_mean(0.5 * (logp - batch["logp"]) ** 2, mask)
        metrics = {k: batch[k] for k in ("reward", "kl", "kl_coef", "response_tokens", "stopped", "judge_score")
                   if k in batch}
        metrics.update(policy_loss=float(policy_loss.detach()), value_loss=float(value_loss.detach()), clipfrac=float(clipfrac),
                       approx_kl=float(approx_kl), tokens=float(mask.sum()))
        return policy_loss + o.value_coef * value_loss, metrics

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        self._read(run)
        self._setup(run, model)
        judge = judge_for(self.options.judge, run.config.data, self._reward, chat=self.chat)
        if judge is None:
            return None
        return compare(model, self.reference, run.tokenizer, self.held_out, judge=judge,
                       max_new_tokens=self.options.max_new_tokens, temperature=self.options.temperature,
                       seed=run.seed, device=run.device)

    # -- state -------------------------------------------------------------------------------------------------

    @hookimpl
    def tuneforge_save(self, run, path):
        state = {"kl_coef": self.kl_coef}
        if self.current is not None:  # the rollout being trained on, so a resume continues it exactly
            state.update(self.current.save(path, ROLLOUT))  # its rollout_epoch and stats
        (Path(path) / STATE).write_text(json.dumps(state, indent=2))

    @hookimpl
    def tuneforge_load(self, run, path):
        state_file = Path(path) / STATE
        if not state_file.is_file():
            return
        state = json.loads(state_file.read_text())
        self.kl_coef = float(state["kl_coef"])
        buffer = RolloutBuffer.load(path, ROLLOUT, state, device=run.device)
        if buffer is not None:
            self.current = buffer
