"""PPO fine-tuning of a policy against a reward model: `./launch.py train_policy ...` (docs/original.md, "PPO").

The math of an update is in ppo.py; this module runs updates: the trainer (`PPOTrainer`: make
rollouts, learn from them), the loop with its logging and checkpoints (`run_updates`), and the
start and end every policy run shares (`start_policy_run`, `finish_policy_run`), which the
offline run (`train`) and the online one (`train_online`, with the label rounds of online.py)
are built from.
"""

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lm_human_preferences.labeling import collect, sources
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task import lm_tasks, rewards
from lm_human_preferences.task.policy import Policy, load_policy
from lm_human_preferences.training import online, ppo, resume, stopping, train_reward
from lm_human_preferences.training.online import OnlineHParams
from lm_human_preferences.training.ppo import AdaptiveKLParams, PpoHParams, RewardFn, Rollouts
from lm_human_preferences.training.run import Resolved, RunHParams, rank_generator, save_hparams, start_run
from lm_human_preferences.utils import core, distributed, hyperparams, logging, save_folders, storage
from lm_human_preferences.utils.errors import UserError
from lm_human_preferences.utils.tf_adam import TFAdam

NEGATIVE_KL_UPDATES = 5  # warn once when the mean KL has been negative for this many updates in a row


@dataclass
class RewardHParams(hyperparams.HParams):
    kl_coef: float = 0.2  # the KL penalty's coefficient (its initial value, with adaptive_kl)
    adaptive_kl: Optional[AdaptiveKLParams] = None  # steer kl_coef towards a target KL
    trained_model: Optional[str] = None  # a reward model to load ...
    train_new_model: Optional[train_reward.HParams] = None  # ... or one to train first
    online: Optional[OnlineHParams] = None  # ... and keep training on labels of the current policy's samples

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        if not 0 <= self.kl_coef < float("inf"):
            raise UserError(f"{_prefix}kl_coef must be a finite number ≥ 0, got {self.kl_coef}")


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
        if ppo.rloo_k is not None and ppo.batch_size // world % ppo.rloo_k:
            raise UserError(f"ppo.batch_size={ppo.batch_size} must give each rank ({world}) whole groups of "
                            f"ppo.rloo_k={ppo.rloo_k} responses to a query; change one of them (ranks: --mpi)")
        if ppo.whiten_rewards and minibatch < 8 and ppo.rloo_k is None:
            raise UserError(f"each rank's minibatch has {minibatch} samples; whitening needs at least 8 "
                            "(raise ppo.batch_size, lower ppo.nminibatches or ranks, or set ppo.whiten_rewards off)")
        if self.rewards.online is not None:
            online.check(self.rewards.online, self.rewards.train_new_model, self.ppo)

    @property
    def total_updates(self) -> int:
        return core.ceil_div(self.ppo.total_episodes, self.ppo.batch_size)


