"""Probability models of pairwise preferences with ties, and the DPO loss. Formulas in docs/rlhf.md.

A reward model gives each response a score ``s``; for a pair (i, j) let ``d = s_i - s_j``. Three models of
what a labeller says about the pair:

- **Bradley–Terry** (no ties): ``P(i > j) = σ(d)``. Used with ``ties=ignore``, which drops tied pairs.
- **Davidson** (1970): ``P(i > j) = e^{d/2} / Z``, ``P(i = j) = ν / Z``, ``P(j > i) = e^{-d/2} / Z`` with
  ``Z = e^{d/2} + e^{-d/2} + ν`` and ``ν ≥ 0`` a learned tie propensity. ``ν = 0`` is Bradley–Terry exactly;
  a tie is likeliest when the scores are equal, where ``P(i = j) = ν / (2 + ν)``.
- **Rao–Kupper** (1967): ``P(i > j) = σ(d - log θ)``, ``P(j > i) = σ(-d - log θ)``, ``P(i = j)`` the rest,
  with ``θ ≥ 1`` learned; ``θ = 1`` is Bradley–Terry.

Strict pairs are scored with the tie model's own win probability (not plain ``σ(d)``), so the three outcomes
of every pair sum to one and the tie parameter is fitted against strict pairs as well as tied ones: with plain
Bradley–Terry on strict pairs nothing would stop ``ν`` from growing without bound.

All functions take the margin ``d`` (any shape) and a scalar tie parameter tensor ``tie`` (``log ν`` for
Davidson, ``log θ`` for Rao–Kupper, which the caller keeps positive), and return log-probabilities.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TIE_MODELS", "outcome_logprobs", "pair_nll", "dpo_loss", "pair_right"]

TIE_MODELS = ("davidson", "rao-kupper", "ignore")


def outcome_logprobs(margin: torch.Tensor, tie: torch.Tensor | None, model: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log P(i > j), log P(i = j), log P(j > i))`` for margins ``d = s_i - s_j``; each the shape of ``margin``.

    ``model``: ``davidson`` (``tie`` = log ν), ``rao-kupper`` (``tie`` = log θ, > 0) or ``ignore``
    (Bradley–Terry; the tie log-probability is -inf).
    """
    d = margin.to(torch.promote_types(margin.dtype, torch.float32))  # float32 at least; float64 stays (gradcheck)
    if model == "ignore":
        return F.logsigmoid(d), torch.full_like(d, float("-inf")), F.logsigmoid(-d)
    if model == "davidson":
        log_nu = tie.to(d.dtype).expand_as(d)
        log_z = torch.logsumexp(torch.stack([d / 2, -d / 2, log_nu]), dim=0)
        return d / 2 - log_z, log_nu - log_z, -d / 2 - log_z
    if model == "rao-kupper":
        log_theta = tie.to(d.dtype)
        win, lose = F.logsigmoid(d - log_theta), F.logsigmoid(-d - log_theta)
        # P(tie) = (θ² - 1) e^d / ((e^d + θ)(1 + θ e^d)), in logs so large |d| stays finite
        tied = (torch.log(torch.expm1(2 * log_theta)) + d - torch.logaddexp(d, log_theta.expand_as(d))
                - torch.logaddexp(torch.zeros_like(d), log_theta + d))
        return win, tied, lose
    raise ValueError(f"unknown tie model {model!r}; choose one of {', '.join(TIE_MODELS)}")


def pair_nll(margin: torch.Tensor, is_tie: torch.Tensor, tie: torch.Tensor | None, model: str) -> torch.Tensor:
    """Negative log-likelihood of each observed pair: ``margin`` = score of the better minus the worse (for a
    tie, of either order: every model here is symmetric in a tie), ``is_tie`` (same shape) bool."""
    win, tied, _ = outcome_logprobs(margin, tie, model)
    if model == "ignore":
        return -win  # tied pairs were dropped before; any left are scored as if they were not there
    return -torch.where(is_tie, tied, win)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss ``-log σ(β[(π_c - ρ_c) - (π_r - ρ_r)])`` from sequence log-probabilities of the
    chosen and rejected responses under the policy (π) and the frozen reference (ρ); also returns the margin
    inside the σ (positive when the policy prefers the chosen response more than the reference does)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


def pair_right(margin: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where ``margin`` (better minus worse) orders it as labelled, 0.5 where the scores tie (a coin
    flip would), 0 otherwise. Its mean is the pair accuracy reward models and DPO report."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()
