"""Reward model training from human labels: `./launch.py train_reward ...` (docs/original.md, "Reward model")."""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lm_human_preferences.labeling import label_files, label_types, sources
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.task.policy import Policy, load_policy
from lm_human_preferences.task.rewards import RewardModel, reward_stats
from lm_human_preferences.training import resume
from lm_human_preferences.training.run import Resolved, RunHParams, rank_generator, save_hparams, start_run
from lm_human_preferences.utils import core, distributed, hyperparams, logging, save_folders, storage
from lm_human_preferences.utils.errors import UserError
from lm_human_preferences.utils.tf_adam import TFAdam

@dataclass
class LabelHParams(hyperparams.HParams):
    type: Optional[str] = None
    num_train: Optional[int] = None
    source: Optional[str] = None


@dataclass
class HParams(hyperparams.HParams):
    run: RunHParams = field(default_factory=RunHParams)
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)
    labels: LabelHParams = field(default_factory=LabelHParams)
    batch_size: int = 40  # global, across ranks
    lr: float = 5e-5
    rollout_batch_size: int = 64  # global, across ranks
    normalize_samples: int = 0  # samples used to measure the reward's mean and std
    debug_normalize: int = 0  # samples used to check the normalization (0: no check)
    normalize_before: bool = False
    normalize_after: bool = False
    epochs: int = 1  # passes over the labels; the original made one pass over human labels

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        for name in ("type", "num_train", "source"):
            if getattr(self.labels, name) is None:
                raise UserError(f"hparam {_prefix}labels.{name} must be set")
        label_types.get(self.labels.type)
        if sources.is_mock(self.labels.source):  # checked now, not when the run has started
            try:
                sources.check_mock(self.labels.source, self.labels.type)
            except UserError as e:
                raise UserError(f"{_prefix}labels.source: {e}") from None
        world = distributed.world_size()
        for name, value in (("labels.num_train", self.labels.num_train), ("batch_size", self.batch_size),
                            ("rollout_batch_size", self.rollout_batch_size), ("epochs", self.epochs)):
            if value <= 0:
                raise UserError(f"{_prefix}{name} must be positive, got {value}")
        if not 0 <= self.lr < float("inf"):
            raise UserError(f"{_prefix}lr must be a finite number ≥ 0, got {self.lr}")
        if self.normalize_samples < 0 or self.debug_normalize < 0:
            raise UserError(f"{_prefix}normalize_samples and {_prefix}debug_normalize must not be negative")
        if self.labels.num_train % self.batch_size:
            below = self.labels.num_train // self.batch_size * self.batch_size
            nearest = " or ".join(str(n) for n in (below, below + self.batch_size) if n > 0)
            raise UserError(f"{_prefix}labels.num_train={self.labels.num_train} is not divisible by "
                            f"{_prefix}batch_size={self.batch_size}; change one of them (e.g. num_train {nearest}). "
                            f"The first num_train labels of the source train the reward model and the ones after "
                            f"them are held out for evaluation (a mock: source collects num_train/{sources.HELD_OUT_SHARE} more "
                            "to hold out)")
        if self.batch_size % world or self.rollout_batch_size % world:
            raise UserError(f"{_prefix}batch_size={self.batch_size} and {_prefix}rollout_batch_size="
                            f"{self.rollout_batch_size} must be divisible by the number of ranks ({world}); "
                            "change them or the number of ranks (--mpi)")
        if (self.normalize_before or self.normalize_after) and self.normalize_samples <= 0:
            raise UserError("normalize_before/normalize_after need normalize_samples > 0")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.labels.num_train // self.batch_size


