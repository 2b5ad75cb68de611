"""The tie models and the DPO loss against their formulas computed by hand, and the reward model's per-ranking
weighting."""
import math

import pytest
import torch

from tuneforge.rlhf.preference import dpo_loss, outcome_logprobs, pair_nll


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("s_i, s_j, nu", [(0.9, 0.2, 0.5), (-1.0, 2.0, 2.0), (0.3, 0.3, 1.0)])
def test_davidson_matches_its_formula(s_i, s_j, nu):
    # Davidson (1970) with strengths π = e^s: P(i>j) = π_i / (π_i + π_j + ν √(π_i π_j)), P(tie) = ν √(π_i π_j) / (...)
    pi, pj = math.exp(s_i), math.exp(s_j)
    z = pi + pj + nu * math.sqrt(pi * pj)
    win, tie, lose = outcome_logprobs(torch.tensor(s_i - s_j), torch.tensor(math.log(nu)), "davidson")
    assert math.exp(win) == pytest.approx(pi / z, rel=1e-6)
    assert math.exp(tie) == pytest.approx(nu * math.sqrt(pi * pj) / z, rel=1e-6)
    assert math.exp(lose) == pytest.approx(pj / z, rel=1e-6)


@pytest.mark.parametrize("s_i, s_j, theta", [(0.9, 0.2, 1.5), (-1.0, 2.0, 3.0), (0.3, 0.3, 1.2)])
def test_rao_kupper_matches_its_formula(s_i, s_j, theta):
    # Rao & Kupper (1967): P(i>j) = π_i / (π_i + θ π_j), P(tie) = (θ² - 1) π_i π_j / ((π_i + θ π_j)(π_j + θ π_i))
    pi, pj = math.exp(s_i), math.exp(s_j)
    win, tie, lose = outcome_logprobs(torch.tensor(s_i - s_j), torch.tensor(math.log(theta)), "rao-kupper")
    assert math.exp(win) == pytest.approx(pi / (pi + theta * pj), rel=1e-6)
    assert math.exp(lose) == pytest.approx(pj / (pj + theta * pi), rel=1e-6)
    assert math.exp(tie) == pytest.approx((theta ** 2 - 1) * pi * pj / ((pi + theta * pj) * (pj + theta * pi)), rel=1e-5)


@pytest.mark.parametrize("model, tie", [("davidson", 0.4), ("rao-kupper", 0.7)])
def test_the_three_outcomes_sum_to_one_and_stay_finite(model, tie):
    d = torch.tensor([-80.0, -3.0, 0.0, 0.5, 80.0])
    probs = torch.stack([x.exp() for x in outcome_logprobs(d, torch.tensor(tie), model)])
    torch.testing.assert_close(probs.sum(0), torch.ones(5))
    assert all(torch.isfinite(x[1:-1]).all() for x in outcome_logprobs(d, torch.tensor(tie), model))


def test_without_a_tie_propensity_davidson_is_bradley_terry():
    d = torch.linspace(-4, 4, 9)
    win, _, _ = outcome_logprobs(d, torch.tensor(-40.0), "davidson")  # ν = e^-40
    torch.testing.assert_close(win, torch.nn.functional.logsigmoid(d))
    win, tie, _ = outcome_logprobs(d, None, "ignore")
    torch.testing.assert_close(win, torch.nn.functional.logsigmoid(d))
    assert torch.isinf(tie).all()


def test_pair_nll_scores_ties_with_the_tie_probability_and_the_rest_with_the_win_probability():
    d, log_nu = 0.8, math.log(0.6)
    margin = torch.tensor([d, d])
    nll = pair_nll(margin, torch.tensor([False, True]), torch.tensor(log_nu), "davidson")
    z = math.exp(d / 2) + math.exp(-d / 2) + 0.6
    assert float(nll[0]) == pytest.approx(-math.log(math.exp(d / 2) / z), rel=1e-6)
    assert float(nll[1]) == pytest.approx(-math.log(0.6 / z), rel=1e-6)
    assert float(pair_nll(margin, torch.tensor([False, False]), None, "ignore")[0]) == \
        pytest.approx(-math.log(_sigmoid(d)), rel=1e-6)


