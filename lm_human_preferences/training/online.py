"""Online training, as the paper's online mode: labels are collected while the policy trains.

`--rewards.online on` (with `rewards.train_new_model`) makes `train_policy` run in rounds.
Round 0, before PPO, labels questions sampled from the initial policy and trains the reward
model on them, as an offline run does. Every `interval` PPO episodes after that, a round
samples new questions from the CURRENT policy, has them labelled, trains the reward model
further and renormalizes it; PPO then goes on against it.

Schedule. The label budget B is the reward model's `labels.num_train`, the number an offline
run trains on, so the two modes compare at an equal budget. Rounds k = 1..R come before the
PPO updates at episodes k·K (K = `interval`; every k·K before the run's last episode), and
the training labels collected once round k is done are

    L_k = B · (f + (1 − f) · √(k / R)),    f = `initial_share`,

rounded to whole reward-model batches (L_R = B; a round that would add none is left out).
So round 0 collects f·B labels and round k ≥ 1 about B·(1 − f)·(√k − √(k−1))/√R: front-loaded,
at a rate decaying like 1/√k. As in the offline demo, every round also collects a quarter as
many held-out labels, which are never trained on.

Reward model. Round 0 trains it as an offline run does (normalize before, `epochs` passes at
its lr, normalize after). Round k ≥ 1 makes `online.epochs` passes over the round's new
labels (with `online.all_labels`: over every label so far), the learning rate (`online.lr`,
default the reward model's) falling linearly to 0 over the round; Adam's moments carry over
from round to round. Then the reward model is normalized as the original does after
training — gain and bias reset, rewards measured on fresh samples, gain and bias set so they
are N(0, 1) — on samples of the current policy: the original normalized on samples of the
policy that PPO was about to start from; online, that is the current policy, not the
initial one. `online.normalize_on initial` keeps the initial policy's samples instead, so the
reward's scale stays the one PPO started with (the README's bench compares both). A round's
summary gives the previous reward model's accuracy on the round's new held-out labels (how far
it had fallen behind the policy) and the new one's on all held-out labels so far.

The KL penalty across a round. PPO's reward is score − kl_coef · KL, and kl_coef is a price of
KL in units of the score; the adaptive controller moves it by at most 1 ± 0.2 · batch/horizon an
update. A round changes the score's unit at once: its `reward_scale` (in the summary) is the new
reward model's spread over the old one's, both on every response of the round's new labels (the
current policy's samples). Normalized on the current policy, that is about 1. Normalized on
the initial policy (`normalize_on initial`), the reward model is measured where the policy no
longer samples, and on the policy's samples its spread grows round by round (1.1 → 4.8 on
`mock_descriptiveness`): the penalty weighs less and less, faster than the controller can
follow, and the run overshoots its KL target (README, "The paper's findings"). With
`online.rescale_kl_coef` a round multiplies kl_coef by its `reward_scale`, so the penalty keeps
its weight; the controller steers as before between rounds. (The scale is measured on the
round's own responses, four a best-of-4 label: a round of a few dozen labels measures it
roughly.)

Labelers (`labels.source`): `mock:<labeler>[:<noise>]`, the mock labelers of the offline demo
(ties skipped, as there); or `app[:<port>]`, people, through the labeling app that rank 0
serves on 127.0.0.1:<port> (default 8000; 0 picks a free one) while the run lasts. A round
then waits, printing progress, until people have answered its questions.

Files in the save folder: `labels.json` (every training label so far, in the released schema,
growing round by round), `heldout_labels.json`, `online_summary.json` (one entry per round),
`reward_model/` (a checkpoint per round, named by the round), `app/labels.json*` (the app's
questions and database of answers). The reward model's resume state (`resume/reward_model`,
saved after every round, named by the round) carries the schedule position: rounds done,
labels kept, queries drawn, app questions taken; PPO's (`resume/policy`) has a checkpoint at
every round's update. Rerun with the same command, a stopped or killed run goes on from its
last finished round and its last PPO checkpoint: a round cut short is done again, except
that questions already given to people are kept (their answers are in the app's database)
and not asked again. SIGINT or SIGTERM stop the run after the current PPO update or label
round, or at once while it waits for people.
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
from lm_human_preferences.training import resume, stopping, train_policy, train_reward
from lm_human_preferences.training.run import save_hparams
from lm_human_preferences.training.train_policy import HParams, OnlineHParams
from lm_human_preferences.utils import distributed, logging, save_folders, storage
from lm_human_preferences.utils.errors import Stopped, UserError

ROUND_SEED_STRIDE = 7919  # round k samples and labels with seed + k · stride
MAX_ASKED = 20  # questions asked per label wanted before giving up on a labeler that skips them all


@dataclass(frozen=True)
class Round:
    index: int
    update: int  # the PPO update it comes before
    labels: int  # training labels once it is done


def schedule(hp: HParams) -> list[Round]:
    """The label rounds of a train_policy run (see the module doc)."""
    online, reward_hp = hp.rewards.online, hp.rewards.train_new_model
    budget, batch = reward_hp.labels.num_train, reward_hp.batch_size
    starts = range(0, hp.total_updates * hp.ppo.batch_size, hp.online_interval)
    last = len(starts) - 1
    rounds: list[Round] = []
    for k, episode in enumerate(starts):
        share = 1.0 if k == last else online.initial_share + (1 - online.initial_share) * math.sqrt(k / last)
        labels = min(budget, batch * max(1, int(budget * share / batch + 0.5)))
        if not rounds or labels > rounds[-1].labels:
            rounds.append(Round(len(rounds), episode // hp.ppo.batch_size, labels))
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
    """Where the schedule stands: what the reward model's resume state carries."""

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


