"""``simpo``: SimPO (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"),
preference optimisation from rankings without a reference model.

The implicit reward of a response is its *average* token log-probability under the policy, scaled by β:
``r(y) = β / |y| · log π(y | x)``. The loss of a pair (chosen c, rejected r) asks the reward margin to exceed a target
margin γ: ``-log σ(r(c) - r(r) - γ)``. Against DPO (``tuneforge train -m dpo``) there is no reference in the loss
(no second model, nothing to precompute), and the length normalisation keeps the policy from preferring long
responses for their larger summed log-probability.

``nll=α`` (default 1; 0 is SimPO as published) adds α times the chosen response's mean negative log-likelihood, the
term CPO adds (TRL's ``cpo_alpha``). Why it is on by default: when the responses to a prompt begin alike, a token
they share gets the gradient β (1/|c| - 1/|r|) from the margin, which pushes it *down* whenever the chosen response
is the longer one, as the better ones of ``builtin:rankings`` tend to be. Without the term the policy there learns
the pairs (0.88 held-out pair accuracy) while its samples fall apart (0.33 win rate over the starting model, at
2.4 nats/token of KL); with it, 0.89 at 0.14 (the package's README).

Rankings are read and batched as for tuneforge's own ``dpo`` (``tuneforge.sdk.ranking_epoch``): one batch element is
one whole ranking, its strict pairs weighed ``1 / (pairs of its ranking)``, ties skipped. Which weights train is
``layers=`` as for ``dpo``: beside a parameterisation (``-m prefix -m simpo``, ``-m lora -m simpo``) only that
trains, alone every weight. Evaluation: the held-out pair accuracy of the implicit reward, and on data with a
hidden judge (``builtin:rankings``) the win rate over the starting model, which is needed for evaluation only.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from tuneforge.sdk import (ConfigError, Reference, check_layers, check_range, compare, hookimpl, judge_for,
                           model_logprobs, pair_right, policy_parameters, prepare_policy, ranking_batch, ranking_epoch,
                           response_mask, split_rankings)

__all__ = ["SimPO", "simpo_loss", "average_logprobs"]


def average_logprobs(model, batch: dict) -> torch.Tensor:
    """(N,) mean log-probability of each row's response tokens (``start..last``, its stop token included)."""
    ids = batch["input"]
    mask = response_mask(ids, batch["start"], batch["last"])  # (N, T-1)
    return (model_logprobs(model, ids) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (P,), reward margin (P,)) of pairs given their responses' average log-probabilities (P,) each."""
    margin = beta * (chosen - rejected)
    return -F.logsigmoid(margin - gamma), margin


class SimPO:
    """Reference-free preference optimisation on ranked pairs (see the module docstring)."""

    name = "simpo"  # what -m names it by, and its entry point's name

    @dataclasses.dataclass
    class Options:
        beta: float = 2.0  # β: the scale of the average log-probability reward (the paper: 2.0 to 2.5)
        gamma: float = 0.5  # γ: the target reward margin (the paper: γ / β about 0.5; 0.25 wins more here)
        nll: float = 1.0  # α: weight of the chosen responses' mean negative log-likelihood (0: SimPO as published)
        layers: str = "auto"  # weights that train: all, N (last N blocks), 0, auto (all, or none beside a prefix)
        prompt_field: str = "prompt"
        responses_field: str = "responses"
        ranking_field: str = "ranking"
        holdout: float = 0.1  # share of a file held out when there is no --eval-data
        judge: Literal["auto", "world", "none"] = "auto"  # what decides the win rate in evaluation
        eval_prompts: int = 128  # held-out prompts for the win rate
        max_new_tokens: int = 64  # evaluation: the longest sampled response
        temperature: float = 1.0  # evaluation: sampling temperature
        eval_limit: Optional[int] = 200  # held-out rankings for the pair accuracy (None: all)

        def __post_init__(self):
            check_layers(self.layers)
            check_range(self, "beta", "(0, inf)", " (the scale of the reward)")
            check_range(self, "gamma", "[0, inf)", " (the target reward margin)")
            check_range(self, "nll", "[0, inf)", " (the weight of the chosen responses' likelihood term)")
            check_range(self, "temperature", "(0, inf)")
            check_range(self, "holdout", "[0, 0.5)", " (a share of the file)")
            for name in ("eval_prompts", "max_new_tokens", "eval_limit"):
                check_range(self, name, "[1, inf)")

    def __init__(self, options: Options):
        self.options = options
        self.train = self.held_out = None
        self.start = None  # the starting model, for the win rate only (built on first evaluation)

    def _read(self, run) -> None:
        if self.train is None:
            o = self.options
            fields = dict(prompt_field=o.prompt_field, responses_field=o.responses_field, ranking_field=o.ranking_field)
            self.train, self.held_out = split_rankings(run, fields, o.holdout)
            self.train = [r for r in self.train if r.pairs()[0]]  # a ranking of only ties has no pair to learn
            if len(self.train) < run.config.batch_size:
                raise ConfigError(f"simpo: {run.config.data} has {len(self.train)} rankings with a strict pair, "
                                  f"fewer than one batch of {run.config.batch_size}; lower --batch-size or add rankings")

    # -- hooks -------------------------------------------------------------------------------------------------

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        prepare_policy(model, self.options.layers, run, self)

    @hookimpl
    def tuneforge_trainable_params(self, model, run):
        return policy_parameters(model, self.options.layers, run, self)

    @hookimpl
    def tuneforge_data(self, run):
        self._read(run)
        return ranking_epoch(self.train, run, run.tokenizer, run.model_config.max_seq_len, with_ties=False)

    @hookimpl
    def tuneforge_loss(self, model, batch):
        avg = average_logprobs(model, batch)  # (N,)
        b, w = batch["better"], batch["worse"]
        loss, margin = simpo_loss(avg[b], avg[w], self.options.beta, self.options.gamma)
        if self.options.nll:  # keep the chosen responses likely (CPO's term), not only ahead of the rejected
            loss = loss - self.options.nll * avg[b]
        margin = margin.detach()
        return (loss * batch["weight"]).sum(), {
            "pair_accuracy": float(pair_right(margin).mean()), "margin": float(margin.mean()),
            "chosen_avg_logp": float(avg[b].detach().mean()), "tokens": float(batch["input"].numel())}

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        self._read(run)
        out = {}
        held = self.held_out[: self.options.eval_limit] if self.options.eval_limit else self.held_out
        right, total = 0.0, 0
        with torch.no_grad():
            for b in range(0, len(held), 64):
                batch = ranking_batch(held[b:b + 64], run.tokenizer, run.model_config.max_seq_len, with_ties=False,
                                      device=run.device)
                avg = average_logprobs(model, batch)
                right += float(pair_right(avg[batch["better"]] - avg[batch["worse"]]).sum())
                total += batch["better"].numel()
        if total:
            out["pair_accuracy"] = right / total
        if getattr(run, "stop_reason", None) == "signal":  # stopping on a signal: skip the sampling, save sooner
            return out
        prompts = [r.prompt for r in self.held_out][: self.options.eval_prompts]
        judge = judge_for(self.options.judge, run.config.data, chat=any(isinstance(p, list) for p in prompts))
        if judge is not None:
            if self.start is None:
                self.start = Reference(model, run)  # the parts switched off, or the starting model rebuilt
            out.update(compare(model, self.start, run.tokenizer, prompts, judge=judge,
                               max_new_tokens=self.options.max_new_tokens, temperature=self.options.temperature,
                               seed=run.seed, device=run.device))
        return out
