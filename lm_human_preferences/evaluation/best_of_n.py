"""Best-of-n sampling: the baseline that trains nothing (Stiennon et al. 2020, Gao et al. 2022).

For each test query, n responses from the initial policy; the reward model (the proxy) picks
the one it scores highest, and the mock labeler scores that one (the true score). When no two
responses get the same reward, the KL of the best-of-n policy from the initial one is

    KL(best-of-n ‖ initial) = log n − (n − 1)/n

(Stiennon et al. 2020; Beirami et al. 2024 show it is an upper bound in general,
reached as the largest probability of a single response goes to 0 — tests/test_best_of_n.py
compares it with a Monte-Carlo estimate on a tiny model).

`best_of_n` samples one pool of N = max(ns) responses a query, scores the pool once, and for
every n ≤ N takes the expectation over the pool's n-subsets (an unbiased estimate, as Nakano et
al. 2021 did): with the pool sorted by proxy reward, the i-th lowest (from 1) is the best of a
random n-subset with probability C(i − 1, n − 1) / C(N, n). Every n then costs nothing beyond
the pool, with a lower variance than one draw of n responses a query.
"""

import math

import numpy as np
import torch

from lm_human_preferences.labeling import collect, mock_labelers
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.training import ppo
from lm_human_preferences.training.ppo import RewardFn
from lm_human_preferences.utils.errors import UserError

QUERIES = 256  # test queries, as the verdict's


def kl_best_of_n(n: int) -> float:
    """log n − (n − 1)/n: the KL (nats per response) of best-of-n sampling from the sampling policy."""
    return math.log(n) - (n - 1) / n


def subset_weights(pool: int, n: int) -> np.ndarray:
    """[pool]: the probability that the i-th lowest of `pool` responses is the best of a uniformly
    random n-subset of them, C(i − 1, n − 1) / C(pool, n)."""
    total = math.comb(pool, n)
    return np.array([math.comb(i, n - 1) / total for i in range(pool)])


def estimates(proxy: np.ndarray, true: np.ndarray, ns: list[int]) -> list[dict]:
    """For every n: the mean over queries of the expected proxy and true score of the best of n,
    from pools [queries, N] of proxy rewards and true scores (n ≤ N), and the KL formula's value."""
    order = np.argsort(proxy, axis=1, kind="stable")
    proxy_sorted, true_sorted = np.take_along_axis(proxy, order, 1), np.take_along_axis(true, order, 1)
    out = []
    for n in ns:
        weights = subset_weights(proxy.shape[1], n)
        out.append(dict(n=n, true_score=float((true_sorted @ weights).mean()),
                        proxy_score=float((proxy_sorted @ weights).mean()), kl=kl_best_of_n(n)))
    return out


@torch.no_grad()
def sample_pool(policy: Policy, reward_fn: RewardFn, task: lm_tasks.TaskHParams, queries: torch.Tensor, pool: int,
                generator: torch.Generator, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """`pool` responses to each query, truncated as the task says (rows: each query's pool in turn),
    their proxy scores [queries, pool] as PPO scores them (`ppo.score`: the task's penalty for a
    response that lacks the truncate token), and the query and response texts of every row."""
    repeated = queries.repeat_interleave(pool, dim=0)
    responses, query_texts, texts = collect.sample_texts(policy, task, repeated, generator, chunk_size)
    scores, _ = ppo.score(task, reward_fn, policy.encoding.padding_token, repeated, responses, chunk_size)
    return responses, scores.view(len(queries), pool), query_texts, texts


def best_of_n(policy: Policy, reward_fn: RewardFn, task: lm_tasks.TaskHParams, labeler_name: str, ns: list[int],
              seed: int, n_queries: int = QUERIES, chunk_size: int | None = None) -> list[dict]:
    """[{n, true_score, proxy_score, kl}] of best-of-n sampling from `policy` (the initial policy)
    with `reward_fn` (the reward model) as the proxy and the mock labeler `labeler_name` as the
    judge, on the first `n_queries` test queries, every n from one pool of max(ns) a query."""
    if not ns or any(not isinstance(n, int) or n < 1 for n in ns):
        raise UserError(f"best-of-n needs positive whole numbers of responses, got {ns}")
    judge = mock_labelers.get(labeler_name)
    queries = next(lm_tasks.query_batches(task, policy.encoding, n_queries, mode="test", device=policy.device))
    generator = torch.Generator(policy.device).manual_seed(seed)
    _, proxy, query_texts, texts = sample_pool(policy, reward_fn, task, queries, max(ns), generator, chunk_size)
    true = np.array([judge(q, r) for q, r in zip(query_texts, texts)]).reshape(proxy.shape)
    return estimates(proxy.double().cpu().numpy(), true, ns)
