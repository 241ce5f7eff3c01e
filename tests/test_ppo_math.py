import math

import pytest
import torch

from lm_human_preferences.task import lm_tasks
from lm_human_preferences.training.ppo import (AdaptiveKLController, FixedKLController, PpoHParams,
                                              advantages_and_returns, compute_rewards, minibatch_stats, ppo_loss,
                                              rollout_stats, Rollouts, score)
from lm_human_preferences.training.train_policy import NegativeKLWatch
from lm_human_preferences.utils import core

REWARDS = torch.tensor([[1.0, 0.0, 2.0]])
VALUES = torch.tensor([[0.5, 1.0, 0.0]])


def test_gae_gamma_1_without_reward_whitening():
    # t=2: δ = 2 − 0 = 2, A = 2;  t=1: δ = 0 + 0 − 1 = −1, A = −1 + 0.95·2 = 0.9
    # t=0: δ = 1 + 1 − 0.5 = 1.5, A = 1.5 + 0.95·0.9 = 2.355
    advantages, returns = advantages_and_returns(REWARDS, VALUES, gamma=1.0, lam=0.95, whiten_rewards=False)
    torch.testing.assert_close(returns, torch.tensor([[2.855, 1.9, 2.0]]))
    torch.testing.assert_close(advantages, core.whiten(torch.tensor([[2.355, 0.9, 2.0]])))


def test_gae_gamma_below_1():
    # t=2: A = 2;  t=1: δ = 0 + 0.9·0 − 1 = −1, A = −1 + 0.72·2 = 0.44
    # t=0: δ = 1 + 0.9·1 − 0.5 = 1.4, A = 1.4 + 0.72·0.44 = 1.7168
    _, returns = advantages_and_returns(REWARDS, VALUES, gamma=0.9, lam=0.8, whiten_rewards=False)
    torch.testing.assert_close(returns, torch.tensor([[2.2168, 1.44, 2.0]]))


def test_gae_with_reward_whitening_keeps_the_mean():
    # rewards [1, 0, 2]: mean 1, var 2/3 → [1, 1 − 1.2247449, 1 + 1.2247449]
    # t=2: A = 2.2247449; t=1: δ = −1.2247449, A = −1.2247449 + 0.95·2.2247449 = 0.8887628
    # t=0: δ = 1.5, A = 1.5 + 0.95·0.8887628 = 2.3443247
    _, returns = advantages_and_returns(REWARDS, VALUES, gamma=1.0, lam=0.95, whiten_rewards=True)
    torch.testing.assert_close(returns, torch.tensor([[2.8443247, 1.8887628, 2.2247449]]))


def test_ppo_loss_clipping_by_hand():
    ppo = PpoHParams()
    old_logprobs = torch.zeros(1, 2)
    logprobs = torch.full((1, 2), math.log(1.5))  # ratio 1.5 on both tokens
    advantages = torch.tensor([[1.0, -1.0]])
    old_values = torch.zeros(1, 2)
    vpred = torch.tensor([[0.5, 0.1]])
    returns = torch.ones(1, 2)
    entropies = torch.tensor([[1.0, 3.0]])
    loss, stats = ppo_loss(old_logprobs, old_values, advantages, returns, logprobs, vpred, entropies, ppo)
    # A=+1: −1.5 vs −1.2 (clipped) → −1.2, clipped;  A=−1: 1.5 vs 1.2 → 1.5, not clipped
    assert stats["ppo/loss/policy"].item() == pytest.approx((-1.2 + 1.5) / 2)
    assert stats["ppo/policy/clipfrac"].item() == pytest.approx(0.5)
    # v=0.5 clipped to 0.2: max(0.25, 0.64) = 0.64;  v=0.1 inside: 0.81 both
    assert stats["ppo/loss/value"].item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert stats["ppo/val/clipfrac"].item() == pytest.approx(0.5)
    assert stats["ppo/val/error"].item() == pytest.approx((0.25 + 0.81) / 2)
    assert stats["ppo/val/vpred"].item() == pytest.approx(0.3)
    assert stats["ppo/policy/approxkl"].item() == pytest.approx(0.5 * math.log(1.5) ** 2)
    assert stats["ppo/policy/entropy"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(0.15 + 0.1 * 0.3625)
    assert stats["ppo/loss/total"].item() == pytest.approx(loss.item())


def test_ppo_loss_gradient_flows_only_through_new_outputs():
    ppo = PpoHParams()
    logprobs = torch.zeros(2, 3, requires_grad=True)
    vpred = torch.zeros(2, 3, requires_grad=True)
    loss, _ = ppo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3),
                       logprobs, vpred, torch.zeros(2, 3), ppo)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.full((2, 3), -1 / 6))  # d(−A·ratio)/dlogp = −1 / n
    torch.testing.assert_close(vpred.grad, torch.full((2, 3), 0.1 * 0.5 * 2 * -1 / 6))