class PPOTrainer:
    """`rollouts()` samples, scores and rewards a batch; `learn(rollouts)` runs noptepochs of PPO
    on it; `step()` is one update, both in turn. With `ppo.rloo_k` K, a batch holds K responses
    to each of batch_size / K queries, and the advantages are RLOO's (ppo.py)."""

    def __init__(self, policy: Policy, ref_policy: Policy, reward_fn: RewardFn, hp: HParams, seed: int):
        self.policy = policy
        self.ref_policy = ref_policy
        self.reward_fn = reward_fn
        self.hp = hp
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.batch_size = core.exact_div(hp.ppo.batch_size, self.world)  # this rank's rollouts per update
        self.minibatch_size = core.exact_div(self.batch_size, hp.ppo.nminibatches)
        self.generator = rank_generator(seed, policy.device)
        self.queries = lm_tasks.query_batches(hp.task, policy.encoding, self.batch_size // (hp.ppo.rloo_k or 1),
                                              rank=self.rank, world=self.world, device=policy.device)
        self.kl_ctl = ppo.kl_controller(hp.rewards.kl_coef, hp.rewards.adaptive_kl)
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

    def score(self, queries: torch.Tensor, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, postprocessed responses) of sampled responses (`ppo.score`)."""
        return ppo.score(self.hp.task, self.reward_fn, self.policy.encoding.padding_token, queries, responses,
                         self.hp.run.chunk_size)

    @torch.no_grad()
    def rollouts(self) -> Rollouts:
        """Sample, score and reward one batch (steps 1–3 of an update, ppo.py)."""
        chunk = self.hp.run.chunk_size
        queries = next(self.queries)
        self.query_batches += 1
        if self.hp.ppo.rloo_k is not None:
            queries = queries.repeat_interleave(self.hp.ppo.rloo_k, dim=0)
        sampled = self.policy.respond(queries, self.hp.task.response_length, self.generator, chunk)
        responses = sampled["responses"]
        ref_logprobs = core.map_chunks(lambda q, r: self.ref_policy.analyze_responses(q, r, entropies=False), chunk,
                                       queries, responses)["logprobs"]
        scores, postprocessed = self.score(queries, responses)
        rewards, non_score_reward = ppo.compute_rewards(scores, sampled["logprobs"], ref_logprobs, self.kl_ctl.value)
        return Rollouts(queries=queries, responses=responses, postprocessed=postprocessed,
                        logprobs=sampled["logprobs"], ref_logprobs=ref_logprobs,
                        values=None if sampled["values"] is None else sampled["values"].float(),
                        scores=scores, rewards=rewards, non_score_reward=non_score_reward)

    def train_minibatch(self, mb: Rollouts, rloo_advantages: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Gradient step on one minibatch, accumulated over micro-batches of ≤ chunk_size rows (steps 4–5);
        under RLOO with the minibatch's advantages (computed on the whole batch) and no value loss."""
        hp = self.hp.ppo
        if rloo_advantages is None:
            with torch.no_grad():
                advantages, returns = ppo.advantages_and_returns(mb.rewards, mb.values, hp.gamma, hp.lam,
                                                                 hp.whiten_rewards)
        else:
            advantages, returns = rloo_advantages, None
        rows = len(advantages)
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, torch.Tensor] = {}
        for part in core.row_slices(rows, self.hp.run.chunk_size):
            out = self.policy.analyze_responses(mb.queries[part], mb.responses[part])
            if returns is None:
                loss, chunk_stats = ppo.rloo_loss(mb.logprobs[part], advantages[part], out["logprobs"],
                                                  out["entropies"], hp)
            else:
                loss, chunk_stats = ppo.ppo_loss(mb.logprobs[part], mb.values[part], advantages[part], returns[part],
                                                 out["logprobs"], out["values"].float(), out["entropies"], hp)
            weight = len(advantages[part]) / rows
            (loss * weight).backward()
            for k, v in chunk_stats.items():
                stats[k] = stats.get(k, 0.0) + v * weight
        distributed.average_gradients(self.params)
        core.check_finite(f"PPO update {self.update}", loss=stats["ppo/loss/total"], gradients=core.grad_norm(self.params))
        self.optimizer.step()
        if returns is not None:
            stats.update(ppo.minibatch_stats(returns, mb.values))
        return stats

    def learn(self, rollouts: Rollouts) -> dict[str, float]:
        """noptepochs passes over shuffled minibatches of `rollouts`; then the update's stats
        (averaged over ranks) and the KL controller's step (step 6)."""
        hp = self.hp
        rloo = None if hp.ppo.rloo_k is None else ppo.rloo_advantages(rollouts.rewards, hp.ppo.rloo_k)
        ppo_stats: list[dict[str, torch.Tensor]] = []
        for _ in range(hp.ppo.noptepochs):
            order = torch.randperm(self.batch_size, generator=self.generator, device=self.generator.device)
            for start in range(0, self.batch_size, self.minibatch_size):
                index = order[start:start + self.minibatch_size].to(self.policy.device)
                ppo_stats.append(self.train_minibatch(rollouts[index], None if rloo is None else rloo[index]))
        # The gradients are spent: free them before the next rollouts, whose sampling packs a
        # float32 policy's matrices (language/packed.py) — as much memory again as the weights.
        self.optimizer.zero_grad(set_to_none=True)
        local = ppo.rollout_stats(rollouts)
        local.update({k: torch.stack([s[k] for s in ppo_stats]).mean() for k in ppo_stats[0]})
        stats = distributed.mean_stats(local)
        if rloo is None:
            stats["ppo/val/var_explained"] = ppo.var_explained(stats)
        stats["objective/kl_coef"] = self.kl_ctl.value
        self.kl_ctl.update(stats["objective/kl"], hp.ppo.batch_size)
        return stats

    def step(self, update: int) -> tuple[dict[str, float], Rollouts]:
        """One PPO update (the learning rate annealed for it); returns its stats and the rollouts."""
        self.optimizer.set_lr(self.hp.ppo.lr * (1 - update / self.hp.total_updates))
        rollouts = self.rollouts()
        return self.learn(rollouts), rollouts


# -- the updates, with logging and checkpoints


