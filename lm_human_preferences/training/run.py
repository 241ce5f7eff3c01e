"""What every training run shares: its `run.*` hyper-parameters, its seed, its save folder and its start.

A save folder belongs to one run at a time (a lock held by rank 0 for the run's life). Rerun
into a folder that holds a run with the same hparams, the run resumes where it stopped (its
seed included); a folder holding a run with other hparams is refused, unless
`--run.overwrite on` asks to replace it.
"""

import contextlib
import copy
import dataclasses
import fcntl
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lm_human_preferences.labeling import sources
from lm_human_preferences.utils import distributed, hyperparams, logging, save_folders, storage
from lm_human_preferences.utils.errors import UserError

RANK_SEED_STRIDE = 100003  # rank r draws from seed + r · stride, as the original


@dataclass
class RunHParams(hyperparams.HParams):
    seed: Optional[int] = None  # None: drawn at random; the drawn seed is saved with the hparams
    log_interval: int = 10
    save_interval: int = 50
    save_dir: Optional[str] = None
    # Memory knob: at most this many sequences per forward pass when sampling, scoring and
    # computing gradients (micro-batches, gradients accumulated). None: whole batches at once.
    # Results are the same, up to float rounding, for any value. 32 keeps a GPT-2 124M PPO update
    # at batch 64 well below the peak memory of whole batches (bench/ppo_memory.py; the figures,
    # with their machine, in docs/measurements.md).
    chunk_size: Optional[int] = 32
    # Speed knobs; neither changes results beyond float rounding (bf16 rounds more).
    # auto: bf16 autocast where it is faster (CUDA GPUs with bf16; CPUs with native bf16, for
    # models big enough that it pays), float32 elsewhere. Losses, advantages, KL and Adam
    # state are float32 in every case.
    precision: str = "auto"
    # A query repeated for several responses (best-of-N labels, N samples per query) runs once;
    # its keys and values serve every response, gradients included.
    share_queries: bool = True
    # Memory knob: activation checkpointing of the transformer blocks of the trained model (PPO's
    # policy, the reward model in training): each block's activations are recomputed in the
    # backward pass instead of kept, for ~1/3 more compute. Gradients equal off's up to float rounding.
    gradient_checkpointing: bool = False
    overwrite: bool = False  # replace the run already in save_dir instead of resuming or refusing it

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        if self.precision not in distributed.PRECISIONS:
            raise UserError(f"{_prefix}precision must be one of {', '.join(distributed.PRECISIONS)}, "
                            f"got {self.precision!r}")
        for name in ("log_interval", "save_interval", "chunk_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{_prefix}{name} must be positive, got {value}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise UserError(f"{_prefix}seed must be a non-negative integer, got {self.seed}")


def rank_seed(seed: int) -> int:
    return seed + distributed.rank() * RANK_SEED_STRIDE


def rank_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """This rank's random stream for sampling and shuffling."""
    return torch.Generator(device).manual_seed(rank_seed(seed))


def fill_missing_seeds(hp: hyperparams.HParams, seed: int) -> None:
    """Give every nested `run.seed` left unset (e.g. the reward model's in train_policy) the run's seed."""
    for f in dataclasses.fields(hp):
        value = getattr(hp, f.name)
        if isinstance(value, RunHParams) and value.seed is None:
            value.seed = seed
        elif isinstance(value, hyperparams.HParams):
            fill_missing_seeds(value, seed)


def replayable(hp: hyperparams.HParams, seed: int) -> hyperparams.HParams:
    """A copy of `hp` with `seed` in its `run.seed` and in every nested one left unset: the hparams
    file of a run that used `seed`, which `--run.seed` may leave open (drawn at random)."""
    filled = copy.deepcopy(hp)
    filled.run.seed = seed
    fill_missing_seeds(filled, seed)
    return filled


@dataclass(frozen=True)
class Resolved:
    """What a run settles as it starts, beside its hparams (which stay as given)."""

    device: torch.device
    seed: int  # as given, taken over from the run it resumes, or drawn on rank 0
    save_dir: Path | None
    # The label file the run trains on: a mock labeler's labels collected into the save folder (a
    # temporary folder without one), else labels.source; None for a run with no fixed label set.
    labels: str | None = None


_claimed: set[Path] = set()  # save folders this process holds the lock of (held until it exits)
_made_parents: dict[Path, list[Path]] = {}  # the folders above a save folder that its claim made (the save root)


def claim(save_dir: Path) -> None:
    """Lock `save_dir` for this process; a run already holding it makes this fail at once."""
    key = save_dir.resolve()
    if key in _claimed:
        return
    _made_parents[key] = [folder for folder in save_dir.parents if not folder.exists()]
    save_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(save_dir / save_folders.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{save_dir} is in use by another run (pid {owner}); wait for it to end, "
                        "or give this run another name or --save_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as e:  # a full disk: the run is refused, and leaves nothing behind
        os.close(fd)
        release_if_unstarted(save_dir)
        raise OSError(e.errno, e.strerror, str(save_dir / save_folders.LOCK)) from None
    _claimed.add(key)


def release_if_unstarted(save_dir: Path) -> bool:
    """If the run in `save_dir` never started (the folder holds nothing but its lock, and maybe a
    report), remove what it left — the folder too, and the save root when its claim made it —
    and say so (True)."""
    leftovers = {save_folders.LOCK, save_folders.REPORT, save_folders.REPORT_PLOTS}
    if not save_dir.is_dir() or any(path.name not in leftovers for path in save_dir.iterdir()):
        return False
    for name in leftovers:
        path = save_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    save_dir.rmdir()
    for folder in _made_parents.pop(save_dir.resolve(), []):
        with contextlib.suppress(OSError):  # not empty: other runs are there
            folder.rmdir()
    return True


def owns(save_dir: Path) -> bool:
    """Whether this process holds `save_dir`'s lock (it runs the run that lives there)."""
    return save_dir.resolve() in _claimed


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b and key != "overwrite":
            keys.append(prefix + key)
    return keys


def _read_labels_file_as_mock(saved: dict, current: dict, labels_file: str) -> None:
    """Hparams files of runs started before hparams stayed as given (README, Changelog) hold, as
    labels.source, the file a mock labeler's labels were collected into: read it as the mock
    source it came from."""
    for key, value in saved.items():
        now = current.get(key)
        if not isinstance(value, dict) or not isinstance(now, dict):
            continue
        if key == "labels" and value.get("source") == labels_file and sources.is_mock(now.get("source") or ""):
            value["source"] = now["source"]
        else:
            _read_labels_file_as_mock(value, now, labels_file)


def _wipe(save_dir: Path) -> None:
    for path in save_dir.iterdir():
        if path.name != save_folders.LOCK:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def saved_differences(hp: hyperparams.HParams, saved: dict, seed: int | None = None,
                      save_dir: Path | None = None) -> list[str]:
    """The dotted keys in which `hp` differs from a run's saved hparams, taking the saved seed where
    none is given (a rerun resumes the run when there are none). With the run's `save_dir`, an old
    hparams file's collected labels file counts as the mock source it came from."""
    current = replayable(hp, saved["run"]["seed"] if seed is None else seed).to_nested_dict()
    if save_dir is not None:
        _read_labels_file_as_mock(saved, current, str(save_dir / save_folders.LABELS))
    return _differences(saved, current)


def prepare_save_dir(hp: hyperparams.HParams, hparams_file: str, save_dir: Path | None, seed: int | None) -> int | None:
    """Claim the save folder and decide between a new run, resuming, and refusing (see the module doc).

    `seed` is the one given (or None); when the folder's run is resumed with none given, its seed
    is taken over. Returns the seed, on every rank.
    """
    if save_dir is None:
        return seed
    if distributed.is_main():
        claim(save_dir)
        path = save_dir / hparams_file
        if path.exists() and hp.run.overwrite:
            logging.print_main(f"--run.overwrite: removing the run in {save_dir}")
            _wipe(save_dir)
        if path.exists():
            saved = json.loads(path.read_text())
            differ = saved_differences(hp, saved, seed, save_dir)
            if differ:
                raise UserError(f"{save_dir} holds a run with other hparams ({', '.join(differ[:4])}); give this run "
                                "another name, or rerun with --run.overwrite on to replace it")
            if seed is None:
                seed = saved["run"]["seed"]
    return distributed.broadcast_object(seed)


def save_hparams(hp: hyperparams.HParams, resolved: Resolved, hparams_file: str) -> None:
    """Rank 0 saves the hparams with the seed used (`replayable`), once the run's inputs have been read."""
    if resolved.save_dir is not None and distributed.is_main():
        storage.atomic_write_text(resolved.save_dir / hparams_file, replayable(hp, resolved.seed).to_json())


def start_run(hp: hyperparams.HParams, hparams_file: str, labels_hp: hyperparams.HParams | None = None,
              within: Resolved | None = None) -> Resolved:
    """Validate, claim the save folder, fix the seed (drawn on rank 0 when unset) and print it.
    `hp` stays as given: what the start settles is in the `Resolved` it returns.

    `labels_hp` are the hparams of the reward model the run trains on a fixed label set (itself in
    train_reward, `rewards.train_new_model` in an offline train_policy). When its labels.source is a
    mock labeler, the run collects its labels itself, after the folder is claimed and the seed
    fixed (`collect_mock_labels`). `within` is the train_policy run that a reward model trains in
    first: its save folder, its labels, and its seed unless `hp.run.seed` is set.

    The trainer saves the hparams with `save_hparams` once its inputs are read; they hold the seed
    actually used, so `--run.seed S` replays a run.
    """
    hp.validate()
    if within is not None:
        save_dir, given_seed = within.save_dir, within.seed if hp.run.seed is None else hp.run.seed
    else:
        save_dir, given_seed = Path(hp.run.save_dir) if hp.run.save_dir else None, hp.run.seed
    seed = prepare_save_dir(hp, hparams_file, save_dir, given_seed)
    seed = distributed.broadcast_object(seed if seed is not None else random.randrange(2 ** 31))
    if within is not None:
        labels = within.labels
    elif labels_hp is not None and sources.is_mock(labels_hp.labels.source):
        labels = collect_mock_labels(labels_hp, seed, save_dir)
    else:
        labels = labels_hp.labels.source if labels_hp is not None else None
    torch.manual_seed(seed)
    logging.print_main(f"seed {seed} (replay with --run.seed {seed})")
    return Resolved(distributed.device(), seed, save_dir, labels)


def collect_mock_labels(labels_hp: hyperparams.HParams, seed: int, save_dir: Path | None) -> str:
    """Rank 0 collects the labels of `labels_hp`'s mock labels.source into the save folder's
    labels.json (a temporary folder without one), unless a resumed run has them already; returns
    that file's path, on every rank."""
    path = None
    if distributed.is_main():
        path = (save_dir or Path(tempfile.mkdtemp())) / save_folders.LABELS
        if path.exists():
            logging.print_main(f"using the labels collected before: {path}")
        else:
            sources.collect_mock_labels(labels_hp.task, labels_hp.labels.type, labels_hp.labels.num_train,
                                        labels_hp.labels.source, path, seed, labels_hp.run.chunk_size)
    return distributed.broadcast_object(str(path) if path else None)
