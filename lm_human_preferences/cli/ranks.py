"""How many data-parallel ranks a launch runs, checked against the hparams before anything starts.

A rank count must split every global batch evenly (and leave PPO's whitening enough rows); the
hparams' own validation says which counts do. An explicit `--mpi N` that does not fit is an error
naming the counts that do. The default — one rank per visible GPU — falls back to the largest
count that fits, with a note: on a node of 6 GPUs the books experiments run on 4 rather than
not at all, and `--mpi` still chooses. The fallback is deterministic, so a rerun on the same
node picks the same count, which resuming needs (a run resumes only on the ranks that saved it).
"""

from dataclasses import dataclass

from lm_human_preferences.utils import distributed, hyperparams
from lm_human_preferences.utils.errors import UserError

MAX_LISTED = 64  # rank counts tried when naming the valid ones


@dataclass
class Ranks:
    count: int
    note: str | None = None  # why the default was changed, when it was


def _error(hp: hyperparams.HParams, ranks: int) -> UserError | None:
    """The validation error of `hp` on `ranks` ranks, or None when they fit."""
    try:
        with distributed.validation_world(ranks, exact=True):
            hp.validate()
    except UserError as e:
        return e
    return None


def valid_counts(hp: hyperparams.HParams, up_to: int = MAX_LISTED) -> list[int]:
    """The rank counts up to `up_to` that the hparams accept (hp must be valid on one rank)."""
    return [n for n in range(1, up_to + 1) if _error(hp, n) is None]


def _listed(counts: list[int]) -> str:
    return ", ".join(map(str, counts)) if counts else "none"


def choose(hp: hyperparams.HParams, asked: int | None, default: int | None = None) -> Ranks:
    """The ranks a launch runs `hp` on: `asked` (--mpi), else `default` (e.g. the ranks that saved
    the run being resumed), else one per visible GPU (or 1); under torchrun, mpirun or Slurm
    those the launcher started. Raises a UserError when the hparams do not fit them."""
    error = _error(hp, 1)
    if error is not None:
        raise error  # not a matter of ranks
    launched = distributed.external_launcher()
    count = launched[2] if launched else asked if asked is not None else default or distributed.default_ranks()
    error = _error(hp, count)
    if error is None:
        if not launched:
            distributed.check_local_ranks(count)
        return Ranks(count)
    counts = valid_counts(hp, max(MAX_LISTED, count))
    if launched:
        raise UserError(f"{launched[0]} started {count} ranks: {error}; valid rank counts: {_listed(counts)}")
    if asked is not None or default is not None:
        raise UserError(f"--mpi {count}: {error}; valid rank counts: {_listed(counts)}")
    fallback = max(n for n in counts if n <= count)  # 1 is valid: it was checked first
    note = (f"note: {count} GPUs are visible but {count} ranks do not fit these hparams ({error}); running on "
            f"{fallback} (valid rank counts: {_listed(counts)}); choose with --mpi")
    return Ranks(fallback, note)
