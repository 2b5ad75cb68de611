"""The online-objective pattern: a policy trained on its own samples, one rollout per data epoch.

:class:`OnlineObjective` is the base of ``ppo`` and ``grpo``, and of a plugin author's own online method. A
subclass says how to draw a rollout (:meth:`OnlineObjective.rollout`: sample, score, compute what the loss needs)
and the loss on a minibatch of it (``tuneforge_loss``); the base does the rest, the same way for every method:

- **prompts**: ``prompt_field`` of ``--data`` (text, or a conversation ending with a user turn), with a held-out
  share (or ``--eval-data``) for evaluation, checked against the context before anything runs;
- **which weights train** (``layers=``, :mod:`tuneforge.rlhf.policy`) and the frozen :class:`Reference`;
- **rewards**: ``reward=`` plus every ``tuneforge_reward`` plugin (:class:`tuneforge.rlhf.reward_sources.Rewards`);
- **one rollout per data epoch**, trained for ``passes()`` passes in minibatches of ``--batch-size`` rows, each
  minibatch carrying the rollout's statistics (so they reach every step's metrics);
- **exact resume**: a checkpoint keeps the rollout being trained on (:class:`RolloutBuffer`) and the subclass's
  own state (:meth:`OnlineObjective.state` / :meth:`OnlineObjective.restore`), so a resumed run replays the same
  rows in the same order and ends where an uninterrupted one ends;
- **evaluation**: the policy against its reference on held-out prompts (win rate under ``judge=``, KL per token,
  and, on the embedded world's data, the share of in-vocabulary words); skipped when the run stops on a signal,
  so the scheduler's grace period is not spent sampling.

A subclass is a plugin like any other: it sets ``name``, its ``Options`` (a dataclass deriving from
:class:`OnlineOptions`), and decorates the hooks it overrides with ``@hookimpl`` again.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal, Optional

import torch

from tuneforge.data.batching import epoch_generator
from tuneforge.data.rankings import prompt_ids
from tuneforge.data.records import read_records, split_held_out
from tuneforge.data.world import fluency_of
from tuneforge.errors import ConfigError
from tuneforge.hookspecs import hookimpl
from tuneforge.common.options import check_range
from tuneforge.rlhf.buffer import RolloutBuffer
from tuneforge.rlhf.policy import Reference, check_layers, policy_parameters, prepare_policy
from tuneforge.rlhf.reward_sources import Rewards
from tuneforge.rlhf.rollout import Samples, compare, judge_for, whole_words

__all__ = ["OnlineOptions", "OnlineObjective"]


@dataclasses.dataclass
class OnlineOptions:
    """The options every online objective shares; a subclass's ``Options`` derives from this and adds its own."""

    # reward model folders, module:function callables or world, comma-separated (none: only tuneforge_reward plugins)
    reward: list[str] = dataclasses.field(default_factory=list)
    combine: Literal["sum", "mean", "min"] = "sum"  # several reward= sources: sum criteria, or mean/min an ensemble
    reward_weight: float = 1.0  # multiplies the combined reward= sources (plugins weigh their own)
    stop_penalty: float = 0.0  # taken off the reward of a response cut by max_new_tokens before its stop token
    layers: str = "auto"  # policy weights that train: all, N (last N blocks), 0, auto (all, or none beside lora)
    rollouts: int = 64  # prompts answered per rollout
    max_new_tokens: int = 64  # the longest response
    temperature: float = 1.0  # sampling temperature of rollouts and evaluation
    kl_coef: float = 0.05  # β: weight of the KL to the reference (the starting value when adaptive)
    kl_target: Optional[float] = None  # nats per token; set to adapt β towards it (None: β stays fixed)
    kl_horizon: int = 10000  # responses over which the adaptive β may move by ~20%
    clip: float = 0.2  # ε of the clipped policy ratio
    prompt_field: str = "prompt"  # the record field holding the prompt: text, or messages ending with a user turn
    judge: Literal["auto", "world", "reward", "none"] = "auto"  # what evaluation scores responses with
    eval_prompts: int = 128  # held-out prompts per evaluation
    holdout: float = 0.1  # share of a file's prompts held out when there is no --eval-data

    def __post_init__(self):
        check_layers(self.layers)
        for name in ("rollouts", "max_new_tokens", "eval_prompts", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_range(self, "temperature", "(0, inf)", " (online objectives need the sampling distribution)")
        check_range(self, "kl_coef", "[0, inf)")
        check_range(self, "kl_target", "(0, inf)", " (nats per token)")
        check_range(self, "clip", "(0, 1)", " (the policy ratio is clipped to [1 - clip, 1 + clip])")
        check_range(self, "reward_weight", "(-inf, inf)")
        check_range(self, "stop_penalty", "[0, inf)")
        check_range(self, "holdout", "[0, 0.5)", " (a share of the file)")


class OnlineObjective:
    """Base of an online objective plugin; see the module docstring. ``name`` names its checkpoint files."""

    name = "online"
    Options = OnlineOptions
    salt = 3  # epoch_generator salts of the minibatch order (salt) and of the rollout's draws (salt + 1)

    def __init__(self, options: OnlineOptions):
        self.options = options
        self.kl_coef = options.kl_coef
        self.prompts = self.held_out = None
        self.chat = False  # some prompts are conversations (the world's judge then reads their last user message)
        self.reference: Reference | None = None
        self.rewards: Rewards | None = None
        self.current: RolloutBuffer | None = None  # the rollout being trained on; checkpoints keep it

    # -- what a subclass provides ------------------------------------------------------------------------------

    def rollout(self, run, model) -> tuple[dict, dict]:
        """Draw this epoch's rollout: ``(rows, stats)``, the columns of a :class:`RolloutBuffer` and floats that
        describe it (they go with every minibatch, hence into every step's metrics). Runs under ``no_grad``."""
        raise NotImplementedError

    def passes(self) -> int:
        """Passes over each rollout."""
        return 1

    def rollout_rows(self) -> int:
        """Rows a rollout holds (``rollouts`` prompts, times the samples per prompt where there are several)."""
        return self.options.rollouts

    def own_parameters(self, model) -> list:
        """Parameters the objective adds beside the policy (a value head), trained and not part of the policy."""
        return []

    def state(self) -> dict:
        """JSON-able state beside the rollout (e.g. an adaptive β); restored by :meth:`restore`."""
        return {"kl_coef": self.kl_coef}

    def restore(self, state: dict) -> None:
        self.kl_coef = float(state.get("kl_coef", self.kl_coef))

    # -- shared steps ------------------------------------------------------------------------------------------

    def read_prompts(self, run) -> None:
        """Read (once) the training prompts, and the held-out ones evaluation answers."""
        if self.prompts is not None:
            return
        field, tok = self.options.prompt_field, run.tokenizer

        def read(spec, split):  # text, or a conversation ending with a user turn: validated here, file:line named
            records = read_records(spec, split=split, fields={field: (str, list)})
            for r, where in zip(records.items, records.where):
                if isinstance(r[field], list):  # through the chat template, so one it refuses is named here
                    prompt_ids(tok, r[field], where=where)
            return [r[field] for r in records.items]

        self.prompts, held_out = split_held_out(run.config, read, self.options.holdout)
        self.held_out = held_out[: self.options.eval_prompts]
        self.chat = any(isinstance(p, list) for p in self.prompts + self.held_out)

    def setup(self, run, model) -> None:
        """The reference policy and the rewards, made once (after the model's weights are final)."""
        if self.reference is None:
            self.reference = Reference(model, run, own=self.own_parameters(model))
            run.log(f"{self.name}: the reference policy is {self.reference.note}")
        if self.rewards is None:
            o = self.options
            self.rewards = Rewards(run, o.reward, owner=self.name, weight=o.reward_weight, combine=o.combine)
            run.log(f"{self.name}: rewards from {' + '.join(self.rewards.sources)}")

    def draw(self, run) -> tuple[list, torch.Generator]:
        """This epoch's ``rollouts`` training prompts (drawn with replacement) and the generator to sample their
        responses with, on the run's device: both a function of the seed and the epoch only, so a resumed run
        draws the same rollout."""
        g = epoch_generator(run.seed, run.epoch, salt=self.salt + 1)
        idx = torch.randint(len(self.prompts), (self.options.rollouts,), generator=g).tolist()
        seed = int(torch.randint(2**62, (1,), generator=g))
        return [self.prompts[i] for i in idx], torch.Generator(device=run.device).manual_seed(seed)

    def score(self, samples: Samples) -> tuple[torch.Tensor, dict[str, float]]:
        """``(reward (N,), {"reward/<source>": mean})`` of sampled responses: the run's rewards, less ``stop_penalty``
        for each response that ran out of ``max_new_tokens``. Why: a reward model reads a cut response as if it
        were whole, so without the penalty a policy can learn to ramble past the end of every answer it scores."""
        scores, sources = self.rewards(samples.prompts, samples.texts)
        if self.options.stop_penalty:
            cut = (~samples.stopped).float()  # (N,)
            scores = scores - self.options.stop_penalty * cut
            sources["reward/stop_penalty"] = -self.options.stop_penalty * float(cut.mean())
        return scores, sources

    def judge(self, run):
        """What evaluation (and a rollout's ``judge_score``) scores responses with, or None (``judge=none``)."""
        reward = (lambda p, r: self.rewards(p, r)[0].tolist()) if self.rewards is not None else None
        return judge_for(self.options.judge, run.config.data, reward, chat=self.chat)

    def judged(self, run, samples: Samples) -> dict[str, float]:
        """What a rollout reports about its responses besides the reward: ``judge_score`` (the judge's mean, when
        the judge is not the reward itself) and ``in_vocabulary`` (on the embedded world's data)."""
        out = {}
        if self.options.judge != "reward":
            judge = self.judge(run)
            if judge is not None:
                out["judge_score"] = sum(judge(samples.prompts, samples.texts)) / len(samples.texts)
        fluency = fluency_of(run.config.data)
        if fluency is not None:
            out["in_vocabulary"] = fluency(whole_words(samples))
        return out

    @staticmethod
    def rollout_stats(batch: dict) -> dict[str, float]:
        """The rollout's statistics a minibatch carries (its floats; the columns are tensors): for the metrics."""
        return {k: v for k, v in batch.items() if isinstance(v, float)}

    def adapt_kl(self, kl_token: float) -> None:
        """Move β towards ``kl_target`` (a proportional controller on the measured KL per token, clipped to ±20%
        per ``kl_horizon`` responses; Ziegler et al., 2019). Nothing without a target."""
        o = self.options
        if o.kl_target is not None:
            error = max(-0.2, min(0.2, kl_token / o.kl_target - 1))
            self.kl_coef *= 1 + error * self.rollout_rows() / o.kl_horizon

    # -- hooks -------------------------------------------------------------------------------------------------

    @hookimpl
    def tuneforge_modify_model(self, model, run):
        prepare_policy(model, self.options.layers, run, self)

    @hookimpl
    def tuneforge_trainable_params(self, model, run):
        policy = policy_parameters(model, self.options.layers, run, self)
        return policy + [p for p in self.own_parameters(model) if all(p is not q for q in policy)]

    @hookimpl
    def tuneforge_validate(self, run):
        o, rows = self.options, self.rollout_rows()
        if rows % run.config.batch_size:
            raise ConfigError(f"{self.name}: a rollout of {rows} responses must be a multiple of --batch-size "
                              f"({run.config.batch_size}): each rollout is cut into minibatches of that size")
        if not o.reward and not run.hook.tuneforge_reward.get_hookimpls():
            raise ConfigError(f"{self.name} needs a reward: {self.name}:reward=RUN (a reward model), "
                              f"{self.name}:reward=module:function (a callable scoring responses), "
                              f"{self.name}:reward=world (the embedded world's judge), or a plugin implementing "
                              "tuneforge_reward in the run (-m NAME)")
        self.read_prompts(run)
        longest = max(len(prompt_ids(run.tokenizer, p)) for p in self.prompts + self.held_out)
        if longest + o.max_new_tokens > run.model_config.max_seq_len:
            raise ConfigError(f"{self.name}: the longest prompt ({longest} tokens) + max_new_tokens={o.max_new_tokens} "
                              f"exceed the model's context of {run.model_config.max_seq_len}; lower max_new_tokens to "
                              f"at most {run.model_config.max_seq_len - longest} or shorten the prompts")

    @hookimpl
    def tuneforge_data(self, run, model):
        self.read_prompts(run)
        return self._epoch(run, model)

    def _epoch(self, run, model):
        self.setup(run, model)
        if self.current is None or self.current.epoch != run.epoch:  # else resumed inside this rollout
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    rows, stats = self.rollout(run, model)
            finally:
                model.train(was_training)
            self.current = RolloutBuffer(rows, epoch=run.epoch, stats=stats, where=f"{self.name}'s rollout")
        yield from self.current.minibatches(run.config.batch_size, passes=self.passes(),
                                            generator=epoch_generator(run.seed, run.epoch, salt=self.salt))

    @hookimpl
    def tuneforge_evaluate(self, model, run):
        if run.stop_reason == "signal":  # the checkpoint is written; sampling now could outlast the grace period
            return None
        self.read_prompts(run)
        self.setup(run, model)
        judge = self.judge(run)
        if judge is None:
            return None
        return compare(model, self.reference, run.tokenizer, self.held_out, judge=judge,
                       max_new_tokens=self.options.max_new_tokens, temperature=self.options.temperature,
                       seed=run.seed, device=run.device, fluency=fluency_of(run.config.data))

    @hookimpl
    def tuneforge_save(self, run, path):
        state = self.state()
        if self.current is not None:  # the rollout being trained on, so a resume continues it exactly
            state.update(self.current.save(path, f"{self.name}_rollout.safetensors"))  # its rollout_epoch and stats
        (Path(path) / f"{self.name}.json").write_text(json.dumps(state, indent=2))

    @hookimpl
    def tuneforge_load(self, run, path):
        state_file = Path(path) / f"{self.name}.json"
        if not state_file.is_file():
            return
        state = json.loads(state_file.read_text())
        self.restore(state)
        buffer = RolloutBuffer.load(path, f"{self.name}_rollout.safetensors", state, device=run.device)
        if buffer is not None:
            self.current = buffer
