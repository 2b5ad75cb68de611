"""``dpo``: direct preference optimisation from rankings, against a frozen reference whose log-probabilities
are computed once.

Rankings are expanded into their strict pairs (tied pairs say nothing about which response to prefer, and are
skipped). One batch element is one whole ranking, as for the reward model: each response is scored once however
many pairs it is in, and each pair weighs ``1 / (pairs of its ranking)``. The loss of a pair (chosen c, rejected
r) is ``-log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])`` on the responses' summed token
log-probabilities (their ``eos`` included, so the policy learns where to stop).

The reference log-probabilities of a training response are computed the first time a batch holds it (the reference
never changes) and cached, so the first step starts at once and no response is scored twice; every checkpoint keeps
the cache (``dpo_reference.safetensors``, NaN where not yet known), so a resumed run does not recompute them. The reference itself is the same model with every LoRA, adapter and soft prompt
switched off when only those train, else the starting model loaded once (see :mod:`tuneforge.rlhf.policy`); it is
needed again only for evaluation: the win rate of the policy over it on held-out prompts, judged by the
embedded world's hidden preference (``judge=world``, default on ``builtin:rankings``; a conversation is judged on its
last user message), the KL per token, and the held-out pair accuracy of the implicit reward ``β (log π - log π_ref)``.
A prompt may be a conversation: its rows go through the model's chat template (:func:`tuneforge.sdk.ranking_ids`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file, save_file

from tuneforge.sdk import (ConfigError, Reference, check_layers, check_range, compare, dpo_loss, fluency_of, hookimpl,
    judge_for, pair_right, policy_parameters, prepare_policy, ranking_batch, ranking_epoch, sequence_logprobs,
    split_rankings)

__all__ = ["DPO"]

CACHE = "dpo_reference.safetensors"


class DPO:
    """RLHF without a reward model: the DPO loss on ranked pairs against a frozen reference."""

    @dataclasses.dataclass
    class Options:
        beta: float = 0.1  # β: how far the policy may move from the reference (smaller = further)
        layers: str = "auto"  # policy weights that train: all, N (last N blocks), 0, auto (all, or none beside lora)
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
            check_range(self, "beta", "(0, inf)", " (how far the policy may move from the reference)")
            check_range(self, "temperature", "(0, inf)")
            check_range(self, "holdout", "[0, 0.5)", " (a share of the file)")
            for name in ("eval_prompts", "max_new_tokens", "eval_limit"):
                check_range(self, name, "[1, inf)")

    def __init__(self, options: Options):
        self.options = options
        self.train = self.held_out = None
        self.reference = None
        self.ref_logp: torch.Tensor | None = None  # (records, max responses): the cache, NaN = not computed yet

    def _read(self, run) -> None:
        if self.train is None:
            o = self.options
            fields = dict(prompt_field=o.prompt_field, responses_field=o.responses_field, ranking_field=o.ranking_field)
            self.train, self.held_out = split_rankings(run, fields, o.holdout)
            self.train = [r for r in self.train if r.pairs()[0]]  # a ranking of only ties has no pair to learn
            if len(self.train) < run.config.batch_size:
                raise ConfigError(f"dpo: {run.config.data} has {len(self.train)} rankings with a strict pair, fewer "
                                  f"than one batch of {run.config.batch_size}; lower --batch-size or add rankings")

    def _reference(self, run, model) -> Reference:
        if self.reference is None:
            self.reference = Reference(model, run)
            run.log(f"dpo: the reference policy is {self.reference.note}")
        return self.reference

    def _cache(self, run) -> torch.Tensor:
        """The cache of reference log-probabilities, (records, max responses), NaN until a batch needs them (a
        resumed run gets what its checkpoint had, see ``tuneforge_load``)."""
        if self.ref_logp is None:
            self.ref_logp = torch.full((len(self.train), max(len(r.responses) for r in self.train)), float("nan"),
                                       device=run.device)
            run.log(f"dpo: reference log-probabilities of the {sum(len(r.responses) for r in self.train):,} training "
                    "responses are computed as batches first hold them, then cached")
        return self.ref_logp

    @torch.no_grad()
    def _reference_logprobs(self, run, model, batch) -> torch.Tensor:
        """(N,) reference log-probabilities of the batch's responses: from the cache, scored now where missing."""
        cache = self._cache(run)
        at = (batch["index"].to(cache.device), batch["response"].to(cache.device))
        known = cache[at]  # (N,)
        missing = known.isnan()
        if bool(missing.any()):  # one sync per batch; only the responses never scored go through the reference
            rows = missing.nonzero().squeeze(1).to(batch["input"].device)
            ids = batch["input"][rows].to(run.device)  # (M, T)
            scored = sequence_logprobs(self._reference(run, model), ids, batch["start"][rows].to(run.device),
                                       batch["last"][rows].to(run.device))  # (M,)
            cache[at[0][missing], at[1][missing]] = scored.to(cache.device, cache.dtype)
            known = cache[at]
        return known

    # -- hooks -------------------------------------------------------------------------------------------------

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        prepare_policy(model, self.options.layers, run, self)

    @hookimpl
    def tuneforge_trainable_params(self, model, run):
        return policy_parameters(model, self.options.layers, run, self)

    @hookimpl
    def tuneforge_data(self, run, model):
        self._read(run)
        return self._epoch(run, model)

    def _epoch(self, run, model):
        for batch in ranking_epoch(self.train, run, run.tokenizer, run.model_config.max_seq_len, with_ties=False):
            batch["ref_logp"] = self._reference_logprobs(run, model, batch)
            yield batch

    @hookimpl
    def tuneforge_loss(self, model, batch):
        ids = batch["input"]
        logp = sequence_logprobs(model, ids, batch["start"], batch["last"])  # (N,)
        ref = batch["ref_logp"]
        b, w = batch["better"], batch["worse"]
        loss, margin = dpo_loss(logp[b], logp[w], ref[b], ref[w], self.options.beta)
        margin, shift = margin.detach(), (logp[b] - ref[b]).detach()
        return (loss * batch["weight"]).sum(), {
            "pair_accuracy": float(pair_right(margin).mean()),
            "margin": float(margin.mean()),
            "chosen_logp_shift": float(shift.mean()), "tokens": float(ids.numel())}

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        self._read(run)
        reference = self._reference(run, model)
        out = {}
        held = self.held_out[: self.options.eval_limit] if self.options.eval_limit else self.held_out
        right, total = 0.0, 0
        for b in range(0, len(held), 64):
            batch = ranking_batch(held[b:b + 64], run.tokenizer, run.model_config.max_seq_len, with_ties=False,
                                  device=run.device)
            ids = batch["input"]
            implicit = (sequence_logprobs(model, ids, batch["start"], batch["last"])
                        - sequence_logprobs(reference, ids, batch["start"], batch["last"]))  # (N,)
            margin = implicit[batch["better"]] - implicit[batch["worse"]]
            right += float(pair_right(margin).sum())
            total += margin.numel()
        if total:
            out["pair_accuracy"] = right / total
        prompts = [r.prompt for r in self.held_out][: self.options.eval_prompts]
        judge = judge_for(self.options.judge, run.config.data, chat=any(isinstance(p, list) for p in prompts))
        if judge is not None:
            out.update(compare(model, reference, run.tokenizer, prompts, judge=judge,
                               max_new_tokens=self.options.max_new_tokens, temperature=self.options.temperature,
                               seed=run.seed, device=run.device, fluency=fluency_of(run.config.data)))
        return out

    @hookimpl
    def tuneforge_run_start(self, run, model):
        self._reference(run, model)

    @hookimpl
    def tuneforge_save(self, run, path):
        if self.ref_logp is not None:
            save_file({"ref_logp": self.ref_logp.cpu()}, str(Path(path) / CACHE),
                      metadata={"records": str(len(self.train)), "data": run.config.data})

    @hookimpl
    def tuneforge_load(self, run, path):
        cached = Path(path) / CACHE
        if cached.is_file():
            self._read(run)
            self.ref_logp = load_file(str(cached))["ref_logp"].to(run.device)
            if self.ref_logp.size(0) != len(self.train):
                raise ConfigError(f"dpo: {cached} caches {self.ref_logp.size(0)} rankings, the data has "
                                  f"{len(self.train)}; resume with the data the run started with")

