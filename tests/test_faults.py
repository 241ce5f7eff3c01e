"""Runs that survive faults: exact resume after SIGKILL/SIGTERM, one run per save folder, no
non-finite weights saved, corrupt checkpoints detected, a stopped rank detected."""

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_human_preferences.cli import main as cli
from lm_human_preferences.language import trained_models
from lm_human_preferences.language.model import HParams
from lm_human_preferences.utils.errors import UserError
from test_dpo import synthetic_labels

FAULT_RUN = Path(__file__).with_name("fault_run.py")
# The tiny `test` experiments: 6 reward-model batches, then (train_policy) 16 PPO updates.
FAST = ["--run.save_interval", "2", "--run.log_interval", "100"]


def launch(args: list[str], fault: str | None = None, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **env)
    environment.pop("FAULT", None)
    if fault:
        environment["FAULT"] = fault
    return subprocess.run([sys.executable, str(FAULT_RUN), *args], capture_output=True, text=True, timeout=timeout,
                          env=environment)


def final_weights(save_dir: Path, scope: str) -> dict[str, torch.Tensor]:
    checkpoints = save_dir / scope / "checkpoints"
    return load_file(checkpoints / (checkpoints / "latest").read_text().strip())


def resume_state(save_dir: Path, scope: str) -> dict:
    folder = save_dir / "resume" / scope
    return json.loads((folder / (folder / "latest").read_text().strip()).read_text())


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("mode, fault, scope, saved", [("train_reward", "kill:3:reward", "reward_model", 2),
                                                       ("train_policy", "kill:5:policy", "policy", 4)])
