"""The runs in save folders: how far each got, what rerunning a command would do with one, and
which one `launch.py ... --resume latest` continues.

A run's folder holds its hparams once its inputs were read (a train_policy run that trains its
reward model first holds only that model's, train_reward_hparams.json, until PPO starts) and the
resume state of each phase (training/resume.py). A rerun with the same hparams resumes it
(training/run.py), so "the runs this command would resume" are the folders whose saved hparams
equal the command's.
"""

import copy
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lm_human_preferences.training import resume, run, train_policy
from lm_human_preferences.utils import hyperparams, save_folders
from lm_human_preferences.utils.errors import UserError

PHASE_NAMES = {save_folders.REWARD_MODEL: ("reward model", "batch"), save_folders.POLICY: ("PPO", "update")}


@dataclass
class SavedRun:
    folder: Path
    hparams_file: str  # the newest hparams file in it: the mode's, or a train_policy run's reward phase's
    hparams: dict
    phase: str  # the phase of the newest resume state (save_folders.REWARD_MODEL or POLICY)
    step: int  # the step of that state (0: none saved yet)
    finished: bool  # the run's last phase finished
    world: int | None  # ranks that saved that state
    in_use: bool  # a run holds the folder's lock now
    written: float  # when the run last wrote its hparams or a resume state (seconds since the epoch)

    def progress(self) -> str:
        name, unit = PHASE_NAMES[self.phase]
        return f"{name} at {unit} {self.step}" if self.step else f"{name} not checkpointed yet"


def _state(folder: Path, phase: str) -> tuple[dict, float] | None:
    """The newest resume state's record of `phase` in `folder` and when it was written, if any."""
    latest = resume.folder(folder, phase) / "latest"
    try:
        path = latest.parent / latest.read_text().strip()
        return json.loads(path.read_text()), path.stat().st_mtime
    except (OSError, ValueError):
        return None


def _in_use(folder: Path) -> bool:
    """Whether another process's run holds `folder` now (training/run.py, claim)."""
    if run.owns(folder):
        return False
    try:
        fd = os.open(folder / save_folders.LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def saved_run(folder: Path, mode: str) -> SavedRun | None:
    """What `folder` holds of a `mode` run (train_reward / train_policy / train_dpo), or None when no such run
    started there."""
    files = {"train_reward": [save_folders.REWARD_HPARAMS], "train_dpo": [save_folders.DPO_HPARAMS]}.get(
        mode, [save_folders.POLICY_HPARAMS, save_folders.REWARD_HPARAMS])
    found = next((name for name in files if (folder / name).is_file()), None)
    if found is None:
        return None
    try:
        hparams = json.loads((folder / found).read_text())
    except (OSError, ValueError):
        return None
    # the phase under way: PPO once the policy's hparams are saved, else (train_reward, or a
    # train_policy run still training its reward model) the reward model's
    phase = save_folders.POLICY if found in (save_folders.POLICY_HPARAMS, save_folders.DPO_HPARAMS) \
        else save_folders.REWARD_MODEL
    state = _state(folder, phase)
    record = state[0] if state else None
    written = max((folder / found).stat().st_mtime, state[1] if state else 0.0)
    finished = record is not None and record["finished"] and (mode != "train_policy" or phase == save_folders.POLICY)
    return SavedRun(folder, found, hparams, phase, record["step"] if record else 0, finished,
                    record.get("world") if record else None, _in_use(folder), written)


def as_started(hp: hyperparams.HParams, save_dir: Path) -> hyperparams.HParams:
    """`hp` for a run in `save_dir` as the run records them: with its save folder, and the reward
    model it trains saving into the same one."""
    hp = copy.deepcopy(hp)
    hp.run.save_dir = str(save_dir)
    if isinstance(hp, train_policy.HParams) and hp.rewards.train_new_model is not None:
        hp.rewards.train_new_model.run.save_dir = str(save_dir)  # it trains into the same folder
    return hp


def differences(hp: hyperparams.HParams, saved: SavedRun) -> list[str]:
    """The hparams in which this command's `hp` differs from the run saved in `saved.folder`."""
    current = as_started(hp, saved.folder)
    if saved.hparams_file == save_folders.REWARD_HPARAMS and isinstance(current, train_policy.HParams):
        if current.rewards.train_new_model is None:
            return ["rewards.train_new_model"]
        return ["rewards.train_new_model." + key for key in
                run.saved_differences(current.rewards.train_new_model, saved.hparams, _reward_seed(current),
                                      saved.folder)]
    return run.saved_differences(current, saved.hparams, save_dir=saved.folder)


def _reward_seed(hp: train_policy.HParams) -> int | None:
    """The seed of the reward model a policy run trains: its own, else the run's (training/run.py)."""
    own = hp.rewards.train_new_model.run.seed
    return own if own is not None else hp.run.seed


def newest_unfinished(root: Path, mode: str, experiment: str, hp: hyperparams.HParams) -> SavedRun:
    """The unfinished run under `root` that this command would resume and that was written to last."""
    if not root.is_dir():
        raise UserError(f"--resume latest: no save root {root}; start a run with a name first (or give --save_dir)")
    runs = [r for folder in root.iterdir() if folder.is_dir() and (r := saved_run(folder, mode)) is not None]
    unfinished = sorted((r for r in runs if not r.finished), key=lambda r: r.written, reverse=True)
    matching = [r for r in unfinished if not differences(hp, r)]
    idle = [r for r in matching if not r.in_use]
    if idle:
        return idle[0]
    if matching:
        raise UserError(f"--resume latest: the unfinished {mode} {experiment} run{'s' if len(matching) > 1 else ''} "
                        f"under {root} ({', '.join(r.folder.name for r in matching[:3])}) "
                        f"{'are' if len(matching) > 1 else 'is'} running now")
    if not unfinished:
        raise UserError(f"--resume latest: no unfinished {mode} run under {root} ({len(runs)} finished); "
                        "start a new one with a run name")
    others = ", ".join(f"{r.folder.name} ({', '.join(differences(hp, r)[:2])})" for r in unfinished[:3])
    raise UserError(f"--resume latest: no unfinished {mode} run under {root} has this command's hparams "
                    f"({experiment} with these flags); unfinished runs with other hparams: {others}. "
                    "Give the flags the run was started with, or its name instead of --resume latest")
