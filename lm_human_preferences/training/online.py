"""Online training, as the paper's online mode: labels are collected while the policy trains.

`--rewards.online on` (with `rewards.train_new_model`) makes `train_policy` run in rounds.
Round 0, before PPO, labels questions sampled from the initial policy and trains the reward
model on them, as an offline run does. Every `interval` PPO episodes after that, a round
samples new questions from the CURRENT policy, has them labelled (by a mock labeler or by
people through the labeling app), trains the reward model further and renormalizes it; PPO
then goes on against it (`train_policy.train_online` interleaves the rounds with PPO).

Here: the mode's hparams, its schedule, and the rounds — their labels, the reward model's
training, and their state, which the reward model's resume state carries. docs/online.md
explains the schedule, how a round trains and renormalizes the reward model, what a round does
to the KL penalty, and the files an online run leaves.
"""

import contextlib
import copy
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lm_human_preferences.labeling import collect, label_files, label_types, mock_labelers, sources
from lm_human_preferences.labeling.app import label_writer
from lm_human_preferences.labeling.app import queue as label_queue
from lm_human_preferences.labeling.app import web
from lm_human_preferences.labeling.app.people import PeopleLabeler
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.task.rewards import RewardModel
from lm_human_preferences.training import resume, train_reward
from lm_human_preferences.training.ppo import PpoHParams
from lm_human_preferences.training.run import Resolved, RunHParams
from lm_human_preferences.utils import core, distributed, hyperparams, logging, save_folders, storage
from lm_human_preferences.utils.errors import Stopped, UserError

ROUND_SEED_STRIDE = 7919  # round k samples and labels with seed + k · stride
MAX_ASKED = 20  # questions asked per label wanted before giving up on a labeler that skips them all
NORMALIZE_ON = ("current", "initial")


@dataclass
class OnlineHParams(hyperparams.HParams):
    """Label rounds while the policy trains (train_policy's `rewards.online`)."""

    initial_share: float = 0.5  # f: the share of the label budget labelled before PPO
    interval: Optional[int] = None  # K: PPO episodes between rounds; None: a fifth of the run (whole PPO batches)
    epochs: int = 1  # reward-model passes per round after the first
    all_labels: bool = False  # those passes go over every label so far, not only the round's new ones
    lr: Optional[float] = None  # the reward model's lr in rounds after the first; None: its own lr
    normalize_on: str = "current"  # whose samples later rounds renormalize on: the current or the initial policy's
    # Later rounds multiply kl_coef by the new reward model's spread over the old one's on the
    # round's samples (the current policy's), so that the KL penalty keeps its weight against a
    # reward whose scale changed (docs/online.md: why `normalize_on initial` overshoots its KL target).
    rescale_kl_coef: bool = False

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        if not 0 < self.initial_share <= 1:
            raise UserError(f"{_prefix}initial_share must be in (0, 1], got {self.initial_share}")
        if self.interval is not None and self.interval <= 0:
            raise UserError(f"{_prefix}interval must be a positive number of episodes, got {self.interval}")
        if self.epochs <= 0:
            raise UserError(f"{_prefix}epochs must be positive, got {self.epochs}")
        if self.lr is not None and not 0 <= self.lr < float("inf"):
            raise UserError(f"{_prefix}lr must be a finite number ≥ 0, got {self.lr}")
        if self.normalize_on not in NORMALIZE_ON:
            raise UserError(f"{_prefix}normalize_on must be one of {', '.join(NORMALIZE_ON)}, got {self.normalize_on!r}")


def _updates(ppo: PpoHParams) -> int:
    """The run's PPO updates (train_policy's `HParams.total_updates`)."""
    return core.ceil_div(ppo.total_episodes, ppo.batch_size)


