"""The PPO math of one update, in the order an update runs it (docs/original.md, "PPO").

1. sample responses to a batch of queries (the policy; see `train_policy.PPOTrainer.rollouts`),
2. `score` them: truncate, reward model, penalty for responses without the truncate token,
3. `compute_rewards`: per-token −kl_coef · (logprob − ref_logprob), plus the score at the end,
4. `advantages_and_returns`: GAE over the response tokens,
5. `ppo_loss` on shuffled minibatches, `noptepochs` times; `minibatch_stats` beside it,
6. `rollout_stats`, then the KL controller's `update` from the batch's mean KL.

Everything here is a pure function of tensors and hparams, except the controllers' coefficient.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch

from lm_human_preferences.task import lm_tasks
from lm_human_preferences.utils import core, hyperparams
from lm_human_preferences.utils.errors import UserError

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (queries, responses) -> scores [batch]


@dataclass
class PpoHParams(hyperparams.HParams):
    total_episodes: int = 2000000  # rollouts over the whole run; updates = ceil(total / batch_size)
    batch_size: int = 64  # rollouts per update, global (split over ranks)
    nminibatches: int = 1  # gradient steps per epoch; each takes batch_size / nminibatches rollouts
    noptepochs: int = 4  # passes over each batch of rollouts
    lr: float = 5e-6  # Adam's learning rate at the first update, annealed linearly to 0 over the run
    vf_coef: float = 0.1  # weight of the value loss in the total loss
    cliprange: float = 0.2  # the probability ratio is clipped to 1 ± cliprange
    cliprange_value: float = 0.2  # the value prediction is clipped to the old value ± cliprange_value
    gamma: float = 1.0  # discount over response tokens
    lam: float = 0.95  # GAE's λ
    whiten_rewards: bool = True  # scale per-token rewards to unit variance (mean kept) before GAE
    # RLOO (Ahmadian et al. 2024, "Back to Basics") in place of GAE and the value head: rloo_k
    # responses a query; a response's advantage is its total reward (step 3's, KL penalty included)
    # less the mean total of the other rloo_k − 1 responses to its query (`rloo_advantages`), and
    # the loss is the clipped policy loss alone (`rloo_loss`). No value head, so vf_coef,
    # cliprange_value, gamma, lam and whiten_rewards do not apply. With noptepochs 1 and
    # nminibatches 1 the update is the paper's REINFORCE step. None: PPO, as the original.
    rloo_k: Optional[int] = None

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        for name in ("total_episodes", "batch_size", "nminibatches", "noptepochs"):
            value = getattr(self, name)
            if value <= 0:
                raise UserError(f"{_prefix}{name} must be positive, got {value}")
        for name in ("lr", "vf_coef"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise UserError(f"{_prefix}{name} must be a finite number ≥ 0, got {value}")
        for name in ("cliprange", "cliprange_value"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise UserError(f"{_prefix}{name} must be a positive number, got {value}")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise UserError(f"{_prefix}{name} must be between 0 and 1, got {value}")
        if self.rloo_k is not None and self.rloo_k < 2:
            raise UserError(f"{_prefix}rloo_k must be at least 2 (a leave-one-out baseline needs another "
                            f"response to the query), got {self.rloo_k}; or none for PPO")


@dataclass
class AdaptiveKLParams(hyperparams.HParams):
    target: Optional[float] = None  # the KL (nats per response) the coefficient steers towards
    horizon: int = 10000  # in episodes: how fast the coefficient moves (see AdaptiveKLController)

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        if self.target is None or not 0 < self.target < float("inf"):
            raise UserError(f"{_prefix.rstrip('.') or 'adaptive_kl'} needs a positive target, "
                            f"e.g. --{_prefix}target 6.0")
        if self.horizon <= 0:
            raise UserError(f"{_prefix}horizon must be positive (in episodes), got {self.horizon}")


# -- the KL coefficient


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """coef *= 1 + clip(kl / target − 1, −0.2, 0.2) · n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current: float, n_steps: int) -> None:
        proportional_error = float(np.clip(current / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_steps / self.horizon


def kl_controller(kl_coef: float, adaptive_kl: AdaptiveKLParams | None) -> FixedKLController | AdaptiveKLController:
    if adaptive_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, adaptive_kl.target, adaptive_kl.horizon)


# -- one batch of rollouts


@dataclass
class Rollouts:
    """One update's batch, as sampled and scored ([batch] or [batch, response_length] tensors)."""

    queries: torch.Tensor  # [batch, query_length] token ids
    responses: torch.Tensor  # [batch, response_length] as sampled (what PPO trains on)
    postprocessed: torch.Tensor  # the responses truncated after the truncate token (what was scored)
    logprobs: torch.Tensor  # the policy's log-probs of the response tokens when they were sampled
    ref_logprobs: torch.Tensor  # the reference (initial) policy's
    values: torch.Tensor | None  # the value head's predictions, float32 (None under RLOO: no value head)
    scores: torch.Tensor  # [batch] the reward model's (or the penalty)
    rewards: torch.Tensor  # per-token rewards (compute_rewards)
    non_score_reward: torch.Tensor  # their KL part

    def __getitem__(self, index: torch.Tensor) -> "Rollouts":
        """The rollouts at `index` (a minibatch)."""
        return Rollouts(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                           for f in fields(self)})


