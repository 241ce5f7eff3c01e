"""The named experiments (the original's launch.py), as plain factories.

`get("train_reward", name)`, `get("train_policy", name)` and `get("train_dpo", name)` return fresh hparams.
"""

import functools
import json
from collections.abc import Callable
from pathlib import Path

from lm_human_preferences.evaluation import report, verdict
from lm_human_preferences.labeling import mock_labelers, sources
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.training import ppo, run, train_dpo, train_policy, train_reward
from lm_human_preferences.utils import distributed, save_folders, storage
from lm_human_preferences.utils.errors import UserError

LABELS = "gs://lm-human-preferences/labels"


def _books_labels(labels: str) -> str:
    return f"{LABELS}/{labels}/offline_5k.json"


def books_task(labels: str) -> lm_tasks.TaskHParams:
    """Book passages; where they are not served, the queries of the experiment's label file (language/datasets.py)."""
    task = lm_tasks.TaskHParams(query_length=64, query_dataset=f"books|labels:{_books_labels(labels)}",
                                response_length=24, start_text=".", end_text=".", truncate_token=13, truncate_after=16)
    task.policy.temperature = 0.7
    task.policy.initial_model = "124M"
    return task


def cnndm_task() -> lm_tasks.TaskHParams:
    task = lm_tasks.TaskHParams(query_length=500, query_dataset="cnndm", response_length=75,
                                query_prefix="Article:\n\n", query_suffix="\n\nTL;DR:", start_text=None,
                                end_text="\n", truncate_token=198, truncate_after=55)
    task.policy.temperature = 0.5
    task.policy.initial_model = "124M"
    return task


def tldr_task() -> lm_tasks.TaskHParams:
    task = lm_tasks.TaskHParams(query_length=500, query_dataset="tldr", response_length=75,
                                query_suffix="\n\nTL;DR:", start_text=None, truncate_token=198, truncate_after=55)
    task.policy.temperature = 0.7
    task.policy.initial_model = "124M"
    return task


def tiny_task() -> lm_tasks.TaskHParams:
    """The tiny `test` model on random letters: for tests and a first run on any machine."""
    task = lm_tasks.TaskHParams(query_length=2, query_dataset="test", response_length=3, start_text=None)
    task.policy.initial_model = "test"
    return task


def _normalized_best_of_4(task: lm_tasks.TaskHParams, **fields) -> train_reward.HParams:
    hp = train_reward.HParams(task=task, normalize_before=True, normalize_after=True, normalize_samples=256, **fields)
    hp.labels.type = "best_of_4"
    return hp


def _books_reward(labels: str) -> train_reward.HParams:
    hp = _normalized_best_of_4(books_task(labels), batch_size=32, rollout_batch_size=512)
    hp.labels.source = _books_labels(labels)
    hp.labels.num_train = 4992
    hp.run.seed = 1
    return hp


def _summarize_reward(task: lm_tasks.TaskHParams, labels: str) -> train_reward.HParams:
    hp = _normalized_best_of_4(task, batch_size=16, lr=2.5e-5, rollout_batch_size=128)
    hp.labels.source = f"{LABELS}/{labels}/online_45k.json"
    hp.labels.num_train = 46000
    return hp


def _test_reward() -> train_reward.HParams:
    hp = train_reward.HParams(task=tiny_task(), batch_size=8, rollout_batch_size=8, normalize_before=True,
                              normalize_after=True, normalize_samples=16)
    hp.labels.type, hp.labels.source, hp.labels.num_train = "best_of_4", "test", 48
    hp.run.seed = 1
    return hp


def kjv_task() -> lm_tasks.TaskHParams:
    """The first words of King James verses, continued by the small packaged word-level model."""
    task = lm_tasks.TaskHParams(query_length=12, query_dataset="kjv", response_length=16, start_text=None)
    task.policy.temperature = 0.7
    task.policy.initial_model = "kjv"
    return task