def interval(online: OnlineHParams, ppo: PpoHParams) -> int:
    """K, in episodes: `online.interval`, else a fifth of the run in whole PPO batches."""
    return online.interval if online.interval is not None else ppo.batch_size * max(1, _updates(ppo) // 5)


def check(online: OnlineHParams, reward_hp: train_reward.HParams | None, ppo: PpoHParams) -> None:
    """What an online run needs beyond each group's own checks (train_policy's `HParams.validate`)."""
    if reward_hp is None:
        raise UserError("rewards.online trains the reward model while the policy trains: set "
                        "rewards.train_new_model, not rewards.trained_model")
    if interval(online, ppo) % ppo.batch_size:
        raise UserError(f"rewards.online.interval={interval(online, ppo)} must be a whole number of PPO batches "
                        f"(ppo.batch_size={ppo.batch_size})")
    sources.check_online(reward_hp.labels.source, reward_hp.labels.type)


@dataclass(frozen=True)
class Round:
    index: int
    update: int  # the PPO update it comes before
    episode: int  # the PPO episodes before it
    labels: int  # training labels once it is done


def schedule(online: OnlineHParams, reward_hp: train_reward.HParams, ppo: PpoHParams) -> list[Round]:
    """The label rounds of a train_policy run. With the label budget B = the reward model's
    `labels.num_train` (an offline run's, so the modes compare at an equal budget), rounds
    k = 1..R come before the PPO updates at episodes k·K (K = `interval`, every k·K before the
    run's last episode), and round k leaves

        L_k = B · (f + (1 − f) · √(k / R)),    f = `initial_share`,

    training labels, rounded to whole reward-model batches (L_R = B; a round that would add none
    is left out): front-loaded, round k ≥ 1 adding labels at a rate decaying like 1/√k."""
    budget, batch = reward_hp.labels.num_train, reward_hp.batch_size
    starts = range(0, _updates(ppo) * ppo.batch_size, interval(online, ppo))
    last = len(starts) - 1
    rounds: list[Round] = []
    for k, episode in enumerate(starts):
        share = 1.0 if k == last else online.initial_share + (1 - online.initial_share) * math.sqrt(k / last)
        labels = min(budget, batch * max(1, int(budget * share / batch + 0.5)))
        if not rounds or labels > rounds[-1].labels:
            rounds.append(Round(len(rounds), episode // ppo.batch_size, episode, labels))
    return rounds


def round_seed(seed: int, index: int) -> int:
    """The seed of round `index`'s samples and mock labels (round 0: the run's seed, as the offline demo)."""
    return seed + index * ROUND_SEED_STRIDE


# -- labels


class LabelQueries:
    """The train queries label rounds ask about: one stream for the whole run; a resumed run skips those drawn."""

    def __init__(self, task: lm_tasks.TaskHParams, encoding: encodings.Encoding, device: torch.device, drawn: int):
        self.stream = lm_tasks.query_batches(task, encoding, 1, device=device)
        for _ in range(drawn):
            next(self.stream)
        self.drawn = drawn

    def take(self, n: int) -> torch.Tensor:
        self.drawn += n
        return torch.cat([next(self.stream) for _ in range(n)])


class Heartbeat:
    """Rank 0 labels while the other ranks wait in a collective every poll, so a wait for people
    (hours, maybe) never runs into a collective's timeout; a stop request ends the wait on every rank."""

    def __init__(self, stop, where: str):
        self.stop, self.where = stop, where

    def beat(self) -> None:
        """Rank 0, while it waits."""
        signum = self.stop.signum
        distributed.broadcast_object(("stop", signum) if signum else ("wait", None))
        if signum:
            self._exit(signum)

    def result(self, make: Callable):
        """`make()` on rank 0 (calling `beat` while it waits), its result on every rank."""
        if distributed.is_main():
            return distributed.broadcast_object(("done", make()))[1]
        while True:
            kind, value = distributed.broadcast_object(None)
            if kind == "done":
                return value
            if kind == "stop":
                self._exit(value)

    def _exit(self, signum: int) -> None:
        raise Stopped(signum, f"stopped by {signal.Signals(signum).name} {self.where}; "
                              "rerun the same command to resume")


def collect_round(policy: Policy, task: lm_tasks.TaskHParams, label_type: label_types.LabelType, labeler,
                  queries: LabelQueries, seed: int, need: int, carried: list[collect.Question], min_ask: int,
                  chunk_size: int | None) -> tuple[list[dict], int]:
    """`need` records on the policy's answers to fresh queries (the `carried` questions first).
    Every ask is for as many questions as records are missing, and at least `min_ask` (a mock
    labeler answers a whole sampling batch at no cost; people should not answer questions whose
    labels would be dropped). Returns the records and the number of questions asked."""
    generator = torch.Generator(policy.device).manual_seed(seed)
    n_responses = len(label_type.response_keys)
    records: list[dict] = []
    asked, batch = 0, carried
    while len(records) < need:
        if not batch:
            if asked >= MAX_ASKED * need:
                raise UserError(f"the labeler skipped all but {len(records)} of {asked} questions; it cannot tell "
                                "this policy's samples apart")
            batch = collect.ask(policy, task, queries.take(max(min_ask, need - len(records))), n_responses, generator,
                                chunk_size)
        asked += len(batch)
        for question, label in zip(batch, labeler.answer(batch)):
            if label is not None and len(records) < need:
                records.append(label_writer.record(label_type, question, label))
        batch = []
    return records, asked


def as_labels(records: list[dict], label_type: label_types.LabelType, task: lm_tasks.TaskHParams) -> label_files.Labels:
    """Label records (the released schema) as the columns a reward model trains on."""
    schemas = label_type.question_schemas(task.query_length, task.response_length)
    columns = {key: np.asarray([r[key] for r in records], dtype=np.int32).reshape(len(records), *schema.shape)
               for key, schema in schemas.items()}
    columns[label_type.label_key] = np.asarray([r[label_type.label_key] for r in records], dtype=label_type.label_dtype)
    return label_files.Labels(columns)


# -- the run


@dataclass
class Progress:
    """Where the schedule stands: the rounds' state, which the reward model's resume state carries."""

    train: list[dict]  # training label records so far
    heldout: list[dict]  # held-out label records so far
    rounds: list[dict]  # the summaries of the finished rounds
    queries: int = 0  # label queries drawn
    taken: int = 0  # questions of the app's queue that finished rounds took

    def meta(self) -> dict:
        return dict(train=len(self.train), heldout=len(self.heldout), rounds=self.rounds, queries=self.queries,
                    taken=self.taken)

    @staticmethod
    def load(meta: dict, save_dir: Path) -> "Progress":
        """The state `meta` saved (`train_reward.online_meta`), its labels read back."""
        def records(name: str, count: int) -> list[dict]:
            path = save_dir / name
            found = json.loads(path.read_text()) if path.exists() else []
            if len(found) < count:
                raise UserError(f"{path} holds {len(found)} labels, the resume state {count}; rerun with "
                                "--run.overwrite on to start over")
            return found[:count]  # labels of a round cut short after they were written are dropped

        return Progress(records(save_folders.LABELS, meta["train"]), records(save_folders.HELDOUT_LABELS, meta["heldout"]),
                        meta["rounds"],
                        meta["queries"], meta["taken"])


def round_hparams(reward_hp: train_reward.HParams, online: OnlineHParams, index: int,
                  train_labels: int) -> train_reward.HParams:
    """The reward model's hparams for one round's training on `train_labels` labels."""
    hp = copy.deepcopy(reward_hp)
    hp.labels.num_train = train_labels
    hp.normalize_before = reward_hp.normalize_before and index == 0
    if index > 0:
        hp.epochs = online.epochs
        hp.lr = reward_hp.lr if online.lr is None else online.lr
    return hp


def snapshot(policy: Policy, task: lm_tasks.TaskHParams, run_hp: RunHParams) -> Policy:
    """A frozen copy of the policy as it is now, to sample from for the reward model's normalization."""
    copied = Policy(copy.deepcopy(policy.model), policy.encoding, task)
    return copied.configure(run_hp, frozen=True)


class OnlineRun:
    """The reward model's side of an online run: label rounds, its training, its state.

    `run_hp` is the policy run's (`run.chunk_size`, precision); the reward model's task is the
    policy's (train_policy's `HParams.validate`)."""

    def __init__(self, online: OnlineHParams, reward_hp: train_reward.HParams, run_hp: RunHParams,
                 trainer: train_reward.RewardModelTrainer, progress: Progress, resolved: Resolved, encoding_name: str,
                 people: PeopleLabeler | None, kl_ctl):
        self.online, self.reward_hp, self.run_hp, self.task = online, reward_hp, run_hp, reward_hp.task
        self.trainer, self.progress, self.encoding_name, self.people = trainer, progress, encoding_name, people
        self.kl_ctl = kl_ctl  # PPO's KL controller: `rescale_kl_coef` rescales its value
        self.save_dir, self.seed = resolved.save_dir, resolved.seed
        self.label_type = label_types.get(self.reward_hp.labels.type)
        self.queries = LabelQueries(self.task, trainer.reward_model.encoding, trainer.reward_model.device,
                                    progress.queries)
        self.scalar_log = logging.ScalarLog(self.save_dir / save_folders.TENSORBOARD / save_folders.ONLINE_LOG
                                            if self.save_dir else None)

    def labels(self, policy: Policy, rnd: Round, heartbeat: Heartbeat) -> tuple[list[dict], list[dict], int]:
        """The round's new training and held-out records, labelled on rank 0, on every rank."""
        new = rnd.labels - len(self.progress.train)
        need = new + sources.held_out_count(new)

        def make():
            whose = "initial" if rnd.update == 0 else "current"
            logging.print_main(f"label round {rnd.index} (before PPO update {rnd.update}): {need} labels "
                               f"({new} to train on) on the {whose} policy's samples")
            chunk_size = self.run_hp.chunk_size
            people, labeler, carried, min_ask = self.people, self.people, [], 1
            if people is not None:
                people.beat, carried = heartbeat.beat, people.pending()
            else:
                name, noise = mock_labelers.parse_source(self.reward_hp.labels.source)
                labeler = collect.MockLabeler(name, noise, round_seed(self.seed, rnd.index))
                min_ask = max(1, (chunk_size or 512) // len(self.label_type.response_keys))
            with torch.no_grad():
                records, asked = collect_round(policy, self.task, self.label_type, labeler, self.queries,
                                               round_seed(self.seed, rnd.index), need, carried, min_ask, chunk_size)
            return records, asked, self.queries.drawn, people.taken if people else self.progress.taken

        records, asked, self.progress.queries, self.progress.taken = heartbeat.result(make)
        return records[:new], records[new:], asked

    def run_round(self, policy: Policy, rnd: Round, heartbeat: Heartbeat) -> dict:
        started = time.time()
        first_query = self.progress.queries
        train_new, heldout_new, asked = self.labels(policy, rnd, heartbeat)
        trainer, progress = self.trainer, self.progress
        summary: dict = dict(round=rnd.index, update=rnd.update, episodes=rnd.episode,
                             first_query=first_query, questions=asked, new_labels=len(train_new),
                             labels=rnd.labels, policy_checkpoint=None)
        if rnd.update > 0:
            summary["policy_checkpoint"] = trained_models.checkpoint_name(rnd.update)
        if rnd.update > 0 and heldout_new:
            summary["previous_accuracy"] = trainer.evaluate(as_labels(heldout_new, self.label_type, self.task))
        round_labels = as_labels(train_new + heldout_new, self.label_type, self.task)
        spread_before = self.spread(round_labels) if rnd.update > 0 and len(round_labels) else None
        progress.train += train_new
        progress.heldout += heldout_new
        summary["heldout_labels"] = len(progress.heldout)
        round_hp = round_hparams(self.reward_hp, self.online, rnd.index,
                                 rnd.labels if rnd.index == 0 or self.online.all_labels else len(train_new))
        trained = progress.train[-round_hp.labels.num_train:]
        # Round 0 normalizes on the initial policy's samples, as an offline run; later rounds on the
        # current policy's, unless normalize_on says initial.
        current = rnd.update > 0 and self.online.normalize_on == "current"
        trainer.new_round(round_hp, normalize_on=snapshot(policy, self.task, self.run_hp) if current else None)
        train_labels = as_labels(trained, self.label_type, self.task)
        if round_hp.normalize_before:
            summary["normalize_before"] = trainer.normalize(*train_reward.target_moments(self.label_type, train_labels))
        scalar_log = logging.ScalarLog(self.save_dir / save_folders.TENSORBOARD / save_folders.REWARD_MODEL
                                       / f"round{rnd.index}" if self.save_dir else None)
        summary["train"] = trainer.train(train_labels, round_seed(self.seed, rnd.index), scalar_log, lambda: None)
        scalar_log.close()
        if round_hp.normalize_after:
            summary["normalize_after"] = trainer.normalize(0.0, 1.0)
        if progress.heldout:
            summary["heldout"] = trainer.evaluate(as_labels(progress.heldout, self.label_type, self.task))
        if spread_before:
            summary["reward_scale"] = self.spread(round_labels) / spread_before
            if self.online.rescale_kl_coef:
                self.kl_ctl.value *= summary["reward_scale"]
        summary["kl_coef"] = self.kl_ctl.value  # PPO's from this round on (a resumed run takes it from here)
        summary["seconds"] = time.time() - started
        progress.rounds.append(summary)
        self.log(summary)
        self.save(rnd)
        return summary

    @torch.no_grad()
    def spread(self, labels: label_files.Labels) -> float:
        """The reward model's std over every response of `labels` (identical on every rank: no collective)."""
        per_chunk = self.trainer.records_per_chunk(len(labels) * len(self.label_type.response_keys))
        rewards = torch.cat([self.trainer.rewards_of(labels[start:start + per_chunk]).flatten()
                             for start in range(0, len(labels), per_chunk)])
        return rewards.float().std(unbiased=False).item()

    def log(self, summary: dict) -> None:
        accuracy = summary.get("heldout", {}).get("accuracy")
        previous = summary.get("previous_accuracy", {}).get("accuracy")
        scalars = {"online/labels": summary["labels"], "online/questions": summary["questions"]}
        if accuracy is not None:
            scalars["online/heldout_accuracy"] = accuracy
        if "reward_scale" in summary:
            scalars["online/reward_scale"] = summary["reward_scale"]
        if previous is not None:
            scalars["online/previous_accuracy"] = previous
        self.scalar_log.scalars(scalars, summary["update"])
        logging.print_main(f"label round {summary['round']} done: {summary['labels']} labels "
                           f"(+{summary['new_labels']}, {summary['questions']} questions asked), "
                           + logging.format_stats(scalars))

    def save(self, rnd: Round) -> None:
        """Labels, the reward model and its state with the schedule position (a collective)."""
        if self.save_dir is None:
            return
        if distributed.is_main():
            label_files.write(self.progress.train, self.save_dir / save_folders.LABELS)
            label_files.write(self.progress.heldout, self.save_dir / save_folders.HELDOUT_LABELS)
            storage.atomic_write_text(self.save_dir / save_folders.ONLINE_SUMMARY,
                                      json.dumps(self.progress.rounds, indent=1))
        checkpoint = train_reward.save(self.trainer.reward_model, self.encoding_name, self.save_dir, rnd.index)
        # batches count from 0 every round: the saved state is named by the round
        self.trainer.save_state(resume.folder(self.save_dir, save_folders.REWARD_MODEL), checkpoint, step=rnd.index,
                                online=self.progress.meta())


def start_people(reward_hp: train_reward.HParams, resolved: Resolved, progress: Progress, padding_token: int,
                 stack: contextlib.ExitStack) -> PeopleLabeler | None:
    """For labels from people (`app`), rank 0 serves the labeling app for the run's life (closed by
    `stack`) and gets a `PeopleLabeler`; None elsewhere (mock labelers: each round makes its own)."""
    source = reward_hp.labels.source
    port = sources.app_port(source)
    if port is None or not distributed.is_main():
        return None
    label_type = label_types.get(reward_hp.labels.type)
    queue = label_queue.LabelQueue(resolved.save_dir / save_folders.APP / save_folders.LABELS, label_type,
                                   seed=resolved.seed)
    stack.callback(queue.close)
    page = web.Page(f"online labels: {label_type.name}", web.instructions("", source, label_type))
    label_server = web.LabelServer(queue, page, port=port)
    label_server.start()
    stack.callback(label_server.server_close)
    stack.callback(label_server.shutdown)
    logging.print_main(f"labeling app: open {label_server.url} (answers so far: {queue.paths['sqlite']})")
    return PeopleLabeler(queue, padding_token, progress.taken, label_server.url, report=logging.print_main)


def reward_side(task: lm_tasks.TaskHParams, device: torch.device,
                save_dir: Path | None) -> tuple[RewardModel, str, resume.State | None, Progress]:
    """The reward model an online run trains — fresh, or as the last finished round of the run it
    resumes left it —, its encoding's name, its resume state (None: fresh) and the rounds' state."""
    state = resume.load_state(resume.folder(save_dir, save_folders.REWARD_MODEL)) if save_dir else None
    reward_model, encoding_name = train_reward.new_reward_model(task, device)
    if state is None:
        return reward_model, encoding_name, None, Progress([], [], [])
    reward_model.load_tensors(trained_models.load_file(save_dir / save_folders.REWARD_MODEL, state.checkpoint).tensors)
    return reward_model, encoding_name, state, Progress.load(train_reward.online_meta(state), save_dir)