def print_samples(rollouts: Rollouts, encoding: encodings.Encoding, kl_coef: float, n: int = 3) -> None:
    """Query, response (⏎ for newlines), score, KL and total of the first samples, as the original printed."""
    kl = (rollouts.logprobs - rollouts.ref_logprobs).sum(1).tolist()
    for i in range(min(n, len(kl))):
        score = rollouts.scores[i].item()
        logging.print_main(encoding.decode(rollouts.queries[i].tolist()).replace("\n", "⏎"))
        logging.print_main(encoding.decode(rollouts.postprocessed[i].tolist()).replace("\n", "⏎"))
        logging.print_main(f"  score = {score:+.2f}\n  kl = {kl[i]:+.2f}\n  total = {score - kl_coef * kl[i]:+.2f}")


class NegativeKLWatch:
    """A one-time warning when the mean KL stays negative: a sign the log-probs PPO penalizes are not
    the ones the samples were drawn from."""

    def __init__(self, updates: int = NEGATIVE_KL_UPDATES):
        self.updates, self.run, self.warned = updates, 0, False

    def see(self, stats: dict[str, float]) -> None:
        self.run = self.run + 1 if stats["objective/kl"] < 0 else 0
        if self.run >= self.updates and not self.warned:
            self.warned = True
            logging.print_main(
                f"warning: the mean KL (objective/kl) has been negative for {self.run} updates in a row "
                f"(now {stats['objective/kl']:.3f}; k3 estimate {stats['objective/kl_k3']:.3f}). Usual causes: the "
                "responses were sampled at another temperature than they are scored at (task.policy.temperature), "
                "or the reference policy is not the initial policy.")


def log_update(hp: HParams, update: int, stats: dict[str, float], rollouts: Rollouts,
               encoding: encodings.Encoding, scalar_log: logging.ScalarLog, bar) -> None:
    """TensorBoard every update; the progress bar; stats and 3 samples every log_interval updates."""
    scalar_log.scalars(stats, update)
    eps = hp.ppo.batch_size / stats["elapsed/step_time"]
    bar.update(1)
    bar.set_postfix(eps=f"{eps:.1f}/s", score=f"{stats['objective/score']:.3f}", kl=f"{stats['objective/kl']:.3f}",
                    kl3=f"{stats['objective/kl_k3']:.3f}")
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


def save_policy(policy: Policy, save_dir: Path, update: int) -> str:
    """Checkpoint the policy (rank 0; every rank takes part in the replica check); returns the file name."""
    distributed.check_replicas_equal(policy.model)
    core.check_finite(f"the policy after update {update}", weights=core.weight_norm(policy.model.parameters()))
    if distributed.is_main():
        trained_models.save_checkpoint(save_dir / save_folders.POLICY, policy.model.hparams, policy.encoding.name,
                                       policy.model.state_dict(), update)
    return trained_models.checkpoint_name(update)


def save_crash_checkpoint(policy: Policy, save_dir: Path, update: int) -> None:
    """Rank 0 keeps the weights of a run that died (no collectives: other ranks may be gone), if finite."""
    weights_ok = torch.isfinite(core.weight_norm(policy.model.parameters()))
    if distributed.is_main() and weights_ok:
        trained_models.save_checkpoint(save_dir / save_folders.POLICY, policy.model.hparams, policy.encoding.name,
                                       policy.model.state_dict(), update)


def run_updates(trainer: PPOTrainer, hp: HParams, save_dir: Path | None, until: int | None = None) -> None:
    """The PPO updates from `trainer.update` on, up to update `until` (default: all), with logging
    and checkpoints (model and resume state every run.save_interval updates, and at `until`).
    SIGINT or SIGTERM stops the run after the current update, with a checkpoint to resume from."""
    scalar_log = logging.ScalarLog(save_dir / save_folders.TENSORBOARD / save_folders.PPO_LOG if save_dir else None)
    negative_kl = NegativeKLWatch()

    def checkpoint(finished: bool = False) -> None:
        trainer.save_state(resume.folder(save_dir, save_folders.POLICY),
                           save_policy(trainer.policy, save_dir, trainer.update), finished)

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
                negative_kl.see(stats)
                stop_now = stop.requested()
                if save_dir is not None and trainer.update < hp.total_updates and (
                        stop_now or trainer.update % hp.run.save_interval == 0 or trainer.update == end):
                    checkpoint()
                if stop_now:
                    stop.exit(f"after PPO update {trainer.update}" + ("; rerun the same command to resume"
                                                                     if save_dir is not None else ""))
    except (Exception, KeyboardInterrupt) as e:  # as the original: keep what was trained when a run dies
        if save_dir is not None and trainer.history and not isinstance(e, UserError):
            save_crash_checkpoint(trainer.policy, save_dir, trainer.update)
        raise
    finally:
        scalar_log.close()
    if save_dir is not None and trainer.update == hp.total_updates:
        checkpoint(finished=True)


