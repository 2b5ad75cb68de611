"""Where an online objective's rewards come from: its ``reward=`` option and every ``tuneforge_reward`` plugin.

``reward=`` names one source or several, combined by ``combine=`` (:func:`reward_function` reads each):

- a folder: a reward model, a run or checkpoint trained with ``-m reward-model`` (scored with
  :func:`tuneforge.rlhf.reward.score`);
- ``module:function``: a plain callable ``function(prompts, responses) -> one float per response``, importable
  from the working directory or any installed package (a verifier, a format check, a unit test runner);
- ``world``: the embedded world's hidden preference (:func:`tuneforge.data.world.preference`), for tests and the
  demo only: a policy then trains on the very judge that evaluates it.

Every plugin of the run that implements ``tuneforge_reward`` adds its scores (see :mod:`tuneforge.hookspecs`).
:class:`Rewards` sums them all, and reports each source's mean, so a run shows what moved.
"""
from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tuneforge.engine.loop import load_model
from tuneforge.engine.registry import call_impl
from tuneforge.errors import ConfigError, PluginError
from tuneforge.rlhf.reward import ScalarHead, score
from tuneforge.rlhf.rollout import judge_for

__all__ = ["RewardFn", "reward_function", "Rewards"]

RewardFn = Callable[[list, list[str]], Sequence[float]]
HOOK = "tuneforge_reward"


def reward_function(spec: str, *, owner: str, data: str = "", device="cpu") -> tuple[str, RewardFn]:
    """``(label, fn)`` for a ``reward=`` value (see the module docstring); ``owner`` names the option in errors
    (e.g. ``"grpo"``), ``data`` is the run's ``--data`` (the world's judge reads conversations' last question)."""
    if spec == "world":
        return "world", judge_for("world", data, chat=True)
    if Path(spec).expanduser().exists():
        model = load_model(spec, device=str(device)).requires_grad_(False)
        if not isinstance(model.lm_head, ScalarHead):
            raise ConfigError(f"{owner}: reward={spec} is not a reward model (no scalar head); train one with "
                              "-m reward-model on rankings, or give module:function or world")
        return "model", lambda prompts, responses: score(model, prompts, responses)
    if ":" in spec and not spec.startswith(("/", ".", "~")):
        return spec, _callable(spec, owner)
    raise ConfigError(f"{owner}: reward={spec} is neither a folder (a reward model run or checkpoint) nor "
                      "module:function (a callable scoring responses) nor 'world' (the embedded world's hidden "
                      "preference)")


def _callable(spec: str, owner: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path:  # `python -m` puts the working directory first; the console script does not
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{owner}: reward={spec}: cannot import module '{module_name}' ({exc}); put it in the "
                          "working directory or install it") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ConfigError(f"{owner}: reward={spec}: module '{module_name}' ({getattr(module, '__file__', '?')}) has "
                          f"no callable '{attr}'; define def {attr.split('.')[-1]}(prompts, responses) -> list[float]")
    return fn


class Rewards:
    """The summed reward of an online objective's responses: its own ``reward=`` sources (combined by
    ``combine``, scaled by ``weight``) plus every ``tuneforge_reward`` plugin of the run.

    :param run: the run (its plugins and hook relay).
    :param specs: the objective's ``reward=`` values (none: only plugins).
    :param owner: the objective's name, for messages.
    :param weight: multiplies the combined ``reward=`` sources.
    :param combine: ``sum`` (separate criteria, e.g. a verifier and a format check), ``mean`` or ``min`` (an
        ensemble of reward models: ``min`` is the conservative one, which a policy can exploit only where every
        member errs alike).
    """

    def __init__(self, run, specs: list[str], *, owner: str, weight: float = 1.0, combine: str = "sum"):
        self.owner, self.weight, self.combine, self.specs = owner, weight, combine, list(specs)
        self.own = [reward_function(s, owner=owner, data=run.config.data, device=run.device) for s in self.specs]
        self.plugins = [(impl.plugin_name, impl.function) for impl in run.hook.tuneforge_reward.get_hookimpls()]
        if not self.own and not self.plugins:
            raise ConfigError(f"{owner} needs a reward: reward=RUN (a reward model), reward=module:function (a "
                              "callable scoring responses), reward=world (the embedded world's judge), or a plugin "
                              "implementing tuneforge_reward in the run (-m NAME)")
        self.run = run

    @property
    def sources(self) -> list[str]:
        own = [f"reward={spec}" + (" (a reward model)" if label == "model" else "")
               for spec, (label, _) in zip(self.specs, self.own)]
        if len(own) > 1:
            own = [f"the {self.combine} of " + ", ".join(own)]
        return own + [f"plugin {name}" for name, _ in self.plugins]

    def __call__(self, prompts: list, responses: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """``(total (N,) float32 on the run's device, {"reward/<source>": mean})`` for N responses."""
        n, device = len(responses), self.run.device
        total = torch.zeros(n, device=device)
        means: dict[str, float] = {}
        own = []
        for spec, (label, fn) in zip(self.specs, self.own):
            scores = _checked(fn(list(prompts), list(responses)), n, f"reward={spec}", device)
            own.append(scores)
            name = Path(spec).name if label == "model" else label.rsplit(":", 1)[-1]
            means[f"reward/{name}"] = float(scores.mean())
        if own:
            stacked = torch.stack(own)  # (S, N)
            combined = stacked.sum(0) if self.combine == "sum" else stacked.mean(0) if self.combine == "mean" \
                else stacked.min(0).values
            total += self.weight * combined
        for name, fn in self.plugins:
            out = call_impl(fn, prompts=list(prompts), responses=list(responses), run=self.run)
            if out is None:
                continue
            scores = _checked(out, n, f"plugin '{name}' (tuneforge_reward)", device, plugin=True)
            total += scores
            means[f"reward/{name}"] = float(scores.mean())
        return total, means


def _checked(scores, n: int, source: str, device, *, plugin: bool = False) -> torch.Tensor:
    """``scores`` as a (n,) float32 tensor, refusing a wrong count or a non-finite value with the source named."""
    error = PluginError if plugin else ConfigError
    try:
        t = torch.as_tensor(scores if torch.is_tensor(scores) else list(scores), dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise error(f"{source} must return one number per response, got {type(scores).__name__} ({exc})") from None
    if t.shape != (n,):
        raise error(f"{source} returned {tuple(t.shape)} scores for {n} responses; return one number per response")
    if not bool(torch.isfinite(t).all()):
        bad = next(i for i, x in enumerate(t.tolist()) if not math.isfinite(x))
        raise error(f"{source} returned a non-finite score ({t[bad].item()}) for response {bad}; rewards must be "
                    "finite numbers")
    return t.to(device)
