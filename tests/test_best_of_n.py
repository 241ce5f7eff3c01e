"""Best-of-n sampling (evaluation/best_of_n.py): the subset estimator by hand and by brute force,
the KL formula against a Monte-Carlo estimate on the tiny `test` model, and the whole evaluation."""

import itertools
import math

import numpy as np
import pytest
import torch

from lm_human_preferences import experiments
from lm_human_preferences.evaluation import best_of_n
from lm_human_preferences.labeling import mock_labelers
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.task.policy import load_policy
from lm_human_preferences.training import train_reward


def test_estimates_by_hand():
    proxy, true = np.array([[0.1, 0.3, 0.2]]), np.array([[1.0, 2.0, 3.0]])
    # n = 2: the subsets {0, 1}, {0, 2}, {1, 2} pick 1, 2, 1 (true 2, 3, 2)
    n1, n2, n3 = best_of_n.estimates(proxy, true, [1, 2, 3])
    assert (n1["true_score"], n1["proxy_score"], n1["kl"]) == pytest.approx((2.0, 0.2, 0.0))
    assert (n2["true_score"], n2["proxy_score"]) == pytest.approx((7 / 3, 0.8 / 3))
    assert n2["kl"] == pytest.approx(math.log(2) - 1 / 2)
    assert (n3["true_score"], n3["proxy_score"], n3["kl"]) == pytest.approx((2.0, 0.3, math.log(3) - 2 / 3))


def test_estimates_are_the_mean_over_every_subset():
    rng = np.random.default_rng(0)
    proxy, true = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    for n in range(1, 8):
        picks = [[t[max(subset, key=lambda i: p[i])] for subset in itertools.combinations(range(7), n)]
                 for p, t in zip(proxy, true)]
        assert best_of_n.estimates(proxy, true, [n])[0]["true_score"] == pytest.approx(np.mean(picks))


def test_the_kl_formula_against_a_monte_carlo_estimate():
    """On the `test` model, whose 729 two-token responses can be enumerated: the exact best-of-n
    probabilities F(y)ⁿ − F⁻(y)ⁿ (F the initial policy's probability of a reward ≤ y's, F⁻ < y's)
    give log π_bon(y) − log π(y) for each sampled response; its best-of-n mean over sampled
    pools is the Monte-Carlo estimate of KL(best-of-n ‖ π). The formula is exact without ties
    and an upper bound on the exact KL, which here sits just below it (no response has much mass)."""
    task = experiments.tiny_task()
    task.response_length = 2
    policy = load_policy("test", task)
    torch.manual_seed(0)
    reward_model, _ = train_reward.new_reward_model(task, "cpu")
    query = torch.tensor([[3, 4]])
    everything = torch.cartesian_prod(torch.arange(27), torch.arange(27))
    with torch.no_grad():
        logp = policy.analyze_responses(query.expand(729, -1), everything, entropies=False)["logprobs"].double().sum(1)
        rewards = reward_model(query.expand(729, -1), everything).double()
    assert logp.exp().sum().item() == pytest.approx(1.0)
    order = torch.argsort(rewards)
    below_or_equal = torch.cumsum(logp.exp()[order], 0)
    below = below_or_equal - logp.exp()[order]

    pools, pool = 200, 32
    responses, proxy, _, _ = best_of_n.sample_pool(policy, reward_model, task, query.expand(pools, -1), pool,
                                                   torch.Generator().manual_seed(1), None)
    index = (responses[:, 0] * 27 + responses[:, 1]).view(pools, pool)
    for n in (2, 4, 8):
        bon = torch.empty(729, dtype=torch.float64)
        bon[order] = below_or_equal ** n - below ** n
        log_ratio = (bon.log() - logp)[index].numpy()
        exact = (bon * (bon.log() - logp)).sum().item()
        per_pool = [best_of_n.estimates(proxy[i:i + 1].double().numpy(), log_ratio[i:i + 1], [n])[0]["true_score"]
                    for i in range(pools)]
        estimate, error = np.mean(per_pool), np.std(per_pool) / math.sqrt(pools)
        formula = best_of_n.kl_best_of_n(n)
        print(f"n={n}: formula {formula:.4f}, exact {exact:.4f}, Monte Carlo {estimate:.4f} ± {error:.4f}")
        assert exact <= formula
        assert abs(estimate - formula) <= 4 * error + (formula - exact)


def test_best_of_n_on_the_kjv_model():
    task = experiments.kjv_task()
    policy = load_policy("kjv", task)
    torch.manual_seed(0)
    reward_model, _ = train_reward.new_reward_model(task, "cpu")
    results = best_of_n.best_of_n(policy, reward_model, task, "sentiment", [1, 4], seed=3, n_queries=4)
    assert [r["n"] for r in results] == [1, 4] and [r["kl"] for r in results] == [0.0, pytest.approx(math.log(4) - 0.75)]
    # the same pool, drawn again with the same seed: n = 4 is the proxy's pick of the 4, n = 1 the mean
    queries = next(lm_tasks.query_batches(task, policy.encoding, 4, mode="test"))
    _, proxy, query_texts, texts = best_of_n.sample_pool(policy, reward_model, task, queries, 4,
                                                         torch.Generator().manual_seed(3), None)
    true = np.array([mock_labelers.sentiment(q, t) for q, t in zip(query_texts, texts)]).reshape(4, 4)
    picked = true[np.arange(4), proxy.argmax(1).numpy()]
    assert results[0]["true_score"] == pytest.approx(true.mean())
    assert results[1]["true_score"] == pytest.approx(picked.mean())
    assert results[1]["proxy_score"] == pytest.approx(proxy.max(1).values.mean().item())

