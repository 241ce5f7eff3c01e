"""Resume by name: a run's first line is the command that resumes it and where its TensorBoard logs
are; `--resume latest` continues the newest unfinished run that the command would resume."""

import fcntl
import os
import shlex
import subprocess
import sys
from pathlib import Path

from lm_human_preferences.cli import main as cli

FAULT_RUN = Path(__file__).with_name("fault_run.py")
FAST = ["--run.save_interval", "2", "--run.log_interval", "100"]


def launch(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FAULT"}
    if fault:
        env["FAULT"] = fault
    return subprocess.run([sys.executable, str(FAULT_RUN), *args], capture_output=True, text=True, timeout=300, env=env)


def test_resume_latest_continues_the_newest_unfinished_run(tmp_path):
    root = str(tmp_path)
    # killed after its checkpoint at batch 2 (of 6); then a finished run and an unfinished one of other hparams
    first = launch(["train_reward", "test", "rm-2512080401", "--save_dir", root, *FAST], fault="kill:3:reward")
    assert first.returncode != 0
    line = first.stdout.splitlines()[0]
    command = (f"./launch.py train_reward test rm-2512080401 --save_dir {root} {' '.join(FAST)} --mpi 1")
    assert f"resume: {command} · logs: tensorboard --logdir {tmp_path / 'rm-2512080401' / 'tb'}" in line
    assert launch(["train_reward", "test", "rm-2512080402", "--save_dir", root, *FAST]).returncode == 0
    other = launch(["train_reward", "test", "rm-2512080403", "--save_dir", root, *FAST, "--lr", "0.001"],
                   fault="kill:3:reward")
    assert other.returncode != 0

    assert cli.main("launch", ["train_reward", "test", "--resume", "latest", "--save_dir", root, *FAST,
                               "--mpi", "2", "--dry_run"]) == 1  # a checks the run would make: its ranks
    resumed = launch(["train_reward", "test", "--resume", "latest", "--save_dir", root, *FAST])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"--resume latest: {tmp_path / 'rm-2512080401'} (reward model at batch 2; ")
    assert resumed.stdout.splitlines()[1].startswith(f"train_reward test → {tmp_path / 'rm-2512080401'} · resume: "
                                                     f"{command} · ")
    assert "resuming the reward model at batch 2 of 6" in resumed.stdout + resumed.stderr

    again = launch(["train_reward", "test", "--resume", "latest", "--save_dir", root, *FAST])
    assert again.returncode == 1
    assert "no unfinished train_reward run under" in again.stderr and "rm-2512080403 (lr)" in again.stderr
    # the other run resumes by the command its first line printed
    printed = other.stdout.splitlines()[0].split(" · resume: ")[1].split(" · logs: ")[0]
    by_command = launch(shlex.split(printed)[1:])
    assert by_command.returncode == 0 and "resuming the reward model at batch 2 of 6" in by_command.stdout


def test_resume_latest_errors(tmp_path, capsys):
    def fails(*args: str) -> str:
        assert cli.main("launch", ["train_reward", "test", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    assert "no save root" in fails("--resume", "latest", "--save_dir", str(tmp_path / "none"))
    assert "no unfinished train_reward run under" in fails("--resume", "latest", "--save_dir", str(tmp_path))
    assert "not both" in fails("x", "--resume", "latest")
    assert "--resume takes 'latest'" in fails("--resume", "x")
    assert "{NAME | --resume latest}" in fails("--mpi", "1")


def test_resume_latest_leaves_a_running_run_alone(tmp_path, capsys):
    args = ["train_reward", "test", "--save_dir", str(tmp_path), *FAST]
    killed = launch([*args[:2], "r", *args[2:]], fault="kill:3:reward")
    assert killed.returncode != 0
    with open(tmp_path / "r" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert cli.main("launch", [*args[:2], "--resume", "latest", *args[2:], "--dry_run"]) == 1
        assert "(r) is running now" in capsys.readouterr().err
    assert cli.main("launch", [*args[:2], "--resume", "latest", *args[2:], "--dry_run"]) == 0
    assert "resumes the run there (reward model at batch 2)" in capsys.readouterr().out
