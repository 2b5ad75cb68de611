"""What the objectives that steer a policy share (``reward-model``, ``ppo``, ``dpo``, ``finetune``): which blocks
train, the frozen reference policy, and log-probabilities of responses.

**Which weights move.** These objectives take ``layers=``: ``all``, a number N (the last N blocks, the final
norm and the head) or ``auto``: every weight when no other mechanism in the run says what trains, and only the
objective's own new modules (a scalar or value head) when one does (``lora``, ``adapter``, ``prompt-tuning``),
so ``-m lora -m dpo`` trains the LoRA and ``-m dpo`` alone trains the whole model.

**The reference.** RLHF keeps the policy close to where it started. When only per-task parts train (LoRA,
adapters, soft prompts), the reference is the same model with every such part switched off
(:func:`tuneforge.models.routing.base`): no second copy in memory. New LoRA and adapters start as the identity, so
policy and reference agree at step 0; a new soft prompt prepends tokens and does not, so a soft-prompt policy
starts a little away from its reference (the KL penalty then measures and holds that too). When base weights train, it is the
model the run started from (``--init`` rebuilt, or the seeded fresh init), loaded once and frozen.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge.models import routing
from tuneforge.models.lm_loss import target_logprobs
from tuneforge.parts.modules import task_modules
from tuneforge.errors import ConfigError
from tuneforge.engine.registry import plugin_hooks

__all__ = ["check_layers", "others_choose_params", "resolve_layers", "block_parameters", "untie_head", "prepare_policy",
           "policy_parameters", "Reference",
           "token_logprobs", "response_mask", "response_logprobs", "model_logprobs", "sequence_logprobs"]


def check_layers(layers: str, *, allow_auto: bool = True) -> str:
    """Validate a ``layers=`` option: ``all``, ``auto`` or a number of blocks."""
    if layers == "all" or layers.isdigit() or (allow_auto and layers == "auto"):
        return layers
    choices = "a number of blocks (0, 1, 2, ...), 'all'" + (" or 'auto'" if allow_auto else "")
    raise ValueError(f"layers must be {choices}, got {layers!r}")


def others_choose_params(run, me) -> bool:
    """Whether a plugin of the run other than ``me`` says what trains (implements ``tuneforge_trainable_params``)."""
    return any(p is not me and "tuneforge_trainable_params" in plugin_hooks(p) for p in run.plugins.values())


def resolve_layers(layers: str, run, me) -> str:
    """``auto`` -> ``0`` when another plugin chooses the parameters, else ``all``."""
    if layers != "auto":
        return layers
    return "0" if others_choose_params(run, me) else "all"


def block_parameters(model: nn.Module, layers: str, *, head: bool = True) -> list[nn.Parameter]:
    """The parameters of the last ``layers`` blocks, the final norm (when any block trains) and, with ``head``,
    the output head; ``all`` = every parameter of the model."""
    if layers == "all":
        return list(model.parameters())
    n = int(layers)
    if n > len(model.blocks):
        raise ConfigError(f"layers={n}, but the model has {len(model.blocks)} blocks; use layers=0..{len(model.blocks)} "
                          "or layers=all")
    modules = list(model.blocks[len(model.blocks) - n:]) + ([model.ln_f] if n else []) + ([model.lm_head] if head else [])
    return [p for m in modules for p in m.parameters()]


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own copy of the token embedding, so training the head leaves the input embedding
    frozen (tied, it would drag the embedding along)."""
    if model.lm_head.weight is model.tok_emb.weight:
        untied = nn.Linear(model.config.d_model, model.config.vocab_size, bias=False)
        untied.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.lm_head = untied.to(model.tok_emb.weight.device)


def prepare_policy(model: nn.Module, layers: str, run, me) -> None:
    """``tuneforge_modify_model`` of an objective with ``layers=``: when it trains the last N blocks (not all, not
    none), the head is untied from the input embedding, so the embedding stays frozen."""
    if resolve_layers(layers, run, me) not in ("all", "0"):
        untie_head(model)


