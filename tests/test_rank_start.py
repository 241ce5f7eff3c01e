"""The ranks' start: a rank that never joins is noticed within LMHP_START_TIMEOUT, and the
longer LMHP_RANK_TIMEOUT applies once every rank is there (rank 0 then works alone at times)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from lm_human_preferences.utils import distributed

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_never_joins_is_a_clear_error(tmp_path):
    """Rank 0 of 2 as torchrun, mpirun or Slurm would start it, but rank 1 never starts: without
    LMHP_START_TIMEOUT it waited for the 30 minutes of LMHP_RANK_TIMEOUT (the subprocess timeout)."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), LMHP_START_TIMEOUT="2")
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), "train_reward", "test", "x", "--save_dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: rank 0 of 2: the other ranks did not all join within LMHP_START_TIMEOUT (2 s" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


def _rank_0_works_alone(seconds: float) -> None:
    if distributed.is_main():
        time.sleep(seconds)  # as when it downloads a model or collects mock labels
    distributed.barrier()


def test_after_the_start_the_ranks_wait_for_rank_0_as_long_as_the_rank_timeout(monkeypatch):
    monkeypatch.setenv("LMHP_START_TIMEOUT", "1")
    monkeypatch.setenv("LMHP_RANK_TIMEOUT", "600")
    distributed.run(_rank_0_works_alone, (4.0,), 2)  # rank 1 waits 4 s in the barrier: no timeout
