"""The CUDA path without a GPU: the commands' own code traced on fake CUDA tensors (tests/fake_cuda/).

Each scenario runs in its own process with the shim preloaded; it fails on a cuda/cpu device mismatch, a
generator on the wrong device, a collective given a CPU tensor in a pretend 2-rank NCCL world, and here
on host reads (device→host syncs) inside the decode loop or over the budget of a PPO minibatch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).with_name("fake_cuda")))
import harness  # noqa: E402

TRACE = Path(__file__).with_name("fake_cuda") / "trace.py"
# Host syncs a PPO minibatch may make: 1 for the finiteness check before the optimizer step, and per forward
# micro-batch (one here: chunk_size covers the minibatch) 1 to find the queries shared by several rows
# (prefix_groups) and 1 to learn whether any token is padding (it chooses the attention kernel).
MINIBATCH_SYNC_BUDGET = 3


@pytest.fixture(scope="module")
def shim() -> Path:
    try:
        return harness.build_shim()
    except harness.ShimUnavailable as e:
        pytest.skip(f"fake CUDA shim cannot be built for this torch: {e}")


@pytest.fixture(scope="module")
def traced(shim, tmp_path_factory) -> dict[str, dict]:
    """Every scenario, traced in one process (torch and the package imported once): scenario -> its result."""
    env = dict(os.environ, LD_PRELOAD=str(shim), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(TRACE), str(tmp_path_factory.mktemp("fake_cuda"))],
                          capture_output=True, text=True, env=env, timeout=1200)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("TRACE "):
            result = json.loads(line[len("TRACE "):])
            results[result["scenario"]] = result
    assert results, f"the trace printed no result (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return results


def trace(traced: dict, scenario: str) -> dict:
    result = traced.get(scenario)
    assert result is not None, f"{scenario} did not finish (the trace process died before it)"
    assert result["ok"], f"{scenario}: {result['error']}\n{result.get('traceback', '')}"
    return result


def minibatch_syncs(result: dict) -> int:
    return sum(n for site, n in result["syncs"].items() if "@minibatch" in site)


def test_reward_model_step(traced):
    trace(traced, "reward_step")


def test_ppo_updates_offline_within_the_sync_budget(traced):
    result = trace(traced, "ppo_offline")
    per_minibatch = minibatch_syncs(result) / result["minibatches"]
    assert 0 < per_minibatch <= MINIBATCH_SYNC_BUDGET, result["syncs"]
    assert not [site for site in result["syncs"] if "@decode" in site], result["syncs"]


def test_an_online_round(traced):
    trace(traced, "ppo_online")


def test_no_host_sync_inside_the_decode_loop(traced):
    counts = trace(traced, "sampling")["sample_syncs"]
    assert counts["2"] == counts["6"], counts  # a sync per step would grow with the length


def test_stop_then_resume(traced):
    result = trace(traced, "stop_then_resume")
    assert result["stopped_code"] == 128 + 15


def test_a_two_rank_nccl_world(traced):
    result = trace(traced, "nccl_world")
    assert (result["backend"], result["device_id"]) == ("nccl", "cuda:1")


def test_auto_precision_skips_emulated_bf16(traced):
    assert trace(traced, "precision_h100")["auto"] == "torch.bfloat16"
    v100 = trace(traced, "precision_v100")
    assert v100["auto"] == "torch.float32"
    assert v100["bf16"].startswith("refused") and "V100" in v100["bf16"]