class RewardModelTrainer:
    def __init__(self, reward_model: RewardModel, policy: Policy, hp: HParams, seed: int):
        self.reward_model = reward_model
        self.policy = policy
        self.hp = hp
        self.label_type = label_types.get(hp.labels.type)
        device = reward_model.device
        self.generator = rank_generator(seed, device)
        self.queries = lm_tasks.query_batches(
            hp.task, reward_model.encoding, core.exact_div(hp.rollout_batch_size, distributed.world_size()),
            rank=distributed.rank(), world=distributed.world_size(), device=device)
        self.query_batches = 0  # drawn so far: a resumed run skips as many
        self.params = list(reward_model.parameters())
        self.optimizer = TFAdam(self.params, lr=hp.lr, eps=1e-5)
        self.reward_model.configure(hp.run)  # run.precision / run.share_queries
        self.policy.configure(hp.run, frozen=self.policy.model is not self.reward_model.model)
        self.step = 0  # batches trained
        # What the final summary needs from before a resume: the stats of the last batch trained and
        # the normalization before training (train_reward's; an online round's is in its summary).
        self.last_stats: dict[str, float] = {}
        self.normalize_before: dict[str, float] | None = None

    def sample_rewards(self, n_samples: int) -> torch.Tensor:
        """Rewards of the initial policy's (truncated) responses: ceil(n / rollout_batch_size) global batches."""
        rewards = []
        for _ in range(core.ceil_div(n_samples, self.hp.rollout_batch_size)):
            queries = next(self.queries)
            self.query_batches += 1
            chunk_size = self.hp.run.chunk_size
            responses = self.policy.respond(queries, self.hp.task.response_length, self.generator, chunk_size)
            responses = lm_tasks.postprocess_responses(self.hp.task, responses["responses"],
                                                       self.policy.encoding.padding_token)
            with torch.no_grad():
                rewards.append(core.map_chunks(self.reward_model, chunk_size, queries, responses).float())
        return torch.cat(rewards)

    def normalize(self, target_mean: float, target_std: float) -> dict[str, float]:
        """Reset gain/bias, measure rewards on fresh samples, set gain/bias to hit the target."""
        self.reward_model.reset_norm()
        mean, std = reward_stats(self.sample_rewards(self.hp.normalize_samples))
        self.reward_model.set_norm(mean, std, target_mean, target_std)
        stats = dict(mean_before=mean, std_before=std, target_mean=target_mean, target_std=target_std,
                     gain=self.reward_model.gain.item(), bias=self.reward_model.bias.item())
        if self.hp.debug_normalize:
            stats["mean_after"], stats["std_after"] = reward_stats(self.sample_rewards(self.hp.debug_normalize))
        logging.print_main("reward normalization:", logging.format_stats(stats))
        return stats

    def rewards_of(self, batch: label_files.Labels) -> torch.Tensor:
        """Rewards [batch, num_responses] for every response of every record, in one forward."""
        queries, responses = record_rows(batch, self.label_type, self.reward_model.device)
        return self.reward_model(queries, responses).view(len(batch), -1)

    def train(self, train_labels: label_files.Labels, seed: int, scalar_log: logging.ScalarLog,
              checkpoint: Callable[[], None]) -> dict[str, float]:
        """`epochs` passes (the original: one) over the labels, each in a permutation shared by all
        ranks; the lr decays linearly to 0 over all of them. `checkpoint()` runs every
        run.save_interval batches; a resumed trainer starts at `self.step`."""
        hp = self.hp
        num_train, world, rank = hp.labels.num_train, distributed.world_size(), distributed.rank()
        per_rank = core.exact_div(hp.batch_size, world)
        total = hp.epochs * num_train
        stats: dict[str, float] = dict(self.last_stats)
        with logging.progress(hp.total_steps, "reward model", "batch") as bar:
            bar.update(self.step)
            for epoch in range(hp.epochs):
                order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
                for start in range(0, num_train, hp.batch_size):
                    done = epoch * num_train + start
                    if done // hp.batch_size < self.step:
                        continue
                    self.optimizer.set_lr(hp.lr * (1 - done / total))
                    batch = train_labels[order[start + rank * per_rank:start + (rank + 1) * per_rank]]
                    self.optimizer.zero_grad(set_to_none=True)
                    batch_stats = self.accumulate_gradients(batch)
                    distributed.average_gradients(self.params)
                    core.check_finite(f"reward model batch {self.step}", loss=batch_stats["loss"],
                                      gradients=core.grad_norm(self.params))
                    self.optimizer.step()
                    stats = {f"train/{k}": v for k, v in distributed.mean_stats(batch_stats).items()}
                    stats["train/lr"] = self.optimizer.param_groups[0]["lr"]
                    scalar_log.scalars(stats, self.step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['train/loss']:.4f}")
                    if self.step % hp.run.log_interval == 0:
                        logging.print_main(f"batch {self.step}:", logging.format_stats(stats))
                    self.step += 1
                    self.last_stats = stats
                    if self.step % hp.run.save_interval == 0 and self.step < hp.total_steps:
                        checkpoint()
        # The gradients are spent: a reward model frozen for PPO would keep them (its size again) alive.
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def new_round(self, hp: HParams, normalize_on: Policy | None = None) -> None:
        """Go on training with other hparams (an online label round): batches count from 0 again,
        Adam's moments carry over; `normalize_on`, when given, is the policy whose samples
        `normalize` measures from now on."""
        self.hp, self.step = hp, 0
        if normalize_on is not None:
            self.policy = normalize_on

    def generators(self) -> dict[str, torch.Generator]:
        return {"sampling": self.generator}

    def save_state(self, where: Path, checkpoint: str, finished: bool = False, step: int | None = None,
                   online: dict | None = None) -> None:
        """Save what resuming needs, named by `step` (default: the batches trained); an online run
        keeps its rounds' state with it (`online.Progress`; `online_meta` reads it back)."""
        extra: dict = {}
        if self.normalize_before is not None:
            extra["normalize_before"] = self.normalize_before
        if self.last_stats:
            extra["last_stats"] = self.last_stats
        if online is not None:
            extra["online"] = online
        resume.save_state(where, self.step if step is None else step, checkpoint, self.optimizer, self.generators(),
                          dict(query_batches=self.query_batches, extra=extra), finished)

    def restore(self, state: resume.State) -> None:
        resume.restore(state, self.optimizer, self.generators())
        self.step = state.step
        self.last_stats = state.meta["extra"].get("last_stats", {})
        self.normalize_before = state.meta["extra"].get("normalize_before")
        for _ in range(state.meta["query_batches"]):
            next(self.queries)
        self.query_batches = state.meta["query_batches"]

    def labels_of(self, batch: label_files.Labels) -> torch.Tensor:
        return torch.as_tensor(batch.columns[self.label_type.label_key], device=self.reward_model.device)

    def records_per_chunk(self, default: int) -> int:
        """Records per forward pass: run.chunk_size sequences, N sequences a record."""
        return max(1, (self.hp.run.chunk_size or default) // len(self.label_type.response_keys))

    def accumulate_gradients(self, batch: label_files.Labels) -> dict[str, torch.Tensor]:
        """Backpropagate the batch's loss in micro-batches of ≤ chunk_size sequences.

        Every loss is a mean over records, so a micro-batch's loss weighted by its share of the
        records gives the same gradient as the whole batch. Stats are computed on all rewards.
        """
        n = len(batch)
        labels = self.labels_of(batch)
        all_rewards = []
        for part in core.row_slices(n, self.records_per_chunk(n * len(self.label_type.response_keys))):
            rewards = self.rewards_of(batch[part])
            loss, _ = self.label_type.loss(rewards, labels[part])
            (loss * len(rewards) / n).backward()
            all_rewards.append(rewards.detach())
        _, stats = self.label_type.loss(torch.cat(all_rewards), labels)
        return stats

    @torch.no_grad()
    def evaluate(self, heldout: label_files.Labels) -> dict[str, float]:
        """The label type's held-out metrics, from sums over every rank's share of the records."""
        rank, world = distributed.rank(), distributed.world_size()
        shard = heldout[np.arange(rank, len(heldout), world)]
        no_rewards = torch.zeros(0, len(self.label_type.response_keys), dtype=torch.float64,
                                 device=self.reward_model.device)
        sums = self.label_type.metric_sums(no_rewards, self.labels_of(shard[:0]))  # zeros, if this rank has no records
        for part in core.row_slices(len(shard), self.records_per_chunk(self.hp.batch_size)):
            batch = shard[part]
            sums += self.label_type.metric_sums(self.rewards_of(batch).double(), self.labels_of(batch))
        return self.label_type.metrics(distributed.all_reduce_sum(sums).tolist())


def record_rows(batch: label_files.Labels, label_type: label_types.LabelType,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, responses) [records · N, length]: every response of every record, record by record,
    each beside its query (the rows of one batched forward)."""
    keys = label_type.response_keys
    queries = torch.as_tensor(batch.columns["query"], device=device).long()
    responses = torch.stack([torch.as_tensor(batch.columns[k], device=device).long() for k in keys], dim=1)
    return queries.repeat_interleave(len(keys), dim=0), responses.reshape(len(queries) * len(keys), -1)


def target_moments(label_type: label_types.LabelType, train_labels: label_files.Labels) -> tuple[float, float]:
    """Mean and population std that normalized rewards should have, from the training labels."""
    scales = label_type.target_scales(train_labels.columns[label_type.label_key].astype(np.float64))
    if scales is None:
        return 0.0, 1.0
    return float(np.mean(scales)), float(np.std(scales))


def load_labels(hp: HParams, encoding: encodings.Encoding, source: str) -> tuple[label_files.Labels, label_files.Labels]:
    """(training labels, held-out labels); rank 0 downloads the file first, the others then read it."""
    def read():
        return label_files.load(source, label_types.get(hp.labels.type), hp.task.query_length,
                                hp.task.response_length, label_files.Vocabulary(encoding.n_vocab, encoding.padding_token))

    return label_files.split(distributed.main_first(read), hp.labels.num_train, source)


def save(reward_model: RewardModel, encoding_name: str, save_dir: Path, step: int) -> str:
    """Checkpoint the reward model (rank 0; every rank takes part in the replica check); returns the file name."""
    distributed.check_replicas_equal(reward_model)
    name = trained_models.checkpoint_name(step)
    if distributed.is_main():
        trained_models.save_checkpoint(save_dir / save_folders.REWARD_MODEL, reward_model.model.hparams, encoding_name,
                                       reward_model.state_tensors(), step)
    return name


def load_models(hp: HParams, device: torch.device) -> tuple[RewardModel, Policy, str]:
    """(reward model to train, the initial policy that samples for normalization, encoding name)."""
    reward_model, encoding_name = new_reward_model(hp.task, device)
    return reward_model, load_policy(hp.task.policy.initial_model, hp.task, device), encoding_name


def new_reward_model(task: lm_tasks.TaskHParams, device: torch.device) -> tuple[RewardModel, str]:
    """The task's initial model with a fresh reward head, equal on every rank; and its encoding's name."""
    model, encoding_name = trained_models.load_initial(task.policy.initial_model, heads=("reward",), device=device)
    reward_model = RewardModel(model, encodings.get(encoding_name))
    distributed.broadcast_module(reward_model)
    return reward_model, encoding_name


def finished(save_dir: Path) -> bool:
    """Whether `save_dir` holds a reward model whose training finished."""
    state = resume.load_state(resume.folder(save_dir, save_folders.REWARD_MODEL))
    return state is not None and state.finished


def online_meta(state: resume.State) -> dict | None:
    """The online rounds' state that `RewardModelTrainer.save_state` kept with `state`, if any."""
    return state.meta["extra"].get("online")


def train(hp: HParams, within: Resolved | None = None) -> tuple[RewardModel, dict]:
    """Train a reward model per `hp`; returns it and a summary (final train stats, held-out metrics).

    With a save folder, the trainer checkpoints every run.save_interval batches and resumes
    from its last checkpoint when run again with the same hparams. `within` is the train_policy
    run this reward model is trained first in (`run.start_run`).
    """
    resolved = start_run(hp, save_folders.REWARD_HPARAMS, labels_hp=hp, within=within)
    seed, save_dir = resolved.seed, resolved.save_dir
    state = resume.unfinished_state(save_dir, save_folders.REWARD_MODEL, "a reward model run")
    reward_model, policy, encoding_name = load_models(hp, resolved.device)
    label_type = label_types.get(hp.labels.type)
    train_labels, heldout = load_labels(hp, reward_model.encoding, resolved.labels)
    save_hparams(hp, resolved, save_folders.REWARD_HPARAMS)

    trainer = RewardModelTrainer(reward_model, policy, hp, seed)
    if state is not None:
        reward_model.load_tensors(trained_models.load_file(save_dir / save_folders.REWARD_MODEL, state.checkpoint).tensors)
        trainer.restore(state)
        logging.print_main(f"resuming the reward model at batch {state.step} of {hp.total_steps}")

    def checkpoint() -> None:
        trainer.save_state(resume.folder(save_dir, save_folders.REWARD_MODEL),
                           save(reward_model, encoding_name, save_dir, trainer.step))

    scalar_log = logging.ScalarLog(save_dir / save_folders.TENSORBOARD / save_folders.REWARD_MODEL if save_dir else None)
    if hp.normalize_before and state is None:
        trainer.normalize_before = trainer.normalize(*target_moments(label_type, train_labels))
    summary: dict = {} if trainer.normalize_before is None else {"normalize_before": trainer.normalize_before}
    summary["train"] = trainer.train(train_labels, seed, scalar_log, checkpoint if save_dir else lambda: None)
    if hp.normalize_after:
        summary["normalize_after"] = trainer.normalize(0.0, 1.0)
    if len(heldout):
        summary["heldout"] = trainer.evaluate(heldout)
        logging.print_main("held-out:", logging.format_stats(summary["heldout"]))
        scalar_log.scalars({f"heldout/{k}": v for k, v in summary["heldout"].items()}, hp.total_steps)
    scalar_log.close()
    if save_dir is not None:
        core.check_finite("the trained reward model", weights=core.weight_norm(reward_model.parameters()))
        trainer.save_state(resume.folder(save_dir, save_folders.REWARD_MODEL),
                           save(reward_model, encoding_name, save_dir, hp.total_steps), finished=True)
        if distributed.is_main():
            storage.atomic_write_text(save_dir / save_folders.REWARD_SUMMARY, json.dumps(summary, indent=2))
    distributed.barrier()
    return reward_model, summary
