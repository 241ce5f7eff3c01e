"""The scenarios tests/test_fake_cuda.py traces on fake CUDA, each through the commands' own code.

Each takes the work folder and the trace's log and returns extra facts for the test (JSON-able).
"""

import os
import signal
from pathlib import Path

import harness
import torch

from lm_human_preferences import experiments
from lm_human_preferences.cli import main as cli
from lm_human_preferences.language import sample as sampling
from lm_human_preferences.task.policy import load_policy
from lm_human_preferences.training import train_policy, train_reward
from lm_human_preferences.utils import distributed
from lm_human_preferences.utils.errors import UserError

# The `test` experiment at a size that traces quickly: 2 PPO updates of 16 episodes, 2 minibatches, 2 epochs.
PPO_FLAGS = ["--ppo.total_episodes", "32", "--ppo.batch_size", "16", "--ppo.nminibatches", "2",
             "--ppo.noptepochs", "2", "--run.save_interval", "1", "--run.log_interval", "1"]
MINIBATCHES = 2 * 2 * 2  # per run: updates × epochs × minibatches


def launch(*args: str) -> None:
    code = cli.main("launch", list(args))
    if code != 0:
        raise AssertionError(f"launch {' '.join(args)} exited {code}")


def reward_step(workdir: Path, log) -> dict:
    """`./launch.py train_reward test` (best-of-4 reward model of the tiny model, on the GPU)."""
    launch("train_reward", "test", "rm", "--save_dir", str(workdir))
    return {}


def ppo_offline(workdir: Path, log) -> dict:
    """`./launch.py train_policy test`: a new reward model, then PPO updates; host reads by region."""
    launch("train_policy", "test", "ppo", "--save_dir", str(workdir), *PPO_FLAGS)
    return {"minibatches": MINIBATCHES}


def ppo_online(workdir: Path, log) -> dict:
    """One online round of mock_descriptiveness (the packaged model): labels of the current policy's
    samples, the reward model trained further, PPO against it."""
    harness.HOST_TOKENS = 7000  # the packaged kjv model's words, so that the mock labeler has some to count
    launch("train_policy", "mock_descriptiveness", "online", "--save_dir", str(workdir), "--rewards.online", "on",
           "--rewards.train_new_model.labels.num_train", "32", "--rewards.train_new_model.batch_size", "16",
           "--rewards.train_new_model.normalize_samples", "16", "--rewards.train_new_model.rollout_batch_size", "16",
           "--ppo.batch_size", "16", "--ppo.total_episodes", "32", "--rewards.online.interval", "16",
           "--run.log_interval", "1")
    return {}


def sampling_lengths(workdir: Path, log) -> dict:
    """KV-cache sampling of 2 and of 6 tokens: the host reads of each (the same when none is in the loop)."""
    hp = experiments.TRAIN_POLICY["test"]()
    policy = load_policy("test", hp.task, distributed.device(), heads=("value",))
    queries = torch.randint(0, 20, (8, 2), device=policy.device)
    counts = {}
    for length in (2, 6):
        before = log.total()
        generator = torch.Generator(policy.device).manual_seed(0)
        out = sampling.sample(policy.model, queries, length, padding_token=policy.encoding.padding_token,
                              generator=generator)
        assert out.tokens.device.type == "cuda"
        counts[length] = log.total() - before
    return {"sample_syncs": counts}


def stop_then_resume(workdir: Path, log) -> dict:
    """SIGTERM after the first PPO update (the run checkpoints and stops), then the same command resumes."""
    original = train_policy.PPOTrainer.step

    def step(self, update):
        if update == 1:
            harness.ANSWERS["training/stopping.py"] = float(signal.SIGTERM)  # every rank sees the stop
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, update)

    args = ["train_policy", "test", "resumed", "--save_dir", str(workdir), *PPO_FLAGS]
    train_policy.PPOTrainer.step = step
    try:
        stopped = cli.main("launch", args)
    finally:
        train_policy.PPOTrainer.step = original
        harness.ANSWERS["training/stopping.py"] = 0.0
    launch(*args)
    return {"stopped_code": stopped}


def nccl_world(workdir: Path, log) -> dict:
    """Rank 0 of a pretend 2-rank NCCL world: a new reward model and its training, one PPO update with
    gradient checkpointing; and the process group's options for rank 1."""
    hp = experiments.TRAIN_POLICY["test"]()
    hp.override_from_dict({"ppo": {"total_episodes": 16, "batch_size": 16},
                           "run": {"save_dir": str(workdir), "gradient_checkpointing": True}})
    hp.rewards.train_new_model.override_from_dict({"labels": {"num_train": 16}})
    hp.validate()
    train_policy.train(hp)
    options = distributed.process_group_options(local_rank=1)
    return {"backend": options["backend"], "device_id": str(options.get("device_id"))}


def precision(workdir: Path, log) -> dict:
    """What `run.precision auto` computes in on this (fake) GPU, and whether bf16 is refused."""
    device = distributed.device()
    auto = distributed.compute_dtype(device, "auto")
    try:
        distributed.compute_dtype(device, "bf16")
        bf16 = "accepted"
    except UserError as e:
        bf16 = f"refused: {e}"
    return {"auto": str(auto), "bf16": bf16}


SIGTERM_STOP = 128 + signal.SIGTERM
ALL = {
    "reward_step": (reward_step, {}),
    "ppo_offline": (ppo_offline, {}),
    "ppo_online": (ppo_online, {}),
    "sampling": (sampling_lengths, {}),
    "stop_then_resume": (stop_then_resume, {}),
    "nccl_world": (nccl_world, {"gpus": 2, "nccl": True}),
    "precision_h100": (precision, {}),
    "precision_v100": (precision, {"emulated_bf16": True}),
}
