"""run.gradient_checkpointing: the blocks are recomputed in the backward pass, and every output
and gradient equals the plain computation's (float32, within float rounding), with padding,
with and without shared query prefixes, for the policy with its value head and the reward model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_human_preferences.language import encodings, model
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.task.rewards import RewardModel
from lm_human_preferences.training import train_policy
from lm_human_preferences.training.run import RunHParams

PAD = 27
HP = model.HParams(n_vocab=27, n_ctx=16, n_embd=8, n_head=2, n_layer=3)
# Three queries (the second starts with padding, the third has a gap and trails padding), each
# repeated for 4 responses, some padded (truncated) or entirely padding.
QUERIES = torch.tensor([[1, 2, 3, 4], [PAD, PAD, 5, 6], [7, PAD, 8, PAD]]).repeat_interleave(4, dim=0)
RESPONSES = torch.tensor([
    [1, 2, 3, 4, 5], [6, PAD, PAD, PAD, PAD], [7, 8, 9, 10, 11], [PAD, PAD, PAD, PAD, PAD],
    [3, 3, 3, 3, 3], [12, 13, PAD, 14, PAD], [PAD, PAD, PAD, PAD, PAD], [0, 1, 0, 1, 0],
    [2, 4, 6, 8, 10], [26, PAD, PAD, PAD, PAD], [11, 12, 13, 14, 15], [1, PAD, 2, PAD, 3],
])


def _model(heads: tuple[str, ...], seed: int = 0) -> model.Model:
    torch.manual_seed(seed)
    m = model.Model(HP, heads=heads)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.5)  # larger than the initializers, so that every gradient is far from zero
    return m


def _task() -> lm_tasks.TaskHParams:
    task = lm_tasks.TaskHParams(query_length=4, query_dataset="test", response_length=5, query_prefix="a",
                                query_suffix=".")
    task.policy.initial_model = "test"
    return task


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 rounding: every element within 1e-5 × the largest of its tensor."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        scale = value.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got[name], value, atol=1e-5 * scale, rtol=0, msg=name)


def _block_calls(m: model.Model) -> list[int]:
    """Counts the first block's forward calls (a checkpointed block runs again in the backward pass)."""
    calls = []
    m.h[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _policy_run(checkpointing: bool, share: bool) -> tuple[dict, int]:
    policy = Policy(_model(("value",)), encodings.get("test"), _task())
    policy.configure(RunHParams(precision="fp32", share_queries=share, gradient_checkpointing=checkpointing))
    assert policy.model.gradient_checkpointing is checkpointing
    calls = _block_calls(policy.model)
    out = policy.analyze_responses(QUERIES, RESPONSES % PAD)
    weights = torch.linspace(-1, 2, out["values"].numel()).view_as(out["values"])
    ((out["logprobs"] * weights).sum() + (out["values"] * weights.flip(1)).sum()).backward()
    results = {"logprobs": out["logprobs"].detach(), "values": out["values"].detach(),
               **{f"grad {k}": g for k, g in _grads(policy.model).items()}}
    return results, len(calls)


def _reward_run(checkpointing: bool, share: bool) -> tuple[dict, int]:
    rm = RewardModel(_model(("reward",), seed=1), encodings.get("test"))
    rm.configure(RunHParams(precision="fp32", share_queries=share, gradient_checkpointing=checkpointing))
    calls = _block_calls(rm.model)
    rewards = rm(QUERIES, RESPONSES)
    (rewards * torch.arange(12.0)).sum().backward()
    return {"rewards": rewards.detach(), **{f"grad {k}": g for k, g in _grads(rm).items()}}, len(calls)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("run", [_policy_run, _reward_run], ids=["policy", "reward_model"])
def test_checkpointed_gradients_equal_the_plain_ones(run, share):
    plain, plain_calls = run(False, share)
    checkpointed, checkpointed_calls = run(True, share)
    forwards = 2 if share else 1  # a shared query prefix runs the blocks on it, then on the responses
    assert plain_calls == forwards and checkpointed_calls == 2 * forwards  # recomputed in the backward pass
    _assert_close(checkpointed, plain)


def test_only_trained_models_checkpoint_and_never_without_gradients():
    run = RunHParams(precision="fp32", gradient_checkpointing=True)
    frozen = Policy(_model(()), encodings.get("test"), _task()).configure(run, frozen=True)
    assert not frozen.model.gradient_checkpointing
    assert not RewardModel(_model(("reward",)), encodings.get("test")).configure(run, frozen=True).model.gradient_checkpointing
    calls = {}
    for checkpointing in (False, True):
        policy = Policy(_model(("value",)), encodings.get("test"), _task())
        policy.configure(RunHParams(precision="fp32", gradient_checkpointing=checkpointing))
        calls[checkpointing] = _block_calls(policy.model)
        with torch.no_grad():
            policy.analyze_responses(QUERIES, RESPONSES % PAD)
        sampled = policy.respond(QUERIES[:2], 3, torch.Generator().manual_seed(0))  # preallocated KV cache
        calls[checkpointing].append(sampled["responses"])
    assert len(calls[True]) == len(calls[False]) > 3  # no block ran twice
    assert torch.equal(calls[True][-1], calls[False][-1])


def _ppo_weights(checkpointing: bool) -> dict[str, torch.Tensor]:
    """One PPO update (2 epochs, 2 minibatches) through the trainer, which configures the models from run."""
    task = _task()
    hp = train_policy.HParams(task=task)
    hp.rewards.trained_model = "unused"
    hp.ppo.batch_size, hp.ppo.nminibatches, hp.ppo.noptepochs, hp.ppo.lr = 8, 2, 2, 1e-2
    hp.run.precision, hp.run.gradient_checkpointing = "fp32", checkpointing
    encoding = encodings.get("test")
    policy = Policy(_model(("value",)), encoding, task)
    reference = _model(())
    reference.load_state_dict(policy.model.state_dict(), strict=False)
    reward_model = RewardModel(_model(("reward",), seed=1), encoding)
    trainer = train_policy.PPOTrainer(policy, Policy(reference, encoding, task), reward_model, hp, seed=0)
    assert policy.model.gradient_checkpointing is checkpointing and not reward_model.model.gradient_checkpointing
    trainer.step(0)
    assert all(p.grad is None for p in policy.model.parameters())  # freed after the update, before the next sampling
    return {k: v.clone() for k, v in policy.model.state_dict().items()}


def test_a_ppo_update_with_checkpointing_moves_the_policy_as_without():
    before = _model(("value",)).state_dict()
    plain, checkpointed = _ppo_weights(False), _ppo_weights(True)
    assert any(not torch.equal(plain[k], before[k]) for k in plain)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_model_sizes_bench_runs(tmp_path):
    """bench/model_sizes.py on the tiny model: a fresh process per measurement, a row for each."""
    script = Path(__file__).resolve().parent.parent / "bench" / "model_sizes.py"
    done = subprocess.run([sys.executable, str(script), "--sizes", "test", "--batch_size", "4", "--records", "2",
                           "--out", str(tmp_path / "sizes.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("test ")]
    assert [(r[1], r[-7]) for r in rows] == [("PPO", "off"), ("PPO", "on"), ("reward", "off"), ("reward", "on")]
    assert all(float(r[-5]) > 0 and float(r[-2]) >= 0 for r in rows)  # peak RSS, CPU seconds (0.0 when tiny)
    record = json.loads((tmp_path / "sizes.json").read_text())
    assert [(r["phase"], r["checkpointing"]) for r in record["results"]["runs"]] == \
        [("ppo", "off"), ("ppo", "on"), ("reward", "off"), ("reward", "on")]
    assert record["provenance"]["torch"] == torch.__version__
