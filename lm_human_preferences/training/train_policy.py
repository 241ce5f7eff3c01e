"""PPO fine-tuning of a policy against a reward model: `./launch.py train_policy ...` (docs/original.md, "PPO")."""

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lm_human_preferences.task import lm_tasks, rewards
from lm_human_preferences.training import online, resume, stopping, train_reward
from lm_human_preferences.labeling import collect
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.training.online import OnlineHParams
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.training.run import RunHParams, rank_generator, save_hparams, start_run
from lm_human_preferences.utils import core, distributed, hyperparams, logging, storage
from lm_human_preferences.utils.errors import UserError
from lm_human_preferences.utils.tf_adam import TFAdam

HPARAMS_FILE = "train_policy_hparams.json"
PHASE = "policy"  # its checkpoints and resume state are under <save_dir>/policy and resume/policy
RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (queries, responses) -> scores [batch]


@dataclass
class AdaptiveKLParams(hyperparams.HParams):
    target: Optional[float] = None
    horizon: int = 10000  # in episodes

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        if self.target is None or not 0 < self.target < float("inf"):
            raise UserError(f"{_prefix.rstrip('.') or 'adaptive_kl'} needs a positive target, "
                            f"e.g. --{_prefix}target 6.0")
        if self.horizon <= 0:
            raise UserError(f"{_prefix}horizon must be positive (in episodes), got {self.horizon}")


@dataclass
class RewardHParams(hyperparams.HParams):
    kl_coef: float = 0.2
    adaptive_kl: Optional[AdaptiveKLParams] = None
    trained_model: Optional[str] = None
    train_new_model: Optional[train_reward.HParams] = None
    online: Optional[OnlineHParams] = None  # collect labels while the policy trains (online.py)

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        if not 0 <= self.kl_coef < float("inf"):
            raise UserError(f"{_prefix}kl_coef must be a finite number ≥ 0, got {self.kl_coef}")


@dataclass
class PpoHParams(hyperparams.HParams):
    total_episodes: int = 2000000
    batch_size: int = 64  # global, across ranks
    nminibatches: int = 1
    noptepochs: int = 4
    lr: float = 5e-6
    vf_coef: float = 0.1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = True

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


@dataclass
class HParams(hyperparams.HParams):
    run: RunHParams = field(default_factory=RunHParams)
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)
    rewards: RewardHParams = field(default_factory=RewardHParams)
    ppo: PpoHParams = field(default_factory=PpoHParams)

    def validate(self, _prefix: str = "") -> None:
        if (self.rewards.trained_model is None) == (self.rewards.train_new_model is None):
            raise UserError("set exactly one of rewards.trained_model (a reward model to load) and "
                            "rewards.train_new_model (train one first); e.g. --rewards.train_new_model off")
        super().validate(_prefix)
        new = self.rewards.train_new_model
        if new is not None and new.task != self.task:
            differ = [k for k, v in self.task.to_nested_dict().items() if new.task.to_nested_dict()[k] != v]
            raise UserError(f"rewards.train_new_model.task differs from task in {', '.join(differ)}; "
                            "the reward model must be trained on the policy's task")
        world = distributed.world_size()
        ppo = self.ppo
        if ppo.batch_size % (world * ppo.nminibatches):
            raise UserError(f"ppo.batch_size={ppo.batch_size} must be divisible by ranks ({world}) × "
                            f"ppo.nminibatches ({ppo.nminibatches}); change one of them (ranks: --mpi)")
        minibatch = ppo.batch_size // (world * ppo.nminibatches)
        if ppo.whiten_rewards and minibatch < 8:
            raise UserError(f"each rank's minibatch has {minibatch} samples; whitening needs at least 8 "
                            "(raise ppo.batch_size, lower ppo.nminibatches or ranks, or set ppo.whiten_rewards off)")
        if self.rewards.online is not None:
            online.check(self)

    @property
    def total_updates(self) -> int:
        return core.ceil_div(self.ppo.total_episodes, self.ppo.batch_size)


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


def kl_controller(hp: RewardHParams):
    if hp.adaptive_kl is None:
        return FixedKLController(hp.kl_coef)
    return AdaptiveKLController(hp.kl_coef, hp.adaptive_kl.target, hp.adaptive_kl.horizon)