def test_tie_losses_pass_gradcheck_in_float64():
    d = torch.randn(6, dtype=torch.float64, requires_grad=True)
    tie = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    is_tie = torch.tensor([True, False, True, False, False, True])
    for model in ("davidson", "rao-kupper"):
        assert torch.autograd.gradcheck(lambda a, b: pair_nll(a, is_tie, b, model), (d, tie))


def test_a_tie_pulls_scores_together_and_a_strict_pair_apart():
    s = torch.tensor([1.0, 0.0], requires_grad=True)
    pair_nll(s[:1] - s[1:], torch.tensor([True]), torch.tensor(0.0), "davidson").sum().backward()
    assert s.grad[0] > 0 > s.grad[1]  # descending moves the better score down: towards a tie
    s.grad = None
    pair_nll(s[:1] - s[1:], torch.tensor([False]), torch.tensor(0.0), "davidson").sum().backward()
    assert s.grad[0] < 0 < s.grad[1]


def test_dpo_loss_matches_its_formula():
    pc, pr, rc, rr, beta = -10.0, -12.5, -11.0, -12.0, 0.3
    loss, margin = dpo_loss(torch.tensor([pc]), torch.tensor([pr]), torch.tensor([rc]), torch.tensor([rr]), beta)
    by_hand = beta * ((pc - rc) - (pr - rr))  # 0.3 * (1.0 - (-0.5)) = 0.45
    assert float(margin) == pytest.approx(0.45)
    assert float(loss) == pytest.approx(-math.log(_sigmoid(by_hand)), rel=1e-6)
    # at the reference the loss is log 2 whatever the log-probabilities
    loss0, _ = dpo_loss(torch.tensor([rc]), torch.tensor([rr]), torch.tensor([rc]), torch.tensor([rr]), beta)
    assert float(loss0) == pytest.approx(math.log(2))


def test_the_reward_model_loss_is_the_mean_over_rankings_of_each_rankings_mean_pair_loss():
    from tuneforge.plugins.reward_model import RewardModel
    from tuneforge.rlhf.reward import ScalarHead
    from tuneforge.data.rankings import Ranking, ranking_batch
    from tuneforge.models.tokenizer import ByteTokenizer

    long = Ranking("p.", [f"r{i}." for i in range(5)], [[0], [1, 2], [3], [4]])  # 9 strict pairs + 1 tie
    short = Ranking("q.", ["a.", "b."], [[0], [1]])  # 1 pair
    batch = ranking_batch([long, short], ByteTokenizer(), 64)
    scores = torch.tensor([2.0, 1.0, 1.2, 0.0, -1.0, 0.5, 0.7])

    class Fixed(torch.nn.Module):  # a "model" whose rewards are the scores above, read at each row's last token
        def __init__(self):
            super().__init__()
            self.lm_head = ScalarHead(1, "davidson")

        def forward_hidden(self, idx):
            h = torch.zeros(idx.size(0), idx.size(1), 1)
            h[torch.arange(idx.size(0)), batch["last"]] = scores[:, None]
            return h

    model = Fixed()
    with torch.no_grad():
        model.lm_head.proj.weight.fill_(1.0)
        model.lm_head.proj.bias.zero_()
    plugin = RewardModel(RewardModel.Options(ties="davidson"))
    loss, _ = plugin.tuneforge_loss(model, batch)
    s, log_nu = scores.tolist(), 0.0

    def nll(i, j, tie):
        d = s[i] - s[j]
        z = math.exp(d / 2) + math.exp(-d / 2) + math.exp(log_nu)
        return -math.log((math.exp(log_nu) if tie else math.exp(d / 2)) / z)

    strict, ties = long.pairs()
    long_mean = (sum(nll(i, j, False) for i, j in strict) + sum(nll(i, j, True) for i, j in ties)) / 10
    short_mean = nll(5, 6, False)  # rows 5, 6: the short ranking, a. over b.
    assert float(loss.detach()) == pytest.approx((long_mean + short_mean) / 2, rel=1e-5)
