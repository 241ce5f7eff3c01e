"""DPO from preference labels: `./launch.py train_dpo EXPERIMENT NAME ...` (the losses: dpo.py).

The policy learns from the label records themselves, with no reward model and no sampling:
each batch of best-of-N records gets the policy's and the frozen initial policy's
log-probabilities of every response, their implicit rewards β·(log π − log π_ref) and the
`loss` (pairwise or best_of_n). Labels come as train_reward's do (`labels.source`: a label
file, or `mock:<labeler>` collected on the initial policy's samples). The save folder has the
usual layout (utils/save_folders.py): the trained policy in policy/ (sample.py reads it as it
reads PPO's), its resume state in resume/policy/, TensorBoard scalars in tb/dpo/, and
train_dpo_summary.json.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lm_human_preferences.labeling import label_files, label_types
from lm_human_preferences.language import trained_models
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.training import dpo, resume, stopping, train_policy, train_reward
from lm_human_preferences.training.run import RunHParams, save_hparams, start_run
from lm_human_preferences.utils import core, distributed, hyperparams, logging, save_folders, storage
from lm_human_preferences.utils.errors import UserError
from lm_human_preferences.utils.tf_adam import TFAdam


@dataclass
class HParams(hyperparams.HParams):
    run: RunHParams = field(default_factory=RunHParams)
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)
    labels: train_reward.LabelHParams = field(default_factory=train_reward.LabelHParams)  # best_of_N labels
    loss: str = "pairwise"  # pairwise or best_of_n (dpo.py)
    # β, the batch and the lr default to the DPO paper's (Rafailov et al. 2023, appendix B: β 0.1,
    # 64 pairs a batch, lr 1e-6 with RMSprop after a 150-step linear warm-up). Here Adam with TF1's
    # epsilon, as every trainer of this port, and the lr decays linearly to 0 as train_reward's.
    beta: float = 0.1  # the implicit reward's scale: the KL coefficient of the objective DPO solves
    batch_size: int = 64  # records a batch, global (across ranks)
    lr: float = 1e-6
    epochs: int = 1  # passes over the labels; one, as train_reward (the original's one pass over its labels)

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        for name in ("type", "num_train", "source"):
            if getattr(self.labels, name) is None:
                raise UserError(f"hparam {_prefix}labels.{name} must be set")
        if not isinstance(label_types.get(self.labels.type), label_types.BestOfN):
            raise UserError(f"DPO learns from best-of-N labels (labels.type best_of_N), not {self.labels.type}")
        if self.loss not in dpo.LOSSES:
            raise UserError(f"{_prefix}loss must be one of {', '.join(dpo.LOSSES)}, got {self.loss!r}")
        if not 0 < self.beta < float("inf"):
            raise UserError(f"{_prefix}beta must be a positive number, got {self.beta}")
        if not 0 <= self.lr < float("inf"):
            raise UserError(f"{_prefix}lr must be a finite number ≥ 0, got {self.lr}")
        for name, value in (("labels.num_train", self.labels.num_train), ("batch_size", self.batch_size),
                            ("epochs", self.epochs)):
            if value <= 0:
                raise UserError(f"{_prefix}{name} must be positive, got {value}")
        if self.labels.num_train % self.batch_size:
            raise UserError(f"{_prefix}labels.num_train={self.labels.num_train} is not divisible by "
                            f"{_prefix}batch_size={self.batch_size}; change one of them")
        if self.batch_size % distributed.world_size():
            raise UserError(f"{_prefix}batch_size={self.batch_size} must be divisible by the number of ranks "
                            f"({distributed.world_size()}); change it or the number of ranks (--mpi)")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.labels.num_train // self.batch_size


class DPOTrainer:
    """`train(labels, ...)` runs the batches from `self.step` on; `evaluate(heldout)` measures."""

    def __init__(self, policy: Policy, ref_policy: Policy, hp: HParams):
        self.policy = policy
        self.ref_policy = ref_policy
        self.hp = hp
        self.label_type = label_types.get(hp.labels.type)
        self.params = [p for p in policy.model.parameters() if p.requires_grad]
        self.optimizer = TFAdam(self.params, lr=hp.lr, eps=1e-5)
        policy.configure(hp.run)  # run.precision / run.share_queries
        ref_policy.configure(hp.run, frozen=True)
        self.step = 0  # batches trained
        self.last_stats: dict[str, float] = {}

    def rewards_of(self, batch: label_files.Labels) -> torch.Tensor:
        """Implicit rewards [records, N] of every response of every record (with the policy's gradient)."""
        queries, responses = train_reward.record_rows(batch, self.label_type, self.policy.device)
        logprobs = dpo.response_logprobs(self.policy, queries, responses)
        with torch.no_grad():
            ref_logprobs = dpo.response_logprobs(self.ref_policy, queries, responses)
        return dpo.implicit_rewards(logprobs, ref_logprobs, self.hp.beta).view(len(batch), -1)

    def best_of(self, batch: label_files.Labels) -> torch.Tensor:
        return torch.as_tensor(batch.columns[self.label_type.label_key], device=self.policy.device)

    def accumulate_gradients(self, batch: label_files.Labels) -> dict[str, torch.Tensor]:
        """Backpropagate the batch's loss in micro-batches of ≤ run.chunk_size sequences (every loss
        is a mean over records, so shares weighted by their records give the batch's gradient)."""
        n, best = len(batch), self.best_of(batch)
        per_chunk = max(1, (self.hp.run.chunk_size or n * len(self.label_type.response_keys))
                        // len(self.label_type.response_keys))
        rewards = []
        for part in core.row_slices(n, per_chunk):
            chunk_rewards = self.rewards_of(batch[part])
            loss, _ = dpo.loss(self.hp.loss, chunk_rewards, best[part])
            (loss * len(chunk_rewards) / n).backward()
            rewards.append(chunk_rewards.detach())
        return dpo.loss(self.hp.loss, torch.cat(rewards), best)[1]

    def train(self, labels: label_files.Labels, seed: int, scalar_log: logging.ScalarLog,
              checkpoint) -> dict[str, float]:
        """`epochs` passes over the labels, each in a permutation shared by all ranks, the lr decaying
        linearly to 0; `checkpoint()` every run.save_interval batches. SIGINT or SIGTERM stops after
        the current batch, with a checkpoint to resume from."""
        hp, rank = self.hp, distributed.rank()
        num_train = hp.labels.num_train
        per_rank = core.exact_div(hp.batch_size, distributed.world_size())
        with logging.progress(hp.total_steps, "dpo", "batch") as bar, stopping.graceful() as stop:
            bar.update(self.step)
            while self.step < hp.total_steps:
                done = self.step * hp.batch_size
                epoch, start = divmod(done, num_train)
                order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
                batch = labels[order[start + rank * per_rank:start + (rank + 1) * per_rank]]
                self.optimizer.set_lr(hp.lr * (1 - done / (hp.epochs * num_train)))
                self.optimizer.zero_grad(set_to_none=True)
                batch_stats = self.accumulate_gradients(batch)
                distributed.average_gradients(self.params)
                core.check_finite(f"DPO batch {self.step}", loss=batch_stats["loss"], gradients=core.grad_norm(self.params))
                self.optimizer.step()
                stats = {f"dpo/{k}": v for k, v in distributed.mean_stats(batch_stats).items()}
                stats["dpo/lr"] = self.optimizer.param_groups[0]["lr"]
                scalar_log.scalars(stats, self.step)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['dpo/loss']:.4f}", margin=f"{stats['dpo/margin']:.3f}")
                if self.step % hp.run.log_interval == 0:
                    logging.print_main(f"batch {self.step}:", logging.format_stats(stats))
                self.step, self.last_stats = self.step + 1, stats
                stop_now = stop.requested()
                if self.step < hp.total_steps and (stop_now or self.step % hp.run.save_interval == 0):
                    checkpoint()
                if stop_now:
                    stop.exit(f"after DPO batch {self.step}; rerun the same command to resume")
        return self.last_stats

    @torch.no_grad()
    def evaluate(self, heldout: label_files.Labels) -> dict[str, float]:
        """The implicit reward's held-out accuracy (the label type's metrics, from every rank's sums)."""
        rank, world = distributed.rank(), distributed.world_size()
        shard = heldout[np.arange(rank, len(heldout), world)]
        n = len(self.label_type.response_keys)
        sums = self.label_type.metric_sums(torch.zeros(0, n, dtype=torch.float64, device=self.policy.device),
                                           self.best_of(shard[:0]))
        for part in core.row_slices(len(shard), max(1, (self.hp.run.chunk_size or self.hp.batch_size * n) // n)):
            batch = shard[part]
            sums += self.label_type.metric_sums(self.rewards_of(batch).double(), self.best_of(batch))
        return self.label_type.metrics(distributed.all_reduce_sum(sums).tolist())

    def save_state(self, where: Path, checkpoint: str, finished: bool = False) -> None:
        resume.save_state(where, self.step, checkpoint, self.optimizer, {}, dict(last_stats=self.last_stats), finished)

    def restore(self, state: resume.State, weights: dict[str, torch.Tensor]) -> None:
        trained_models.load_into(self.policy.model, weights, "the policy checkpoint")
        resume.restore(state, self.optimizer, {})
        self.step, self.last_stats = state.step, state.meta["last_stats"]


def train(hp: HParams) -> tuple[Policy, dict]:
    """Train a policy by DPO per `hp`; returns it and a summary (last batch's stats, held-out
    metrics). With a save folder, a run resumes from its last checkpoint when run again."""
    resolved = start_run(hp, save_folders.DPO_HPARAMS, labels_hp=hp)
    seed, save_dir = resolved.seed, resolved.save_dir
    state = resume.unfinished_state(save_dir, save_folders.POLICY, "a DPO run")
    policy, ref_policy = train_policy.load_policies(hp.task, resolved.device, heads=())
    train_labels, heldout = train_reward.load_labels(hp, policy.encoding, resolved.labels)
    save_hparams(hp, resolved, save_folders.DPO_HPARAMS)
    trainer = DPOTrainer(policy, ref_policy, hp)
    if state is not None:
        trainer.restore(state, trained_models.load_file(save_dir / save_folders.POLICY, state.checkpoint).tensors)
        logging.print_main(f"resuming DPO at batch {state.step} of {hp.total_steps}")

    def checkpoint(finished: bool = False) -> None:
        trainer.save_state(resume.folder(save_dir, save_folders.POLICY),
                           train_policy.save_policy(policy, save_dir, trainer.step), finished)

    scalar_log = logging.ScalarLog(save_dir / save_folders.TENSORBOARD / save_folders.DPO_LOG if save_dir else None)
    try:
        summary: dict = {"train": trainer.train(train_labels, seed, scalar_log, checkpoint if save_dir else lambda: None)}
        if len(heldout):
            summary["heldout"] = trainer.evaluate(heldout)
            logging.print_main("held-out:", logging.format_stats(summary["heldout"]))
            scalar_log.scalars({f"heldout/{k}": v for k, v in summary["heldout"].items()}, hp.total_steps)
    finally:
        scalar_log.close()
    if save_dir is not None:
        checkpoint(finished=True)
        if distributed.is_main():
            storage.atomic_write_text(save_dir / save_folders.DPO_SUMMARY, json.dumps(summary, indent=2))
            samples = [dict(query=q, before=b, after=a)
                       for q, b, a in train_policy.before_after_samples(policy, ref_policy, hp.task, seed)]
            storage.atomic_write_text(save_dir / save_folders.SAMPLES, json.dumps(samples, indent=1))
    distributed.barrier()
    summary["seed"] = seed
    return policy, summary