def _mock_reward(labeler: str) -> train_reward.HParams:
    """Labels from a mock labeler on the initial policy's samples, then a normalized best-of-4 reward model."""
    hp = _normalized_best_of_4(kjv_task(), batch_size=32, lr=1e-3, rollout_batch_size=256)
    hp.labels.source, hp.labels.num_train = f"mock:{labeler}", 2048
    hp.run.seed, hp.run.chunk_size = 1, 512  # the small model fits 512 sequences a pass in little memory
    return hp


TRAIN_REWARD: dict[str, Callable[[], train_reward.HParams]] = {
    "sentiment": lambda: _books_reward("sentiment"),
    "descriptiveness": lambda: _books_reward("descriptiveness"),
    "cnndm": lambda: _summarize_reward(cnndm_task(), "cnndm"),
    "tldr": lambda: _summarize_reward(tldr_task(), "tldr"),
    "mock_sentiment": lambda: _mock_reward("sentiment"),
    "mock_descriptiveness": lambda: _mock_reward("descriptiveness"),
    "test": _test_reward,
}


def _books_policy(name: str) -> train_policy.HParams:
    hp = train_policy.HParams(task=books_task(name))
    hp.rewards.kl_coef = 0.15
    hp.rewards.adaptive_kl = ppo.AdaptiveKLParams(target=6.0)
    hp.rewards.train_new_model = TRAIN_REWARD[name]()
    hp.ppo.lr, hp.ppo.total_episodes, hp.ppo.batch_size = 1e-5, 1_000_000, 512
    hp.run.seed = 1
    return hp


def _summarize_policy(name: str, task: lm_tasks.TaskHParams, kl_coef: float) -> train_policy.HParams:
    hp = train_policy.HParams(task=task)
    hp.rewards.kl_coef = kl_coef
    hp.rewards.train_new_model = TRAIN_REWARD[name]()
    hp.ppo.total_episodes, hp.ppo.lr, hp.ppo.batch_size, hp.ppo.whiten_rewards = 1_000_000, 2e-6, 32, False
    return hp


def _test_policy() -> train_policy.HParams:
    hp = train_policy.HParams(task=tiny_task())
    hp.rewards.train_new_model = _test_reward()
    hp.rewards.adaptive_kl = ppo.AdaptiveKLParams(target=1.0)
    hp.ppo.total_episodes, hp.ppo.batch_size, hp.ppo.lr = 256, 16, 1e-3
    hp.run.seed, hp.run.log_interval, hp.run.save_interval = 1, 4, 8
    return hp


def _mock_policy(labeler: str) -> train_policy.HParams:
    """The whole method offline in minutes: mock labels → reward model → PPO with adaptive KL."""
    hp = train_policy.HParams(task=kjv_task())
    hp.rewards.kl_coef = 0.15
    hp.rewards.adaptive_kl = ppo.AdaptiveKLParams(target=6.0)
    hp.rewards.train_new_model = TRAIN_REWARD[f"mock_{labeler}"]()
    hp.rewards.train_new_model.run.seed = None  # the policy's seed: --run.seed S replays the whole demo
    hp.ppo.lr, hp.ppo.total_episodes, hp.ppo.batch_size = 1e-4, 64 * 100, 64
    hp.run.seed, hp.run.chunk_size = 1, 512
    return hp


TRAIN_POLICY: dict[str, Callable[[], train_policy.HParams]] = {
    "sentiment": lambda: _books_policy("sentiment"),
    "descriptiveness": lambda: _books_policy("descriptiveness"),
    "cnndm": lambda: _summarize_policy("cnndm", cnndm_task(), kl_coef=0.01),
    "tldr": lambda: _summarize_policy("tldr", tldr_task(), kl_coef=0.03),
    "mock_sentiment": lambda: _mock_policy("sentiment"),
    "mock_descriptiveness": lambda: _mock_policy("descriptiveness"),
    "test": _test_policy,
}