def snapshot(policy: Policy, hp: HParams) -> Policy:
    """A frozen copy of the policy as it is now, to sample from for the reward model's normalization."""
    copied = Policy(copy.deepcopy(policy.model), policy.encoding, hp.task)
    return copied.configure(hp.run, frozen=True)


class OnlineRun:
    """The reward model's side of an online run: label rounds, its training, its state."""

    def __init__(self, hp: HParams, trainer: train_reward.RewardModelTrainer, progress: Progress, save_dir: Path | None,
                 encoding_name: str, seed: int, people: PeopleLabeler | None, kl_ctl):
        self.hp, self.trainer, self.progress, self.save_dir = hp, trainer, progress, save_dir
        self.kl_ctl = kl_ctl  # PPO's KL controller: `rescale_kl_coef` rescales its value
        self.reward_hp = hp.rewards.train_new_model
        self.label_type = label_types.get(self.reward_hp.labels.type)
        self.encoding_name, self.seed, self.people = encoding_name, seed, people
        self.queries = LabelQueries(hp.task, trainer.reward_model.encoding, trainer.reward_model.device,
                                    progress.queries)
        self.scalar_log = logging.ScalarLog(save_dir / save_folders.TENSORBOARD / save_folders.ONLINE_LOG
                                            if save_dir else None)

    def labels(self, policy: Policy, rnd: Round, heartbeat: Heartbeat) -> tuple[list[dict], list[dict], int]:
        """The round's new training and held-out records, labelled on rank 0, on every rank."""
        new = rnd.labels - len(self.progress.train)
        need = new + sources.held_out_count(new)

        def make():
            whose = "initial" if rnd.update == 0 else "current"
            logging.print_main(f"label round {rnd.index} (before PPO update {rnd.update}): {need} labels "
                               f"({new} to train on) on the {whose} policy's samples")
            chunk_size = self.hp.run.chunk_size
            people, labeler, carried, min_ask = self.people, self.people, [], 1
            if people is not None:
                people.beat, carried = heartbeat.beat, people.pending()
            else:
                name, noise = mock_labelers.parse_source(self.reward_hp.labels.source)
                labeler = collect.MockLabeler(name, noise, round_seed(self.seed, rnd.index))
                min_ask = max(1, (chunk_size or 512) // len(self.label_type.response_keys))
            with torch.no_grad():
                records, asked = collect_round(policy, self.hp.task, self.label_type, labeler, self.queries,
                                               round_seed(self.seed, rnd.index), need, carried, min_ask, chunk_size)
            return records, asked, self.queries.drawn, people.taken if people else self.progress.taken

        records, asked, self.progress.queries, self.progress.taken = heartbeat.result(make)
        return records[:new], records[new:], asked

    def run_round(self, policy: Policy, rnd: Round, heartbeat: Heartbeat) -> dict:
        started = time.time()
        first_query = self.progress.queries
        train_new, heldout_new, asked = self.labels(policy, rnd, heartbeat)
        trainer, progress = self.trainer, self.progress
        summary: dict = dict(round=rnd.index, update=rnd.update, episodes=rnd.update * self.hp.ppo.batch_size,
                             first_query=first_query, questions=asked, new_labels=len(train_new),
                             labels=rnd.labels, policy_checkpoint=None)
        if rnd.update > 0:
            summary["policy_checkpoint"] = trained_models.checkpoint_name(rnd.update)
        if rnd.update > 0 and heldout_new:
            summary["previous_accuracy"] = trainer.evaluate(as_labels(heldout_new, self.label_type, self.hp.task))
        round_labels = as_labels(train_new + heldout_new, self.label_type, self.hp.task)
        spread_before = self.spread(round_labels) if rnd.update > 0 and len(round_labels) else None
        progress.train += train_new
        progress.heldout += heldout_new
        summary["heldout_labels"] = len(progress.heldout)
        round_hp = round_hparams(self.reward_hp, self.hp.rewards.online, rnd.index,
                                 rnd.labels if rnd.index == 0 or self.hp.rewards.online.all_labels else len(train_new))
        trained = progress.train[-round_hp.labels.num_train:]
        # Round 0 normalizes on the initial policy's samples, as an offline run; later rounds on the
        # current policy's, unless normalize_on says initial.
        current = rnd.update > 0 and self.hp.rewards.online.normalize_on == "current"
        trainer.new_round(round_hp, normalize_on=snapshot(policy, self.hp) if current else None)
        train_labels = as_labels(trained, self.label_type, self.hp.task)
        if round_hp.normalize_before:
            summary["normalize_before"] = trainer.normalize(*train_reward.target_moments(self.label_type, train_labels))
        scalar_log = logging.ScalarLog(self.save_dir / save_folders.TENSORBOARD / save_folders.REWARD_MODEL
                                       / f"round{rnd.index}" if self.save_dir else None)
        summary["train"] = trainer.train(train_labels, round_seed(self.seed, rnd.index), scalar_log, lambda: None)
        scalar_log.close()
        if round_hp.normalize_after:
            summary["normalize_after"] = trainer.normalize(0.0, 1.0)
        if progress.heldout:
            summary["heldout"] = trainer.evaluate(as_labels(progress.heldout, self.label_type, self.hp.task))
        if spread_before:
            summary["reward_scale"] = self.spread(round_labels) / spread_before
            if self.hp.rewards.online.rescale_kl_coef:
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


def start_people(hp: HParams, save_dir: Path | None, progress: Progress, padding_token: int,
                 stack: contextlib.ExitStack) -> PeopleLabeler | None:
    """For labels from people (`app`), rank 0 serves the labeling app for the run's life (closed by
    `stack`) and gets a `PeopleLabeler`; None elsewhere (mock labelers: each round makes its own)."""
    source = hp.rewards.train_new_model.labels.source
    port = sources.app_port(source)
    if port is None or not distributed.is_main():
        return None
    label_type = label_types.get(hp.rewards.train_new_model.labels.type)
    queue = label_queue.LabelQueue(save_dir / save_folders.APP / save_folders.LABELS, label_type, seed=hp.run.seed)
    stack.callback(queue.close)
    page = web.Page(f"online labels: {label_type.name}", web.instructions("", source, label_type))
    label_server = web.LabelServer(queue, page, port=port)
    label_server.start()
    stack.callback(label_server.server_close)
    stack.callback(label_server.shutdown)
    logging.print_main(f"labeling app: open {label_server.url} (answers so far: {queue.paths['sqlite']})")
    return PeopleLabeler(queue, padding_token, progress.taken, label_server.url, report=logging.print_main)


def train(hp: HParams) -> tuple[Policy, dict]:
    """An online train_policy run (see the module doc); returns what `train_policy.train` returns,
    with the summaries of the rounds under "online" and the last round's under "reward_model"."""
    if hp.run.save_dir is None and sources.app_port(hp.rewards.train_new_model.labels.source) is not None:
        raise UserError("labels from people need a save folder (run.save_dir) for the app's questions and answers")
    run = train_policy.start_policy_run(hp)
    save_dir, device = run.save_dir, run.policy.device
    reward_state = resume.load_state(resume.folder(save_dir, save_folders.REWARD_MODEL)) if save_dir else None
    reward_model, encoding_name = train_reward.new_reward_model(hp.task, device)
    progress = Progress([], [], [])
    if reward_state is not None:
        reward_model.load_tensors(trained_models.load_file(save_dir / save_folders.REWARD_MODEL,
                                                           reward_state.checkpoint).tensors)
        progress = Progress.load(reward_state.meta["extra"]["online"], save_dir)
    save_hparams(hp, save_dir, save_folders.POLICY_HPARAMS)
    reward_trainer = train_reward.RewardModelTrainer(reward_model, run.ref_policy, hp.rewards.train_new_model, run.seed)
    # PPO scores with the reward model through a function: given the module itself, it would freeze it
    ppo = train_policy.PPOTrainer(run.policy, run.ref_policy, lambda q, r: reward_model(q, r), hp, run.seed)
    if reward_state is not None:
        reward_trainer.restore(reward_state)
    train_policy.resume_trainer(run, ppo)
    if progress.rounds and progress.rounds[-1]["update"] == ppo.update and "kl_coef" in progress.rounds[-1]:
        # PPO's state was saved before its last round rescaled kl_coef (rescale_kl_coef)
        ppo.kl_ctl.value = progress.rounds[-1]["kl_coef"]
    logging.print_main(f"online: {len(progress.rounds)} label rounds done, PPO at update {ppo.update} of "
                       f"{hp.total_updates}")
    with contextlib.ExitStack() as stack:
        people = start_people(hp, save_dir, progress, run.policy.encoding.padding_token, stack)
        online_run = OnlineRun(hp, reward_trainer, progress, save_dir, encoding_name, run.seed, people, ppo.kl_ctl)
        stack.callback(online_run.scalar_log.close)
        for rnd in schedule(hp)[len(progress.rounds):]:
            if ppo.update < rnd.update:
                train_policy.run_updates(ppo, hp, save_dir, until=rnd.update)
            with stopping.graceful() as stop:
                online_run.run_round(run.policy, rnd, Heartbeat(stop, f"while waiting for label round {rnd.index}"))
                if stop.requested():
                    stop.exit(f"after label round {rnd.index}; rerun the same command to resume")
        train_policy.run_updates(ppo, hp, save_dir)
    summary = train_policy.finish_policy_run(run, ppo, progress.rounds[-1])
    summary["online"] = {"rounds": progress.rounds}
    return run.policy, summary
