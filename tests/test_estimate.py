"""The dry run's estimates (training/estimate.py): parameter counts exact, peak memory within a
factor of the tensors a real PPO update and reward-model step hold (measured by torch's profiler
on a CPU, the packaged `kjv` model), and time only where a basis is known."""

import json

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lm_human_preferences import experiments
from lm_human_preferences.labeling import label_files
from lm_human_preferences.language import encodings, model as lm, trained_models
from lm_human_preferences.task.policy import load_policy
from lm_human_preferences.task.rewards import RewardModel
from lm_human_preferences.training import estimate, train_policy, train_reward

KJV = trained_models.local_hparams("kjv")
FACTOR = 1.5  # estimate / measured peak, either way


def measured_peak(fn, tmp_path) -> float:
    """The peak of the profiler's running total of allocated bytes (its memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    allocated = [e["args"]["Total Allocated"] for e in json.loads(trace.read_text())["traceEvents"]
                 if e.get("name") == "[memory]"]
    return float(max(allocated))


def test_shape_counts_the_models_parameters():
    small = lm.HParams(n_vocab=100, n_ctx=16, n_embd=32, n_head=4, n_layer=3)
    for hparams in (KJV, trained_models.TEST_HPARAMS, small):
        model = lm.Model(hparams, heads=("value",))
        shape = estimate.shape(hparams)
        assert shape.params == sum(p.numel() for p in model.parameters())
        assert shape.vocab_matrix == model.wte.weight.numel()
        assert shape.linears == sum(m.weight.numel() for m in model.modules()
                                    if isinstance(m, torch.nn.Linear) and m.weight.shape[0] > 1)
    assert estimate.shape(trained_models.GPT2_HPARAMS["124M"]).params == 124_439_808 + 769  # GPT-2 small + a head


def test_ppo_update_peak_is_within_a_factor_of_the_measured_one(tmp_path):
    hp = experiments.get("train_policy", "mock_descriptiveness")
    hp.rewards.train_new_model, hp.rewards.trained_model = None, "random"
    hp.ppo.batch_size, hp.run.chunk_size = 32, 32
    encoding = encodings.get("kjv_words")

    def update():
        policy, ref_policy = train_policy.load_policies(hp.task, torch.device("cpu"))
        reward_model = RewardModel(lm.Model(KJV, heads=("reward",)), encoding)
        train_policy.PPOTrainer(policy, ref_policy, reward_model, hp, seed=0).step(0)

    measured = measured_peak(update, tmp_path)
    estimated = estimate.ppo_memory(hp, estimate.shape(KJV), 1, torch.float32, cpu=True)
    assert estimated.activations > estimated.models  # the figure is mostly the batch's: the part worth checking
    assert 1 / FACTOR < estimated.total / measured < FACTOR, (estimated, measured)


def test_reward_step_peak_is_within_a_factor_of_the_measured_one(tmp_path):
    hp = experiments.get("train_reward", "mock_descriptiveness")
    hp.batch_size, hp.run.chunk_size = 16, 64
    encoding = encodings.get("kjv_words")
    q, r = hp.task.query_length, hp.task.response_length
    rng = np.random.default_rng(0)
    columns = {"query": rng.integers(0, 7000, (16, q), dtype=np.int32), "best": rng.integers(0, 4, 16, dtype=np.int32)}
    for k in range(4):
        columns[f"sample{k}"] = rng.integers(0, 7000, (16, r), dtype=np.int32)

    def step():
        reward_model = RewardModel(lm.Model(KJV, heads=("reward",)), encoding)
        policy = load_policy(hp.task.policy.initial_model, hp.task)  # frozen: samples for normalization
        trainer = train_reward.RewardModelTrainer(reward_model, policy, hp, seed=0)
        trainer.accumulate_gradients(label_files.Labels(columns))
        trainer.optimizer.step()

    measured = measured_peak(step, tmp_path)
    estimated = estimate.reward_memory(hp, estimate.shape(KJV), 1, torch.float32, cpu=True, responses=4,
                                       policies_loaded=False)
    assert 1 / FACTOR < estimated.total / measured < FACTOR, (estimated, measured)


def test_activations_follow_the_micro_batch_and_checkpointing():
    shape = estimate.shape(trained_models.GPT2_HPARAMS["124M"])
    hp = experiments.get("train_policy", "descriptiveness")
    full = estimate.ppo_memory(hp, shape, 8, torch.float32, cpu=False)
    hp.run.chunk_size = 16
    half = estimate.ppo_memory(hp, shape, 8, torch.float32, cpu=False)
    assert (full.rows, half.rows) == (32, 16) and half.activations == pytest.approx(full.activations / 2)
    hp.run.gradient_checkpointing = True
    assert estimate.ppo_memory(hp, shape, 8, torch.float32, cpu=False).activations < half.activations / 2
    hp.run.gradient_checkpointing = False
    bf16 = estimate.ppo_memory(hp, shape, 8, torch.bfloat16, cpu=False)
    assert bf16.activations < half.activations and bf16.models > half.models  # + the bf16 working copy


@pytest.mark.parametrize("name, dtype, known", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, True), ("NVIDIA A100-SXM4-40GB", torch.bfloat16, True),
    ("Tesla V100-SXM2-16GB", torch.float32, True), ("Tesla V100-SXM2-16GB", torch.bfloat16, False),
    ("NVIDIA GeForce RTX 3090", torch.bfloat16, False), ("cpu", torch.float32, True),
])
def test_time_only_where_a_basis_is_known(name, dtype, known):
    rate = estimate.flop_rate(name, dtype, threads=2)
    assert (rate is not None) == known
    if rate is not None:
        assert rate[0] > 0 and ("V100" in rate[1] or "measured" in rate[1])


def test_the_v100_basis_gives_the_original_runs_duration():
    """The books experiment's PPO on 8 V100s: 1M episodes at the original's 57 episodes/s (4.9 h)."""
    hp = experiments.get("train_policy", "descriptiveness")
    shape = estimate.shape(trained_models.GPT2_HPARAMS["124M"])
    rate, _ = estimate.flop_rate("Tesla V100-SXM2-32GB", torch.float32, threads=1)
    flops = hp.total_updates * hp.ppo.batch_size * estimate.ppo_flops(hp, shape)
    assert estimate.duration(flops, rate, 8) == pytest.approx(hp.total_updates * 512 / 57, rel=0.01)
    h100, _ = estimate.flop_rate("NVIDIA H100 80GB HBM3", torch.bfloat16, threads=1)
    a100, _ = estimate.flop_rate("NVIDIA A100-SXM4-80GB", torch.bfloat16, threads=1)
    assert h100 > a100 > rate
