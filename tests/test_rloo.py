"""RLOO as an option of the PPO trainer (`ppo.rloo_k`): its advantages and loss by hand, and a
trainer that samples k responses a query and has no value head."""

import math

import pytest
import torch

from lm_human_preferences import experiments
from lm_human_preferences.training import ppo, train_policy
from lm_human_preferences.utils.errors import UserError


def test_rloo_advantages_by_hand():
    # Two queries × two responses, two tokens each: totals score − kl_coef · Σ (logprob − ref_logprob).
    scores = torch.tensor([1.0, 3.0, 0.0, 6.0])
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, -1.0], [-1.0, -1.0], [-1.0, -3.0]])
    ref_logprobs = torch.tensor([[-2.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    rewards, _ = ppo.compute_rewards(scores, logprobs, ref_logprobs, kl_coef=0.5)
    # totals: 1 − 0.5·1 = 0.5;  3 − 0.5·(−1) = 3.5;  0;  6 − 0.5·(−2) = 7
    torch.testing.assert_close(rewards.sum(1), torch.tensor([0.5, 3.5, 0.0, 7.0]))
    torch.testing.assert_close(ppo.rloo_advantages(rewards, 2), torch.tensor([-3.0, 3.0, -7.0, 7.0]))
    # one query × four responses: each less the mean of the other three (sum 11)
    torch.testing.assert_close(ppo.rloo_advantages(rewards, 4),
                               torch.tensor([0.5 - 10.5 / 3, 3.5 - 7.5 / 3, 0.0 - 11 / 3, 7.0 - 4 / 3]))


def test_rloo_loss_is_reinforce_at_the_sampling_policy_and_clips_beyond():
    hp = ppo.PpoHParams()
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]])
    advantages = torch.tensor([2.0, -1.0])
    logprobs = old.clone().requires_grad_(True)
    loss, stats = ppo.rloo_loss(old, advantages, logprobs, torch.ones(2, 3), hp)
    loss.backward()
    # ratio 1: the gradient of −A · log π per token, a mean over the 6 tokens
    torch.testing.assert_close(logprobs.grad, -advantages[:, None].expand(2, 3) / 6)
    assert stats["ppo/loss/total"] == stats["ppo/loss/policy"] and not any(k.startswith("ppo/val") for k in stats)
    # ratio 1.5 everywhere: A = 2 is clipped at 1.2, A = −1 is not
    loss, stats = ppo.rloo_loss(old, advantages, old + math.log(1.5), torch.ones(2, 3), hp)
    assert loss.item() == pytest.approx((3 * -2 * 1.2 + 3 * 1.5) / 6)
    assert stats["ppo/policy/clipfrac"].item() == pytest.approx(0.5)


def hparams(**ppo_overrides) -> train_policy.HParams:
    hp = experiments.get("train_policy", "test")
    hp.rewards.train_new_model, hp.rewards.trained_model = None, "unused"
    hp.ppo.total_episodes, hp.ppo.batch_size, hp.ppo.rloo_k = 32, 8, 4
    hp.run.log_interval = 100
    hp.ppo.override_from_dict(ppo_overrides)
    return hp


def fraction_of_a(queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    return (responses == 0).float().mean(1)


def test_an_rloo_trainer_samples_k_responses_a_query_without_a_value_head():
    hp = hparams()
    policy, ref_policy = train_policy.load_policies(hp.task, "cpu", heads=())
    trainer = train_policy.PPOTrainer(policy, ref_policy, fraction_of_a, hp, seed=1)
    rollouts = trainer.rollouts()
    queries = rollouts.queries.view(2, 4, -1)
    assert torch.equal(queries, queries[:, :1].expand_as(queries))  # 2 queries × 4 responses
    assert not torch.equal(queries[0, 0], queries[1, 0])
    assert rollouts.values is None and "value" not in policy.model.heads
    stats = trainer.learn(rollouts)
    assert not any(k.startswith("ppo/val") or k.startswith("ppo/returns") for k in stats)
    assert all(math.isfinite(v) for v in stats.values())


def test_an_rloo_run_saves_a_policy_without_a_value_head(tmp_path):
    hp = hparams()
    hp.run.save_dir = str(tmp_path / "run")
    policy, summary = train_policy.train(hp, reward_fn=fraction_of_a)
    assert summary["last"]["elapsed/episodes"] == 32 and "ppo/loss/value" not in summary["last"]
    assert not any(name.startswith("heads.") for name in policy.model.state_dict())


@pytest.mark.parametrize("overrides, message", [
    (dict(rloo_k=1), "rloo_k must be at least 2"),
    (dict(rloo_k=3), "whole groups of ppo.rloo_k=3 responses"),
])
def test_bad_configurations(overrides, message):
    with pytest.raises(UserError, match=message):
        train_policy.train(hparams(**overrides), reward_fn=fraction_of_a)


def test_rloo_needs_no_whitening_minibatch():
    """PPO's check that whitening has 8 samples a minibatch is not RLOO's (it whitens nothing)."""
    hparams(nminibatches=2).validate()
