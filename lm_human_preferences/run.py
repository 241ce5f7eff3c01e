"""What every training run shares: its `run.*` hyper-parameters, its seed, and its start."""

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lm_human_preferences.utils import distributed, hyperparams, logging, storage
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
    # Results are the same, up to float rounding, for any value.
    chunk_size: Optional[int] = 64
    # Speed knobs; neither changes results beyond float rounding (bf16 rounds more).
    # auto: bf16 autocast where it is faster (CUDA GPUs with bf16; CPUs with native bf16, for
    # models big enough that it pays), float32 elsewhere. Losses, advantages, KL and Adam
    # state are float32 in every case.
    precision: str = "auto"
    # A query repeated for several responses (best-of-N labels, N samples per query) runs once;
    # its keys and values serve every response, gradients included.
    share_queries: bool = True

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


def resolve_seed(hp: hyperparams.HParams) -> int:
    """The run's seed, as given or drawn on rank 0 and shared with every rank; stored in `hp`
    (and in every nested `run.seed` left unset, e.g. the reward model's in train_policy)."""
    seed = distributed.broadcast_object(hp.run.seed if hp.run.seed is not None else random.randrange(2 ** 31))
    hp.run.seed = seed
    fill_missing_seeds(hp, seed)
    return seed


def start_run(hp: hyperparams.HParams, hparams_file: str) -> tuple[torch.device, int, Path | None]:
    """Validate, fix the seed (drawn on rank 0 when unset), print it, and (rank 0) save the hparams.

    Returns (device, seed, save_dir or None). The saved hparams hold the seed actually used,
    so `--run.seed S` replays a run.
    """
    hp.validate()
    seed = resolve_seed(hp)
    torch.manual_seed(seed)
    logging.print_main(f"seed {seed} (replay with --run.seed {seed})")
    save_dir = Path(hp.run.save_dir) if hp.run.save_dir else None
    if save_dir is not None and distributed.is_main():
        storage.atomic_write_text(save_dir / hparams_file, hp.to_json())
    return distributed.device(), seed, save_dir