# -- a policy run, from start to end


@dataclass
class PolicyRun:
    """What a policy run starts with: what its start resolved (seed, folder, labels), its resume
    state and the two policies."""

    hp: HParams
    resolved: Resolved
    state: resume.State | None  # where a stopped run resumes PPO, if it does
    policy: Policy  # the one PPO trains (with a value head, but for RLOO)
    ref_policy: Policy  # the initial policy, frozen: the KL penalty's reference


def load_policies(task: lm_tasks.TaskHParams, device: torch.device,
                  heads: tuple[str, ...] = ("value",)) -> tuple[Policy, Policy]:
    """(the initial policy to train, with `heads`; the frozen reference policy), equal on every rank."""
    policy = load_policy(task.policy.initial_model, task, device, heads=heads)
    ref_policy = load_policy(task.policy.initial_model, task, device)
    distributed.broadcast_module(policy.model)
    distributed.broadcast_module(ref_policy.model)
    ref_policy.model.requires_grad_(False)
    return policy, ref_policy


def start_policy_run(hp: HParams) -> PolicyRun:
    """Claim the save folder, fix the seed (and collect mock labels: `run.start_run`), find the
    resume state, and load the policies. The caller saves the hparams once its inputs are read.

    An offline run's reward model, when it trains one, trains on a fixed label set: the run
    collects them at its start if a mock labeler gives them. Online, the rounds label."""
    labels_hp = hp.rewards.train_new_model if hp.rewards.online is None else None
    resolved = start_run(hp, save_folders.POLICY_HPARAMS, labels_hp=labels_hp)
    state = resume.unfinished_state(resolved.save_dir, save_folders.POLICY, "a policy run")
    heads = ("value",) if hp.ppo.rloo_k is None else ()  # RLOO has no critic
    return PolicyRun(hp, resolved, state, *load_policies(hp.task, resolved.device, heads))


def resume_trainer(run: PolicyRun, trainer: PPOTrainer) -> None:
    if run.state is not None:
        trainer.restore(run.state, trained_models.load_file(run.resolved.save_dir / save_folders.POLICY,
                                                            run.state.checkpoint).tensors)
        logging.print_main(f"resuming PPO at update {run.state.step} of {run.hp.total_updates}")


def before_after_samples(policy: Policy, ref_policy: Policy, task: lm_tasks.TaskHParams, seed: int,
                         n: int = 8) -> list[tuple[str, str, str]]:
    """(query, initial policy's response, trained policy's response) texts for the first `n` test
    queries, both sampled with the same random numbers and truncated as the task says."""
    queries = next(lm_tasks.query_batches(task, policy.encoding, n, mode="test", device=policy.device))
    texts = {}
    for name, p in (("before", ref_policy), ("after", policy)):
        generator = torch.Generator(policy.device).manual_seed(seed)
        _, query_texts, texts[name] = collect.sample_texts(p, task, queries, generator, None)
    return list(zip(query_texts, texts["before"], texts["after"]))


def finish_policy_run(run: PolicyRun, trainer: PPOTrainer, reward_summary: dict | None) -> dict:
    """Write the before/after samples (rank 0) and return the run's summary: the seed it used
    ("seed"), the first and last update's stats, every update's ("history"), and the reward
    model's summary ("reward_model")."""
    save_dir, seed = run.resolved.save_dir, run.resolved.seed
    if save_dir is not None and distributed.is_main():
        samples = [dict(query=q, before=b, after=a)
                   for q, b, a in before_after_samples(run.policy, run.ref_policy, run.hp.task, seed)]
        storage.atomic_write_text(save_dir / save_folders.SAMPLES, json.dumps(samples, indent=1))
    distributed.barrier()
    history = trainer.history
    return {"seed": seed, "first": history[0], "last": history[-1], "history": history,
            "reward_model": reward_summary}