def make_score_fn(task: lm_tasks.TaskHParams, reward_fn: RewardFn, padding_token: int,
                  chunk_size: int | None = None) -> Callable:
    """(queries, responses) → (scores, postprocessed responses).

    Responses are truncated after the truncate token; those without one get
    `penalty_reward_value` instead of the reward model's score.
    """
    def score_fn(queries: torch.Tensor, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        postprocessed = lm_tasks.postprocess_responses(task, responses, padding_token)
        with torch.no_grad():
            scores = core.map_chunks(reward_fn, chunk_size, queries, postprocessed).float()
        penalty = torch.full_like(scores, task.penalty_reward_value)
        return torch.where(lm_tasks.has_truncate_token(task, postprocessed), scores, penalty), postprocessed

    return score_fn


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards −kl_coef · (logprob − ref_logprob), plus the score at the last token."""
    non_score_reward = -kl_coef * (logprobs - ref_logprobs)
    rewards = non_score_reward.clone()
    rewards[:, -1] += scores
    return rewards, non_score_reward


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

    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - ppo.cliprange, 1.0 + ppo.cliprange)
    pg_loss = torch.max(pg_losses, pg_losses2).mean()
    pg_clipfrac = (pg_losses2 > pg_losses).float().mean()

    loss = pg_loss + ppo.vf_coef * vf_loss
    stats = {
        "ppo/loss/policy": pg_loss, "ppo/loss/value": vf_loss, "ppo/loss/total": loss,
        "ppo/policy/entropy": entropies.mean(), "ppo/policy/approxkl": 0.5 * (logratio ** 2).mean(),
        "ppo/policy/clipfrac": pg_clipfrac,
        "ppo/val/vpred": vpred.mean(), "ppo/val/error": ((vpred - returns) ** 2).mean(), "ppo/val/clipfrac": vf_clipfrac,
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def minibatch_stats(returns: torch.Tensor, old_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stats that are not element means: moments of the returns and of the old values."""
    return {
        "ppo/returns/mean": returns.mean(), "ppo/returns/var": returns.var(unbiased=False),
        "ppo/val/mean": old_values.mean(), "ppo/val/var": old_values.var(unbiased=False),
    }


class PPOTrainer:
    """One `step()` = sample a batch of rollouts, score them, then noptepochs of PPO on it."""

    def __init__(self, policy: Policy, ref_policy: Policy, reward_fn: RewardFn, hp: HParams, seed: int):
        self.policy = policy
        self.ref_policy = ref_policy
        self.hp = hp
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.batch_size = core.exact_div(hp.ppo.batch_size, self.world)  # this rank's rollouts per update
        self.minibatch_size = core.exact_div(self.batch_size, hp.ppo.nminibatches)
        self.generator = rank_generator(seed, policy.device)
        self.queries = lm_tasks.query_batches(hp.task, policy.encoding, self.batch_size, rank=self.rank,
                                              world=self.world, device=policy.device)
        self.score_fn = make_score_fn(hp.task, reward_fn, policy.encoding.padding_token, hp.run.chunk_size)
        self.kl_ctl = kl_controller(hp.rewards)
        self.params = [p for p in policy.model.parameters() if p.requires_grad]
        self.optimizer = TFAdam(self.params, lr=hp.ppo.lr, eps=1e-5)
        policy.configure(hp.run)  # run.precision / run.share_queries; the frozen models are cast once
        ref_policy.configure(hp.run, frozen=ref_policy.model is not policy.model)
        if isinstance(reward_fn, rewards.RewardModel):
            reward_fn.configure(hp.run, frozen=True)
        self.query_batches = 0  # drawn so far: a resumed run skips as many
        self.update = 0  # updates done
        self.history: list[dict[str, float]] = []  # every update's stats

    def save_state(self, where: Path, checkpoint: str, finished: bool = False) -> None:
        resume.save_state(where, self.update, checkpoint, self.optimizer, {"sampling": self.generator},
                          dict(query_batches=self.query_batches, kl_coef=self.kl_ctl.value, history=self.history),
                          finished)

    def restore(self, state: resume.State, weights: dict[str, torch.Tensor]) -> None:
        """Continue from a saved state: weights, Adam, this rank's generator, KL coefficient, query stream."""
        trained_models.load_into(self.policy.model, weights, "the policy checkpoint")
        resume.restore(state, self.optimizer, {"sampling": self.generator})
        self.update, self.history = state.step, state.meta["history"]
        self.kl_ctl.value = state.meta["kl_coef"]
        for _ in range(state.meta["query_batches"]):
            next(self.queries)
        self.query_batches = state.meta["query_batches"]

    @torch.no_grad()
    def rollouts(self) -> dict[str, torch.Tensor]:
        """Sample, score and reward one batch (steps 1–4 of an update in docs/original.md)."""
        chunk = self.hp.run.chunk_size
        queries = next(self.queries)
        self.query_batches += 1
        rollouts = self.policy.respond(queries, self.hp.task.response_length, self.generator, chunk)
        responses = rollouts["responses"]
        ref_logprobs = core.map_chunks(functools.partial(self.ref_policy.analyze_responses, entropies=False), chunk,
                                       queries, responses)["logprobs"]
        scores, postprocessed = self.score_fn(queries, responses)
        rewards, non_score_reward = compute_rewards(scores, rollouts["logprobs"], ref_logprobs, self.kl_ctl.value)
        return dict(queries=queries, responses=responses, postprocessed=postprocessed, logprobs=rollouts["logprobs"],
                    ref_logprobs=ref_logprobs, values=rollouts["values"].float(), scores=scores, rewards=rewards,
                    non_score_reward=non_score_reward)

    def train_minibatch(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradient step on one minibatch, accumulated over micro-batches of ≤ chunk_size rows."""
        ppo = self.hp.ppo
        with torch.no_grad():
            advantages, returns = advantages_and_returns(mb["rewards"], mb["values"], ppo.gamma, ppo.lam,
                                                         ppo.whiten_rewards)
        rows = len(advantages)
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, torch.Tensor] = {}
        for part in core.row_slices(rows, self.hp.run.chunk_size):
            out = self.policy.analyze_responses(mb["queries"][part], mb["responses"][part])
            loss, chunk_stats = ppo_loss(mb["logprobs"][part], mb["values"][part], advantages[part], returns[part],
                                         out["logprobs"], out["values"].float(), out["entropies"], ppo)
            weight = len(advantages[part]) / rows
            (loss * weight).backward()
            for k, v in chunk_stats.items():
                stats[k] = stats.get(k, 0.0) + v * weight
        distributed.average_gradients(self.params)
        core.check_finite(f"PPO update {self.update}", loss=stats["ppo/loss/total"], gradients=core.grad_norm(self.params))
        self.optimizer.step()
        stats.update(minibatch_stats(returns, mb["values"]))
        return stats

    def step(self, update: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """One PPO update; returns its stats (averaged over ranks) and the rollouts."""
        hp = self.hp
        self.optimizer.set_lr(hp.ppo.lr * (1 - update / hp.total_updates))
        rollouts = self.rollouts()
        train_keys = ("queries", "responses", "logprobs", "values", "rewards")
        ppo_stats: list[dict[str, torch.Tensor]] = []
        for _ in range(hp.ppo.noptepochs):
            order = torch.randperm(self.batch_size, generator=self.generator, device=self.generator.device)
            for start in range(0, self.batch_size, self.minibatch_size):
                index = order[start:start + self.minibatch_size].to(self.policy.device)
                ppo_stats.append(self.train_minibatch({k: rollouts[k][index] for k in train_keys}))
        kl = (rollouts["logprobs"] - rollouts["ref_logprobs"]).sum(1)
        local = {
            "objective/kl": kl.mean(),
            "objective/entropy": (-rollouts["logprobs"]).sum(1).mean(),
            "objective/score": rollouts["scores"].mean(),
            "objective/score_total": rollouts["non_score_reward"].sum(1).mean() + rollouts["scores"].mean(),
        }
        local.update({k: torch.stack([s[k] for s in ppo_stats]).mean() for k in ppo_stats[0]})
        stats = distributed.mean_stats(local)
        stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
        stats["objective/kl_coef"] = self.kl_ctl.value
        self.kl_ctl.update(stats["objective/kl"], hp.ppo.batch_size)
        return stats, rollouts


def print_samples(rollouts: dict[str, torch.Tensor], encoding: encodings.Encoding, kl_coef: float, n: int = 3) -> None:
    """Query, response (⏎ for newlines), score, KL and total of the first samples, as the original printed."""
    kl = (rollouts["logprobs"] - rollouts["ref_logprobs"]).sum(1).tolist()
    for i in range(min(n, len(kl))):
        score = rollouts["scores"][i].item()
        logging.print_main(encoding.decode(rollouts["queries"][i].tolist()).replace("\n", "⏎"))
        logging.print_main(encoding.decode(rollouts["postprocessed"][i].tolist()).replace("\n", "⏎"))
        logging.print_main(f"  score = {score:+.2f}\n  kl = {kl[i]:+.2f}\n  total = {score - kl_coef * kl[i]:+.2f}")


def save_policy(policy: Policy, encoding_name: str, save_dir: Path, update: int) -> str:
    """Checkpoint the policy (rank 0; every rank takes part in the replica check); returns the file name."""
    distributed.check_replicas_equal(policy.model)
    core.check_finite(f"the policy after update {update}", weights=core.weight_norm(policy.model.parameters()))
    if distributed.is_main():
        trained_models.save_checkpoint(save_dir / PHASE, policy.model.hparams, encoding_name,
                                       policy.model.state_dict(), update)
    return trained_models.checkpoint_name(update)


def save_crash_checkpoint(policy: Policy, encoding_name: str, save_dir: Path, update: int) -> None:
    """Rank 0 keeps the weights of a run that died (no collectives: other ranks may be gone), if finite."""
    weights_ok = torch.isfinite(core.weight_norm(policy.model.parameters()))
    if distributed.is_main() and weights_ok:
        trained_models.save_checkpoint(save_dir / PHASE, policy.model.hparams, encoding_name,
                                       policy.model.state_dict(), update)


def load_reward_model(hp: HParams, encoding_name: str) -> tuple[rewards.RewardModel, dict | None]:
    """The frozen reward model: trained first (rewards.train_new_model; with its summary) — or taken
    from the save folder when that training already finished —, or loaded (rewards.trained_model)."""
    summary = None
    save_dir = Path(hp.run.save_dir) if hp.run.save_dir else None
    if hp.rewards.train_new_model is not None and save_dir is not None and train_reward.finished(save_dir):
        logging.print_main(f"the reward model in {save_dir} finished training; using it")
        reward_model = distributed.main_first(lambda: rewards.load_trained(str(save_dir), distributed.device()))
        summary = json.loads((save_dir / train_reward.SUMMARY_FILE).read_text())
    elif hp.rewards.train_new_model is not None:
        reward_hp = hp.rewards.train_new_model
        reward_hp.run.save_dir = hp.run.save_dir
        reward_model, summary = train_reward.train(reward_hp)
    else:  # rank 0 downloads; the others then read the cache
        reward_model = distributed.main_first(lambda: rewards.load_trained(hp.rewards.trained_model, distributed.device()))
    if reward_model.encoding.name != encoding_name:
        raise UserError(f"the reward model uses the {reward_model.encoding.name!r} encoding but the policy "
                        f"{hp.task.policy.initial_model!r} uses {encoding_name!r}; their tokens are not compatible")
    reward_model.requires_grad_(False)
    return reward_model.eval(), summary


def load_policies(hp: HParams, device: torch.device) -> tuple[Policy, Policy, str]:
    """(policy with a value head, frozen reference policy, encoding name), equal on every rank."""
    model, encoding_name = trained_models.load_initial(hp.task.policy.initial_model, heads=("value",), device=device)
    ref_model, _ = trained_models.load_initial(hp.task.policy.initial_model, device=device)
    distributed.broadcast_module(model)
    distributed.broadcast_module(ref_model)
    ref_model.requires_grad_(False)
    encoding = encodings.get(encoding_name)
    return Policy(model, encoding, hp.task), Policy(ref_model.eval(), encoding, hp.task), encoding_name


def log_update(hp: HParams, update: int, stats: dict[str, float], rollouts: dict[str, torch.Tensor],
               encoding: encodings.Encoding, scalar_log: logging.ScalarLog, bar) -> None:
    """TensorBoard every update; the progress bar; stats and 3 samples every log_interval updates."""
    scalar_log.scalars(stats, update)
    eps = hp.ppo.batch_size / stats["elapsed/step_time"]
    bar.update(1)
    bar.set_postfix(eps=f"{eps:.1f}/s", score=f"{stats['objective/score']:.3f}", kl=f"{stats['objective/kl']:.3f}")
    if update % hp.run.log_interval == 0:
        logging.print_main(f"[ppo_step {update}] step_time={stats['elapsed/step_time']:.2f}s, eps/s={eps:.2f}")
        logging.print_main(logging.format_stats(stats))
        print_samples(rollouts, encoding, hp.rewards.kl_coef)


def elapsed_stats(hp: HParams, update: int, step_time: float, started: float) -> dict[str, float]:
    steps = update + 1
    return {
        "elapsed/updates": steps,
        "elapsed/steps/serial": steps * hp.task.response_length,
        "elapsed/steps/total": steps * hp.ppo.batch_size * hp.task.response_length,
        "elapsed/episodes": steps * hp.ppo.batch_size,
        "elapsed/fps": int(hp.ppo.batch_size * hp.task.response_length / step_time),  # tokens/s
        "elapsed/time": time.time() - started,
        "elapsed/step_time": step_time,
    }


def run_updates(trainer: PPOTrainer, hp: HParams, save_dir: Path | None, encoding_name: str,
                until: int | None = None) -> None:
    """The PPO updates from `trainer.update` on, up to update `until` (default: all), with logging
    and checkpoints (model and resume state every run.save_interval updates, and at `until`).
    SIGINT or SIGTERM stops the run after the current update, with a checkpoint to resume from."""
    scalar_log = logging.ScalarLog(save_dir / "tb" / "ppo" if save_dir else None)

    def checkpoint(finished: bool = False) -> None:
        trainer.save_state(resume.folder(save_dir, PHASE), save_policy(trainer.policy, encoding_name, save_dir,
                                                                        trainer.update), finished)

    started = time.time() - (trainer.history[-1]["elapsed/time"] if trainer.history else 0.0)
    try:
        with logging.progress(hp.total_updates, "ppo", "update") as bar, stopping.graceful() as stop:
            bar.update(trainer.update)
            end = hp.total_updates if until is None else until
            while trainer.update < end:
                update = trainer.update
                step_started = time.time()
                stats, rollouts = trainer.step(update)
                stats.update(elapsed_stats(hp, update, time.time() - step_started, started))
                trainer.history.append(stats)
                trainer.update += 1
                log_update(hp, update, stats, rollouts, trainer.policy.encoding, scalar_log, bar)
                stop_now = stop.requested()
                if save_dir is not None and trainer.update < hp.total_updates and (
                        stop_now or trainer.update % hp.run.save_interval == 0 or trainer.update == end):
                    checkpoint()
                if stop_now:
                    stop.exit(f"after PPO update {trainer.update}" + ("; rerun the same command to resume"
                                                                     if save_dir is not None else ""))
    except (Exception, KeyboardInterrupt) as e:  # as the original: keep what was trained when a run dies
        if save_dir is not None and trainer.history and not isinstance(e, UserError):
            save_crash_checkpoint(trainer.policy, encoding_name, save_dir, trainer.update)
        raise
    finally:
        scalar_log.close()
    if save_dir is not None and trainer.update == hp.total_updates:
        checkpoint(finished=True)


def before_after_samples(policy: Policy, ref_policy: Policy, task: lm_tasks.TaskHParams, seed: int,
                         n: int = 8) -> list[dict[str, str]]:
    """The initial and the trained policy's (truncated) responses to the first `n` test queries."""
    queries = next(lm_tasks.query_batches(task, policy.encoding, n, mode="test", device=policy.device))
    _, query_texts, before = collect.sample_texts(ref_policy, task, queries, torch.Generator(policy.device).manual_seed(seed), None)
    _, _, after = collect.sample_texts(policy, task, queries, torch.Generator(policy.device).manual_seed(seed), None)
    return [dict(query=q, before=b, after=a) for q, b, a in zip(query_texts, before, after)]


def train(hp: HParams, reward_fn: RewardFn | None = None) -> tuple[Policy, dict]:
    """Fine-tune a policy per `hp`. `reward_fn` replaces the reward model (e.g. a programmatic scorer).

    Returns the policy and a summary: the first and last update's stats, every update's stats
    ("history") and, when a reward model was trained first, its summary ("reward_model"). With
    a save folder, a run resumes from its last checkpoint when run again with the same hparams.
    With rewards.online, labels are collected while the policy trains (online.py).
    """
    if hp.rewards.online is not None:
        return online.train(hp)
    device, seed, save_dir = start_run(hp, HPARAMS_FILE)
    state = resume.unfinished_state(save_dir, PHASE, "a policy run")
    policy, ref_policy, encoding_name = load_policies(hp, device)
    reward_summary = None
    if reward_fn is None:
        reward_fn, reward_summary = load_reward_model(hp, encoding_name)
    save_hparams(hp, save_dir, HPARAMS_FILE)
    trainer = PPOTrainer(policy, ref_policy, reward_fn, hp, seed)
    if state is not None:
        trainer.restore(state, trained_models.load_file(save_dir / PHASE, state.checkpoint).tensors)
        logging.print_main(f"resuming PPO at update {state.step} of {hp.total_updates}")
    run_updates(trainer, hp, save_dir, encoding_name)
    if save_dir is not None and distributed.is_main():
        samples = before_after_samples(policy, ref_policy, hp.task, seed)
        storage.atomic_write_text(save_dir / "samples.json", json.dumps(samples, indent=1))
    distributed.barrier()
    history = trainer.history
    return policy, {"first": history[0], "last": history[-1], "history": history, "reward_model": reward_summary}