def test_a_killed_run_resumes_exactly(tmp_path, mode, fault, scope, saved, ranks):
    args = [mode, "test", "--mpi", str(ranks), *FAST]
    straight = launch([*args[:2], "straight", *args[2:], "--save_dir", str(tmp_path)])
    assert straight.returncode == 0, straight.stderr
    killed = launch([*args[:2], "killed", *args[2:], "--save_dir", str(tmp_path)], fault=fault)
    assert killed.returncode != 0
    state = resume_state(tmp_path / "killed", scope)
    assert state["step"] == saved and not state["finished"]  # checkpoints every 2 steps; killed in step 3 or 5
    resumed = launch([*args[:2], "killed", *args[2:], "--save_dir", str(tmp_path)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"at {'batch' if scope == 'reward_model' else 'update'} {saved} of" in resumed.stdout + resumed.stderr
    assert_identical(final_weights(tmp_path / "straight", scope), final_weights(tmp_path / "killed", scope))
    if mode == "train_policy":  # the finished reward model was reused, not trained again
        assert "finished training; using it" in resumed.stdout + resumed.stderr
        assert_identical(final_weights(tmp_path / "straight", "reward_model"),
                         final_weights(tmp_path / "killed", "reward_model"))


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_checkpoints_then_resumes(tmp_path, ranks):
    args = ["train_policy", "test", "--mpi", str(ranks), *FAST, "--save_dir", str(tmp_path)]
    straight = launch([*args[:2], "straight", *args[2:]])
    stopped = launch([*args[:2], "stopped", *args[2:]], fault="term:4:policy")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "stopped by SIGTERM after PPO update 5; rerun the same command to resume" in stopped.stderr
    assert resume_state(tmp_path / "stopped", "policy")["step"] == 5
    resumed = launch([*args[:2], "stopped", *args[2:]])
    assert straight.returncode == 0 and resumed.returncode == 0, resumed.stderr
    assert_identical(final_weights(tmp_path / "straight", "policy"), final_weights(tmp_path / "stopped", "policy"))


def test_a_killed_dpo_run_resumes_exactly(tmp_path):
    """On two ranks (test_dpo.py stops one rank's run by SIGTERM in-process)."""
    labels = synthetic_labels(tmp_path / "labels.json", 80)  # 8 batches
    args = ["train_dpo", "test", "--mpi", "2", *FAST, "--save_dir", str(tmp_path), "--labels.source", labels,
            "--labels.num_train", "64"]
    straight = launch([*args[:2], "straight", *args[2:]])
    assert straight.returncode == 0, straight.stderr
    killed = launch([*args[:2], "killed", *args[2:]], fault="kill:3:dpo")
    assert killed.returncode != 0
    assert resume_state(tmp_path / "killed", "policy")["step"] == 2
    resumed = launch([*args[:2], "killed", *args[2:]])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming DPO at batch 2 of 8" in resumed.stdout + resumed.stderr
    assert_identical(final_weights(tmp_path / "straight", "policy"), final_weights(tmp_path / "killed", "policy"))


def test_a_stopped_rank_stops_every_rank(tmp_path):
    args = ["train_policy", "test", "frozen", "--mpi", "2", *FAST, "--save_dir", str(tmp_path)]
    result = launch(args, fault="stop:3:policy", timeout=120, LMHP_RANK_TIMEOUT="3")
    assert result.returncode == 1
    assert "rank 1 (pid" in result.stderr and "stopped responding" in result.stderr and "LMHP_RANK_TIMEOUT" in result.stderr


def test_a_save_folder_belongs_to_one_run(tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242")
        lock.flush()
        result = launch(["train_reward", "test", "busy", "--save_dir", str(tmp_path)])
    assert result.returncode == 1
    assert "is in use by another run (pid 4242)" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


def test_an_existing_run_is_resumed_refused_or_overwritten(tmp_path, capsys):
    args = ["train_reward", "test", "r", "--save_dir", str(tmp_path), *FAST]
    assert cli.main("launch", args) == 0
    hparams = (tmp_path / "r" / "train_reward_hparams.json").read_text()
    assert cli.main("launch", [*args, "--lr", "0.001"]) == 1
    assert "holds a run with other hparams (lr)" in capsys.readouterr().err
    assert (tmp_path / "r" / "train_reward_hparams.json").read_text() == hparams
    assert cli.main("launch", args) == 1
    assert "holds a reward model run that finished" in capsys.readouterr().err
    assert cli.main("launch", [*args, "--lr", "0.001", "--run.overwrite", "on"]) == 0
    assert json.loads((tmp_path / "r" / "train_reward_hparams.json").read_text())["lr"] == 0.001


def test_hparams_are_written_only_after_the_inputs_are_read(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"query\": [1]}]")
    assert cli.main("launch", ["train_reward", "test", "r", "--save_dir", str(tmp_path),
                               "--labels.source", str(bad)]) == 1
    assert "record 0" in capsys.readouterr().err
    assert not (tmp_path / "r" / "train_reward_hparams.json").exists()


@pytest.mark.parametrize("flags, where", [(["--ppo.lr", "1e38"], "PPO update"),
                                          (["--rewards.train_new_model.lr", "1e30"], "reward model batch")])
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, flags, where):
    args = ["train_policy", "test", "nan", "--save_dir", str(tmp_path), *FAST, *flags]
    assert cli.main("launch", args) == 1
    err = capsys.readouterr().err
    assert where in err and "training diverged" in err and "lower the learning rate" in err
    for scope in ("policy", "reward_model"):
        checkpoints = tmp_path / "nan" / scope / "checkpoints"
        for path in checkpoints.glob("model-*.safetensors") if checkpoints.exists() else []:
            assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    hparams = HParams(n_vocab=27, n_ctx=8, n_embd=7, n_head=1, n_layer=2)
    tensors = {"w": torch.arange(64, dtype=torch.float32), "gain": torch.tensor(2.0)}
    trained_models.save_checkpoint(tmp_path, hparams, "test", tensors, step=3)
    assert torch.equal(trained_models.load_file(tmp_path, "model-0000003.safetensors").tensors["w"], tensors["w"])
    path = tmp_path / "checkpoints" / "model-0000003.safetensors"
    data = bytearray(path.read_bytes())
    data[-40:-20] = bytes(20)  # overwrite tensor bytes: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum does not match its contents; the file is corrupt"):
        trained_models.load(str(tmp_path))


def test_retention_never_deletes_the_new_checkpoint_or_later_ones(tmp_path):
    hparams = HParams(n_vocab=27, n_ctx=8, n_embd=7, n_head=1, n_layer=2)
    for step in (10, 20, 30, 40, 50, 60, 70):
        trained_models.save_checkpoint(tmp_path, hparams, "test", {"w": torch.zeros(2)}, step)
    trained_models.save_checkpoint(tmp_path, hparams, "test", {"w": torch.ones(2)}, step=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("model-*"))
    assert names[0] == "model-0000003.safetensors" and len(names) == 1 + 5  # the new one and the later five kept
    assert (tmp_path / "checkpoints" / "latest").read_text() == "model-0000003.safetensors"
    assert torch.equal(trained_models.load(str(tmp_path)).tensors["w"], torch.ones(2))
