"""Multi-node ranks for real: two `torchrun --nnodes 2 --nproc_per_node 1` launchers, one per
"node", rendezvous on 127.0.0.1 and train the `test` experiment as `--mpi 2` does; when one
node dies, the other stops with an error that says so within the rank timeout."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
# The test experiment, shortened: 16 labels → 2 reward-model batches, then 2 PPO updates (checkpoints after each).
SMALL = ["--rewards.train_new_model.labels.num_train", "16", "--ppo.total_episodes", "32", "--run.save_interval", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    return dict(env, **extra)


def _node(node_rank: int, port: int, args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """One node's launcher, its output (and its rank's) into `log`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--max_restarts", "0", str(ROOT / "launch.py"), *args]
    with open(log, "w") as out:
        node = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=_environment(**env))
    node.log = log
    return node


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each rank in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's launcher and everything it started, as when the machine dies."""
    for pid in [*_descendants(node.pid), node.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture()
def nodes():
    started: list[subprocess.Popen] = []
    yield started
    for node in started:  # whatever happened, nothing of a node outlives its test
        _kill_node(node)
        node.wait()


def _finish(node: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        node.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_node(node)
        node.wait()
        pytest.fail(f"a node did not finish within {timeout} s:\n{node.log.read_text()[-4000:]}")
    return node.returncode, node.log.read_text()


def _weights(save_dir: Path, scope: str) -> dict[str, torch.Tensor]:
    checkpoints = save_dir / scope / "checkpoints"
    return load_file(checkpoints / (checkpoints / "latest").read_text().strip())


def test_two_nodes_train_as_two_local_ranks(tmp_path, nodes):
    args = ["train_policy", "test", "run", *SMALL]
    port = _free_port()
    nodes += [_node(r, port, [*args, "--save_dir", str(tmp_path / "nodes")], tmp_path / f"node{r}.log") for r in (0, 1)]
    results = [_finish(node, 120) for node in nodes]
    for code, output in results:
        assert code == 0, output[-4000:]
    local = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args, "--mpi", "2", "--save_dir",
                            str(tmp_path / "local")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=_environment())
    assert local.returncode == 0, local.stderr[-4000:]
    assert "seed 1 " in results[0][1] and "seed 1 " in local.stdout  # the experiment's seed, on both
    for scope in ("reward_model", "policy"):
        by_nodes, by_ranks = _weights(tmp_path / "nodes" / "run", scope), _weights(tmp_path / "local" / "run", scope)
        assert by_nodes.keys() == by_ranks.keys()
        for key in by_ranks:
            assert torch.equal(by_nodes[key], by_ranks[key]), f"{scope} {key}"
    first = load_file(tmp_path / "local" / "run" / "policy" / "checkpoints" / "model-0000001.safetensors")
    final = _weights(tmp_path / "local" / "run", "policy")
    assert any(not torch.equal(first[k], final[k]) for k in final)  # it trained


def test_a_dead_node_stops_the_other_with_a_clear_error(tmp_path, nodes):
    timeout = 5
    args = ["train_policy", "test", "run", "--ppo.total_episodes", "100000", "--save_dir", str(tmp_path)]
    port = _free_port()
    nodes += [_node(r, port, args, tmp_path / f"node{r}.log", LMHP_RANK_TIMEOUT=str(timeout)) for r in (0, 1)]
    policy_checkpoints = tmp_path / "run" / "policy" / "checkpoints"
    deadline = time.monotonic() + 90
    while not (policy_checkpoints / "latest").exists():  # PPO has started on both nodes
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), \
            "".join(n.log.read_text()[-3000:] for n in nodes)
        time.sleep(0.2)
    _kill_node(nodes[1])  # node 1 dies: its launcher and its rank
    killed = time.monotonic()
    code, output = _finish(nodes[0], timeout + 60)
    stopped_after = time.monotonic() - killed
    assert code != 0
    assert "rank 0 of 2 lost contact with another rank" in output, output[-4000:]
    assert "Rerun the same command on every node to resume" in output
    assert stopped_after < timeout + 30, stopped_after