def test_minibatch_stats():
    returns = torch.tensor([[1.0, 3.0]])
    stats = minibatch_stats(returns, torch.tensor([[0.0, 2.0]]))
    assert stats["ppo/returns/mean"].item() == 2.0 and stats["ppo/returns/var"].item() == 1.0
    assert stats["ppo/val/mean"].item() == 1.0 and stats["ppo/val/var"].item() == 1.0


def test_compute_rewards():
    rewards, non_score = compute_rewards(torch.tensor([2.0]), torch.tensor([[-1.0, -2.0]]),
                                         torch.tensor([[-1.5, -1.0]]), kl_coef=0.1)
    torch.testing.assert_close(non_score, torch.tensor([[-0.05, 0.1]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 2.1]]))


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.15, target=6.0, horizon=10000)
    expected = 0.15
    for kl, error in [(10.0, 0.2), (3.0, -0.2), (6.6, 0.1), (6.0, 0.0), (5.7, -0.05)]:
        ctl.update(kl, n_steps=512)
        expected *= 1 + error * 512 / 10000
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.15 * 1.01024 * 0.98976 * 1.00512 * 1.0 * 0.99744, rel=1e-12)
    fixed = FixedKLController(0.2)
    fixed.update(100.0, 512)
    assert fixed.value == 0.2


def test_score_truncation_and_penalty():
    task = lm_tasks.TaskHParams(query_length=2, query_dataset="test", response_length=6,
                                truncate_token=26, truncate_after=2, penalty_reward_value=-1.0)
    seen = {}

    def reward_fn(queries, responses):
        seen["responses"] = responses
        return torch.full((len(responses),), 5.0)

    responses = torch.tensor([
        [1, 2, 3, 4, 5, 6],      # no truncate token → penalty
        [26, 26, 3, 4, 5, 6],    # only before truncate_after → penalty
        [1, 2, 26, 4, 26, 6],    # two tokens → truncated after the first, scored
        [1, 2, 3, 4, 5, 26],     # at the last index → scored
    ])
    scores, post = score(task, reward_fn, 27, torch.zeros(4, 2, dtype=torch.long), responses)
    assert scores.tolist() == [-1.0, -1.0, 5.0, 5.0]
    assert post[2].tolist() == [1, 2, 26, 27, 27, 27]
    assert torch.equal(seen["responses"], post)  # the reward model sees the truncated responses


def test_kl_diagnostics_by_hand():
    """objective/kl is the original's log-ratio sum; k3 and the negative share are computed beside it."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    ref_logprobs = torch.tensor([[-1.5, -1.0], [-0.5, -1.0]])  # log-ratios [[0.5, -1], [0, 0.5]]
    zeros = torch.zeros(2, 2)
    rollouts = Rollouts(queries=zeros, responses=zeros, postprocessed=zeros, logprobs=logprobs,
                        ref_logprobs=ref_logprobs, values=zeros, scores=torch.tensor([1.0, 3.0]), rewards=zeros,
                        non_score_reward=torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
    stats = {k: v.item() for k, v in rollout_stats(rollouts).items()}

    def k3(r: float) -> float:  # (p_ref/p − 1) − log(p_ref/p), with log(p/p_ref) = r
        return math.exp(-r) - 1 + r

    assert stats["objective/kl"] == pytest.approx(((0.5 - 1.0) + (0.0 + 0.5)) / 2)
    assert stats["objective/kl_k3"] == pytest.approx(((k3(0.5) + k3(-1.0)) + (k3(0.0) + k3(0.5))) / 2)
    assert stats["objective/kl_negative_share"] == 0.5
    assert stats["objective/entropy"] == pytest.approx((3.0 + 1.0) / 2)
    assert stats["objective/score"] == 2.0
    assert stats["objective/score_total"] == pytest.approx((0.3 + 0.7) / 2 + 2.0)


def test_negative_kl_warns_once_after_several_updates(capsys):
    watch = NegativeKLWatch(updates=3)
    for kl in (-0.1, -0.2, 0.1, -0.1, -0.1):  # the positive update restarts the count
        watch.see({"objective/kl": kl, "objective/kl_k3": 0.01})
    assert "negative" not in capsys.readouterr().out
    for kl in (-0.3, -0.4, -0.5):
        watch.see({"objective/kl": kl, "objective/kl_k3": 0.01})
    out = capsys.readouterr().out
    assert out.count("warning: the mean KL") == 1 and "temperature" in out and "reference policy" in out