def load_reward_model(hp: HParams, resolved: Resolved, encoding_name: str) -> tuple[rewards.RewardModel, dict | None]:
    """The frozen reward model: trained first in the run's folder (rewards.train_new_model; with its
    summary) — or taken from the save folder when that training already finished —, or loaded
    (rewards.trained_model)."""
    summary, save_dir = None, resolved.save_dir
    if hp.rewards.train_new_model is not None and save_dir is not None and train_reward.finished(save_dir):
        logging.print_main(f"the reward model in {save_dir} finished training; using it")
        reward_model = distributed.main_first(lambda: rewards.load_trained(str(save_dir), distributed.device()))
        summary = json.loads((save_dir / save_folders.REWARD_SUMMARY).read_text())
    elif hp.rewards.train_new_model is not None:
        reward_model, summary = train_reward.train(hp.rewards.train_new_model, within=resolved)
    else:  # rank 0 downloads; the others then read the cache
        reward_model = distributed.main_first(lambda: rewards.load_trained(hp.rewards.trained_model, distributed.device()))
    if reward_model.encoding.name != encoding_name:
        raise UserError(f"the reward model uses the {reward_model.encoding.name!r} encoding but the policy "
                        f"{hp.task.policy.initial_model!r} uses {encoding_name!r}; their tokens are not compatible")
    reward_model.requires_grad_(False)
    return reward_model.eval(), summary


def train(hp: HParams, reward_fn: RewardFn | None = None) -> tuple[Policy, dict]:
    """Fine-tune a policy per `hp` offline. `reward_fn` replaces the reward model (e.g. a programmatic
    scorer). Returns the policy and `finish_policy_run`'s summary. With a save folder, a run resumes
    from its last checkpoint when run again with the same hparams. (Online runs: train_online.)"""
    if hp.rewards.online is not None:
        raise UserError("rewards.online runs are train_online's; launch them through experiments.train_function")
    run = start_policy_run(hp)
    reward_summary = None
    if reward_fn is None:
        reward_fn, reward_summary = load_reward_model(hp, run.resolved, run.policy.encoding.name)
    save_hparams(hp, run.resolved, save_folders.POLICY_HPARAMS)
    trainer = PPOTrainer(run.policy, run.ref_policy, reward_fn, hp, run.resolved.seed)
    resume_trainer(run, trainer)
    run_updates(trainer, hp, run.resolved.save_dir)
    return run.policy, finish_policy_run(run, trainer, reward_summary)


def train_online(hp: HParams) -> tuple[Policy, dict]:
    """An online run (`rewards.online`): PPO's updates with online.py's label rounds between them;
    returns what `train` returns, with the summaries of the rounds under "online" and the last
    round's under "reward_model"."""
    if hp.run.save_dir is None and sources.app_port(hp.rewards.train_new_model.labels.source) is not None:
        raise UserError("labels from people need a save folder (run.save_dir) for the app's questions and answers")
    run = start_policy_run(hp)
    resolved, reward_hp = run.resolved, hp.rewards.train_new_model
    save_dir = resolved.save_dir
    reward_model, encoding_name, reward_state, progress = online.reward_side(hp.task, run.policy.device, save_dir)
    save_hparams(hp, resolved, save_folders.POLICY_HPARAMS)
    reward_trainer = train_reward.RewardModelTrainer(reward_model, run.ref_policy, reward_hp, resolved.seed)
    # PPO scores with the reward model through a function: given the module itself, it would freeze it
    trainer = PPOTrainer(run.policy, run.ref_policy, lambda q, r: reward_model(q, r), hp, resolved.seed)
    if reward_state is not None:
        reward_trainer.restore(reward_state)
    resume_trainer(run, trainer)
    if progress.rounds and progress.rounds[-1]["update"] == trainer.update and "kl_coef" in progress.rounds[-1]:
        # PPO's state was saved before its last round rescaled kl_coef (rescale_kl_coef)
        trainer.kl_ctl.value = progress.rounds[-1]["kl_coef"]
    logging.print_main(f"online: {len(progress.rounds)} label rounds done, PPO at update {trainer.update} of "
                       f"{hp.total_updates}")
    with contextlib.ExitStack() as stack:
        people = online.start_people(reward_hp, resolved, progress, run.policy.encoding.padding_token, stack)
        rounds = online.OnlineRun(hp.rewards.online, reward_hp, hp.run, reward_trainer, progress, resolved,
                                  encoding_name, people, trainer.kl_ctl)
        stack.callback(rounds.scalar_log.close)
        for rnd in online.schedule(hp.rewards.online, reward_hp, hp.ppo)[len(progress.rounds):]:
            if trainer.update < rnd.update:
                run_updates(trainer, hp, save_dir, until=rnd.update)
            with stopping.graceful() as stop:
                rounds.run_round(run.policy, rnd, online.Heartbeat(stop, f"while waiting for label round {rnd.index}"))
                if stop.requested():
                    stop.exit(f"after label round {rnd.index}; rerun the same command to resume")
        run_updates(trainer, hp, save_dir)
    summary = finish_policy_run(run, trainer, progress.rounds[-1])
    summary["online"] = {"rounds": progress.rounds}
    return run.policy, summary