def policy_parameters(model: nn.Module, layers: str, run, me) -> list[nn.Parameter]:
    """``tuneforge_trainable_params`` of an objective with ``layers=``: the policy weights it trains (``auto``
    resolved against the run's other plugins; none for ``0``)."""
    resolved = resolve_layers(layers, run, me)
    return block_parameters(model, resolved) if resolved != "0" else []


class Reference:
    """The frozen reference policy of a run; see the module docstring. Call :meth:`forward` as the model.

    :param model: the policy, parameters already frozen or trainable as the run decided.
    :param run: the run (to rebuild the starting model when base weights train).
    :param own: parameters the objective added beside the policy (a value head), which are not the policy.
    """

    def __init__(self, model: nn.Module, run, own: Iterable[nn.Parameter] = ()):
        parts = {id(p) for _, m in task_modules(model) for p in m.all_part_parameters()}
        skip = parts | {id(p) for p in own}
        moving = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]
        self.shared = not moving
        self.model = model
        if not self.shared:
            from tuneforge.engine.assemble import build_model  # the model the run started from, whatever it has become

            with torch.random.fork_rng(devices=[]):  # build_model seeds the global generator; keep the run's
                start, _, _ = build_model(run.config, run.device)
            self.model = start.to(run.device).eval().requires_grad_(False)
        self.note = ("the policy with every LoRA, adapter and soft prompt switched off (no copy)" if self.shared else
                     f"a frozen copy of the starting model ({len(moving)} base tensors train, e.g. {moving[0]})")

    def __call__(self, idx, **kwargs) -> torch.Tensor:
        """Logits (B, T, V) of the reference, without gradients."""
        with torch.no_grad():
            if self.shared:
                with routing.base():
                    return self.model(idx, **kwargs)
            return self.model(idx, **kwargs)

    def logprobs(self, ids, *, temperature: float = 1.0) -> torch.Tensor:
        """(B, T-1) log-probabilities of each next token of ``ids`` under the reference, without the (B, T, V)
        logits (:func:`tuneforge.models.lm_loss.target_logprobs`) and without gradients."""
        with torch.no_grad():
            if self.shared:
                with routing.base():
                    return target_logprobs(self.model, ids, temperature=temperature)
            return target_logprobs(self.model, ids, temperature=temperature)

    def generate(self, idx, max_new_tokens: int, **kwargs) -> torch.Tensor:
        if self.shared:
            with routing.base():
                return self.model.generate(idx, max_new_tokens, **kwargs)
        return self.model.generate(idx, max_new_tokens, **kwargs)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every t: (B, T-1), float32, from logits (B, T, V)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)


def response_mask(ids: torch.Tensor, start: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool, in the shifted frame of :func:`token_logprobs`: True where the predicted token lies in
    ``start[b]..last[b]`` (the response, its stop token included)."""
    t = torch.arange(1, ids.size(1), device=ids.device)[None, :]  # (1, T-1): index of the predicted token
    return (t >= start[:, None]) & (t <= last[:, None])


def response_logprobs(logits: torch.Tensor, ids: torch.Tensor, start: torch.Tensor, last: torch.Tensor
                      ) -> torch.Tensor:
    """Sum of the log-probabilities of each row's response tokens ``start..last``: (B,)."""
    return (token_logprobs(logits, ids) * response_mask(ids, start, last)).sum(-1)


def model_logprobs(policy, ids: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """(B, T-1) log p(ids[:, t+1] | ids[:, :t+1]) under ``policy`` (a model, or a :class:`Reference`), float32,
    computed from the hidden states without the (B, T, V) logits where the head is a plain linear map; equal to
    ``token_logprobs(policy(ids) / temperature, ids)``."""
    if isinstance(policy, Reference):
        return policy.logprobs(ids, temperature=temperature)
    return target_logprobs(policy, ids, temperature=temperature)


def sequence_logprobs(policy, ids: torch.Tensor, start: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of each row's response tokens ``start..last`` under ``policy`` (a model or a
    :class:`Reference`): (B,); ``response_logprobs(policy(ids), ids, start, last)`` without the logits."""
    return (model_logprobs(policy, ids) * response_mask(ids, start, last)).sum(-1)