def score(task: lm_tasks.TaskHParams, reward_fn: RewardFn, padding_token: int, queries: torch.Tensor,
          responses: torch.Tensor, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, postprocessed responses): responses are truncated after the truncate token;
    those without one get `penalty_reward_value` instead of the reward function's score."""
    postprocessed = lm_tasks.postprocess_responses(task, responses, padding_token)
    with torch.no_grad():
        scores = core.map_chunks(reward_fn, chunk_size, queries, postprocessed).float()
    penalty = torch.full_like(scores, task.penalty_reward_value)
    return torch.where(lm_tasks.has_truncate_token(task, postprocessed), scores, penalty), postprocessed


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards −kl_coef · (logprob − ref_logprob), plus the score at the last token."""
    non_score_reward = -kl_coef * (logprobs - ref_logprobs)
    rewards = non_score_reward.clone()
    rewards[:, -1] += scores
    return rewards, non_score_reward


# -- learning from them


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float,
                           whiten_rewards: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the response tokens. Returns (whitened advantages, returns = advantages + values)."""
    if whiten_rewards:
        rewards = core.whiten(rewards, shift_mean=False)
    length = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return core.whiten(advantages), returns


def ppo_loss(old_logprobs: torch.Tensor, old_values: torch.Tensor, advantages: torch.Tensor,
             returns: torch.Tensor, logprobs: torch.Tensor, vpred: torch.Tensor, entropies: torch.Tensor,
             ppo: PpoHParams) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO loss pg + vf_coef · vf over [batch, response_length] tensors.

    Every stat is a mean over elements, so stats of equal-sized row chunks average exactly.
    """
    vpredclipped = torch.clamp(vpred, old_values - ppo.cliprange_value, old_values + ppo.cliprange_value)
    vf_losses1 = (vpred - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * torch.max(vf_losses1, vf_losses2).mean()
    vf_clipfrac = (vf_losses2 > vf_losses1).float().mean()

    pg_loss, pg_stats = policy_loss(old_logprobs, advantages, logprobs, entropies, ppo.cliprange)

    loss = pg_loss + ppo.vf_coef * vf_loss
    stats = {
        "ppo/loss/policy": pg_loss, "ppo/loss/value": vf_loss, "ppo/loss/total": loss, **pg_stats,
        "ppo/val/vpred": vpred.mean(), "ppo/val/error": ((vpred - returns) ** 2).mean(), "ppo/val/clipfrac": vf_clipfrac,
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def policy_loss(old_logprobs: torch.Tensor, advantages: torch.Tensor, logprobs: torch.Tensor, entropies: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate max(−A·ratio, −A·clip(ratio, 1 ± cliprange)), a mean over elements; and
    the policy's stats (entropy, approximate KL to the sampling policy, clip fraction)."""
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.max(pg_losses, pg_losses2).mean()
    pg_clipfrac = (pg_losses2 > pg_losses).float().mean()
    return pg_loss, {"ppo/policy/entropy": entropies.mean(), "ppo/policy/approxkl": 0.5 * (logratio ** 2).mean(),
                     "ppo/policy/clipfrac": pg_clipfrac}


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """[batch] RLOO advantages of responses whose rows come k to a query, in turn: a response's total
    reward (its per-token rewards summed: the score less the KL penalty) less the mean total of the
    other k − 1 responses to its query."""
    totals = rewards.sum(dim=1).view(-1, k)
    baseline = (totals.sum(dim=1, keepdim=True) - totals) / (k - 1)
    return (totals - baseline).flatten()


def rloo_loss(old_logprobs: torch.Tensor, advantages: torch.Tensor, logprobs: torch.Tensor, entropies: torch.Tensor,
              ppo: PpoHParams) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`policy_loss` with each response's RLOO advantage [batch] at every one of its tokens; no value loss."""
    loss, stats = policy_loss(old_logprobs, advantages.unsqueeze(1).expand_as(logprobs), logprobs, entropies,
                              ppo.cliprange)
    stats = {"ppo/loss/policy": loss, "ppo/loss/total": loss, **stats}
    return loss, {k: v.detach() for k, v in stats.items()}


def minibatch_stats(returns: torch.Tensor, old_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stats that are not element means: moments of the returns and of the old values."""
    return {
        "ppo/returns/mean": returns.mean(), "ppo/returns/var": returns.var(unbiased=False),
        "ppo/val/mean": old_values.mean(), "ppo/val/var": old_values.var(unbiased=False),
    }


# -- what the update reports


def rollout_stats(rollouts: Rollouts) -> dict[str, torch.Tensor]:
    """The original's objective/* stats, plus KL diagnostics beside `objective/kl`.

    `objective/kl` is the original's estimate: the mean over responses of Σ_t (logprob − ref_logprob),
    unbiased for KL(policy ‖ reference) but negative for some samples, and on average when the
    logprobs do not come from the policy that sampled (e.g. a temperature mismatch).
    `objective/kl_k3` sums the k3 estimator (r − 1) − log r with r = p_ref / p per token: never
    negative, also unbiased, with a lower variance. `objective/kl_negative_share` is the share of
    responses whose log-ratio sum is negative.
    """
    logratio = rollouts.logprobs - rollouts.ref_logprobs
    kl = logratio.sum(1)
    k3 = (torch.expm1(-logratio) + logratio).sum(1)
    return {
        "objective/kl": kl.mean(),
        "objective/kl_k3": k3.mean(),
        "objective/kl_negative_share": (kl < 0).float().mean(),
        "objective/entropy": (-rollouts.logprobs).sum(1).mean(),
        "objective/score": rollouts.scores.mean(),
        "objective/score_total": rollouts.non_score_reward.sum(1).mean() + rollouts.scores.mean(),
    }


def var_explained(stats: dict[str, float]) -> float:
    """1 − val/error / returns/var, from the stats averaged over minibatches and ranks (as the original)."""
    return 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
