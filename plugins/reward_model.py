"""``reward-model``: learn a scalar score of (prompt, response) from human rankings with ties.

A :class:`ScalarHead` replaces the LM head. ``pool=last`` (default) scores a response by the hidden state at its
last token (its ``eos``); ``pool=sum`` and ``pool=mean`` score every response token and add or average them.
One batch element is one whole ranking: all its responses are scored in one forward pass and every pair the
ranking implies enters the loss, weighted ``1 / (pairs of the ranking)`` so long rankings do not
dominate (see :mod:`tuneforge.data.rankings`). Pairs in different tiers and tied pairs are both scored by the tie
model named by ``ties=`` (``davidson``, default, or ``rao-kupper``, whose tie parameter is learned with the
scores); ``ties=ignore`` drops tied pairs and uses plain Bradley–Terry, for comparison. Formulas: docs/rlhf.md.

Evaluation on held-out rankings: ``pairwise_accuracy`` (strict pairs the scores order as the labellers did;
equal scores count half) and, with a tie model, tie calibration: ``tie_rate`` (share of held-out pairs that are
ties), ``tie_prob`` (the mean predicted tie probability over all pairs: calibrated when close to tie_rate),
``tie_prob_on_ties`` / ``tie_prob_on_strict`` (it should be higher on the real ties) and ``nll`` per pair.

Any parameterisation works: ``layers=all|N|auto`` (auto: everything, or only the head when ``lora``/``adapter``
say what trains). The trained model scores text with :func:`tuneforge.sdk.score` (``ppo`` uses it as its reward).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch

from tuneforge.sdk import (REWARD_POOLS, TIE_MODELS, ConfigError, ScalarHead, block_parameters, check_layers,
                           check_range, hookimpl, outcome_logprobs, pair_nll, pair_right, ranking_batch, ranking_epoch,
                           resolve_layers, rewards, split_rankings)

__all__ = ["RewardModel"]


class RewardModel:
    """A scalar head trained on human rankings, ties included (Davidson or Rao–Kupper), for RLHF's reward."""

    @dataclasses.dataclass
    class Options:
        layers: str = "auto"  # all, N (last N blocks + norm + head), 0 (head only), auto (all, or head beside lora)
        ties: Literal["davidson", "rao-kupper", "ignore"] = "davidson"  # how tied pairs are modelled
        pool: Literal["last", "sum", "mean"] = "last"  # which response tokens make its score (docs/rlhf.md)
        prompt_field: str = "prompt"
        responses_field: str = "responses"
        ranking_field: str = "ranking"
        holdout: float = 0.1  # share of a file held out when there is no --eval-data
        eval_limit: Optional[int] = None  # held-out rankings per evaluation (None: all)

        def __post_init__(self):
            check_layers(self.layers)
            if self.ties not in TIE_MODELS:
                raise ValueError(f"ties must be one of {', '.join(TIE_MODELS)}, got {self.ties!r}")
            if self.pool not in REWARD_POOLS:
                raise ValueError(f"pool must be one of {', '.join(REWARD_POOLS)}, got {self.pool!r}")
            check_range(self, "holdout", "[0, 0.5)", " (a share of the file)")
            check_range(self, "eval_limit", "[1, inf)", " (or none: all)")

    def __init__(self, options: Options):
        self.options = options
        self.train = self.held_out = None

    def _fields(self) -> dict:
        o = self.options
        return dict(prompt_field=o.prompt_field, responses_field=o.responses_field, ranking_field=o.ranking_field)

    def _read(self, run) -> None:
        if self.train is None:
            self.train, self.held_out = split_rankings(run, self._fields(), self.options.holdout)
            if len(self.train) < run.config.batch_size:
                raise ConfigError(f"reward-model: {run.config.data} has {len(self.train)} training rankings, fewer "
                                  f"than one batch of {run.config.batch_size}; lower --batch-size or add rankings")

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        head = model.lm_head
        o = self.options
        if not (isinstance(head, ScalarHead) and (head.ties, head.pool) == (o.ties, o.pool)):  # else: keep training it
            model.lm_head = ScalarHead(model.config.d_model, o.ties, o.pool).to(model.tok_emb.weight.device)

    @hookimpl
    def tuneforge_trainable_params(self, model, run):
        layers = resolve_layers(self.options.layers, run, self)
        return block_parameters(model, layers) if layers != "0" else list(model.lm_head.parameters())

    @hookimpl
    def tuneforge_data(self, run):
        self._read(run)
        return ranking_epoch(self.train, run, run.tokenizer, run.model_config.max_seq_len,
                             with_ties=self.options.ties != "ignore")

    @hookimpl
    def tuneforge_loss(self, model, batch):
        s = rewards(model, batch["input"], batch["last"], batch["start"])  # (N,)
        margin = s[batch["better"]] - s[batch["worse"]]  # (P,)
        nll = pair_nll(margin, batch["tie"], model.lm_head.tie(), self.options.ties)
        loss = (nll * batch["weight"]).sum() + 0.0 * s.sum()  # + 0 * s: a batch of only dropped ties still backprops
        strict = ~batch["tie"]
        right = pair_right(margin)[strict]
        return loss, {"pair_accuracy": float(right.mean()) if right.numel() else float("nan"),
                      "tokens": float(batch["input"].numel())}

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        self._read(run)
        held = self.held_out[: self.options.eval_limit] if self.options.eval_limit else self.held_out
        if not held:
            return None
        margins, ties = [], []
        for b in range(0, len(held), 64):
            batch = ranking_batch(held[b:b + 64], run.tokenizer, run.model_config.max_seq_len, device=run.device)
            s = rewards(model, batch["input"], batch["last"], batch["start"])
            margins.append(s[batch["better"]] - s[batch["worse"]])
            ties.append(batch["tie"])
        margin, tie = torch.cat(margins), torch.cat(ties)
        strict = margin[~tie]
        out = {"pairwise_accuracy": float(pair_right(strict).mean()),
               "pairs": float(margin.numel()), "tie_rate": float(tie.float().mean())}
        head = model.lm_head
        if head.ties != "ignore":
            _, log_tie, _ = outcome_logprobs(margin, head.tie(), head.ties)
            p_tie = log_tie.exp()
            out.update(tie_prob=float(p_tie.mean()),
                       tie_prob_on_ties=float(p_tie[tie].mean()) if bool(tie.any()) else float("nan"),
                       tie_prob_on_strict=float(p_tie[~tie].mean()),
                       nll=float(pair_nll(margin, tie, head.tie(), head.ties).mean()))
        return out
