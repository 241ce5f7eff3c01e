"""Exact resume: what a trainer needs, beyond its model checkpoint, to go on as if it had never stopped.

A trainer's state lives in `<save_dir>/resume/<phase>/` (phase `reward_model` or `policy`):

    state-<step>.json              the step, whether the phase finished, the model checkpoint's
                                   file name, and the trainer's own counters (KL coefficient,
                                   query batches drawn, logged history, ...)
    optimizer-<step>.safetensors   Adam's state (the same on every rank; rank 0 writes it)
    rank<r>-<step>.safetensors     rank r's random-number generator states
    latest                         the name of the newest complete state-<step>.json

Every file of a step is written (atomically) before `latest` moves to it, and the files of
older steps are removed after; a run killed at any moment leaves `latest` naming a complete set.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lm_human_preferences.utils import distributed, save_folders, storage
from lm_human_preferences.utils.errors import UserError


@dataclass
class State:
    folder: Path
    step: int
    finished: bool
    checkpoint: str  # the model checkpoint's file name in <model>/checkpoints/
    meta: dict  # the trainer's own counters


def folder(save_dir: Path, phase: str) -> Path:
    return save_dir / save_folders.RESUME / phase


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.detach().cpu().contiguous()
               for index, slots in state["state"].items() for key, value in slots.items()}
    return tensors, state["param_groups"]


def save_state(where: Path, step: int, checkpoint: str, optimizer: torch.optim.Optimizer,
               generators: dict[str, torch.Generator], meta: dict, finished: bool = False) -> None:
    """Write this step's state (a collective: every rank writes its generators, rank 0 the rest)."""
    rank = distributed.rank()
    storage.atomic_write_bytes(where / f"rank{rank}-{step:07d}.safetensors",
                               save({name: g.get_state() for name, g in generators.items()}))
    distributed.barrier()
    if distributed.is_main():
        tensors, groups = _optimizer_tensors(optimizer)
        storage.atomic_write_bytes(where / f"optimizer-{step:07d}.safetensors", save(tensors))
        record = dict(step=step, finished=finished, checkpoint=checkpoint, world=distributed.world_size(),
                      param_groups=groups, meta=meta)
        name = f"state-{step:07d}.json"
        storage.atomic_write_text(where / name, json.dumps(record))
        storage.atomic_write_text(where / "latest", name)
        for old in where.iterdir():
            if old.name != "latest" and f"-{step:07d}." not in old.name:
                old.unlink(missing_ok=True)
    distributed.barrier()


def load_state(where: Path) -> State | None:
    """The newest complete state in `where`, or None when there is none."""
    latest = where / "latest"
    if not latest.exists():
        return None
    path = where / latest.read_text().strip()
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the resume state ({e}); rerun with --run.overwrite on to start over") from None
    if record["world"] != distributed.world_size():
        raise UserError(f"{where} was saved by {record['world']} ranks and cannot resume on {distributed.world_size()}; "
                        f"rerun with --mpi {record['world']}")
    return State(where, record["step"], record["finished"], record["checkpoint"],
                 dict(record["meta"], param_groups=record["param_groups"]))


def unfinished_state(save_dir: Path | None, phase: str, what: str) -> State | None:
    """The state to resume `phase` from (None for a fresh start); a finished phase is an error."""
    state = load_state(folder(save_dir, phase)) if save_dir is not None else None
    if state is not None and state.finished:
        raise UserError(f"{save_dir} holds {what} that finished; give this run another name, or rerun with "
                        "--run.overwrite on to train again")
    return state


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read the resume state ({e}); rerun with --run.overwrite on to start over") from None


def restore(state: State, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator]) -> None:
    """Load the optimizer's state and this rank's generator states saved with `state`."""
    tensors = _read(state.folder / f"optimizer-{state.step:07d}.safetensors")
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state.meta["param_groups"]]
    optimizer.load_state_dict({"state": slots, "param_groups": groups})
    saved = _read(state.folder / f"rank{distributed.rank()}-{state.step:07d}.safetensors")
    for name, generator in generators.items():
        if saved[name].numel() != generator.get_state().numel():  # each kind of device has its own generator
            here = generator.device.type
            there = "the CPU" if saved[name].numel() == torch.Generator().get_state().numel() else "a GPU"
            raise UserError(f"{state.folder}: this run drew its random numbers on {there} and cannot resume exactly "
                            f"on {'the CPU' if here == 'cpu' else 'a GPU'}; resume it on the kind of device it ran on, "
                            "or start over with --run.overwrite on")
        generator.set_state(saved[name])