def _dpo(name: str, **fields) -> train_dpo.HParams:
    """DPO on the labels of the `name` reward model: its task, label source and label count."""
    reward = TRAIN_REWARD[name]()
    hp = train_dpo.HParams(task=reward.task, labels=reward.labels, **fields)
    hp.run.seed, hp.run.chunk_size = reward.run.seed, reward.run.chunk_size
    return hp


def _test_dpo() -> train_dpo.HParams:
    """The `test` labels' records are all alike (nothing to learn): give --labels.source a file to learn from."""
    hp = _dpo("test", batch_size=8, lr=1e-3)
    hp.run.log_interval, hp.run.save_interval = 1, 2
    return hp


TRAIN_DPO: dict[str, Callable[[], train_dpo.HParams]] = {
    "sentiment": lambda: _dpo("sentiment"),
    "descriptiveness": lambda: _dpo("descriptiveness"),
    # The DPO paper's β for summarization (TL;DR); the reward model's batch, as 46,000 labels are
    # no multiple of 64.
    "cnndm": lambda: _dpo("cnndm", beta=0.5, batch_size=16),
    "tldr": lambda: _dpo("tldr", beta=0.5, batch_size=16),
    # The small kjv model learns at PPO's lr of the mock experiments, not at the paper's 1e-6 for
    # models of billions of parameters.
    "mock_sentiment": lambda: _dpo("mock_sentiment", lr=1e-4),
    "mock_descriptiveness": lambda: _dpo("mock_descriptiveness", lr=1e-4),
    "test": _test_dpo,
}

MODES = {"train_reward": TRAIN_REWARD, "train_policy": TRAIN_POLICY, "train_dpo": TRAIN_DPO}
ExperimentHParams = train_reward.HParams | train_policy.HParams | train_dpo.HParams


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; use train_reward, train_policy or train_dpo")


def train_function(mode: str) -> Callable:
    """The function that runs an experiment's hparams on each rank (`run_experiment` in `mode`)."""
    _check_mode(mode)
    return functools.partial(run_experiment, mode)


def run_experiment(mode: str, hp: ExperimentHParams):
    """Train per `hp` — a reward model, or a policy offline, online or by DPO — and, on mock labels,
    end with the labeler's verdict; every run ends (or dies) with its report written (rank 0, when
    the run owns its save folder)."""
    try:
        if mode == "train_reward":
            return train_reward.train(hp)
        labels_hp = hp if mode == "train_dpo" else hp.rewards.train_new_model
        mock = labels_hp is not None and sources.is_mock(labels_hp.labels.source)
        labeler_name = mock_labelers.parse_source(labels_hp.labels.source)[0] if mock else None
        if mode == "train_dpo":
            policy, result = train_dpo.train(hp)
        else:
            policy, result = (train_policy.train_online if hp.rewards.online is not None else train_policy.train)(hp)
        if mock and distributed.is_main():
            result["mock"] = (verdict.dpo_summary if mode == "train_dpo" else verdict.summary)(
                hp, labeler_name, policy, result)
            verdict.print_summary(result["mock"])
            if hp.run.save_dir:
                storage.atomic_write_text(Path(hp.run.save_dir) / save_folders.MOCK_SUMMARY,
                                          json.dumps(result["mock"], indent=2))
        return policy, result
    finally:
        write_report(hp)


def write_report(hp: ExperimentHParams) -> None:
    """The run report (rank 0, when the run owns its save folder); a run that never started leaves nothing."""
    save_dir = Path(hp.run.save_dir) if hp.run.save_dir else None
    if save_dir is not None and distributed.is_main() and run.owns(save_dir) and not run.release_if_unstarted(save_dir):
        try:
            print(f"report: {report.write_report(save_dir)}", flush=True)
        except UserError as e:
            print(f"could not write the run report: {e}", flush=True)


def get(mode: str, name: str):
    _check_mode(mode)
    experiments = MODES[mode]
    if name not in experiments:
        raise UserError(f"unknown {mode} experiment {name!r}; known: {', '.join(experiments)}")
    return experiments[name]()
