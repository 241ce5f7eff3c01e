"""Where a cell's results live: its kept run (DIR/<cell>, with the files the bench adds to the run's
save folder) and its record in the repository (RECORD/<cell>.json). A record holds the cell's
measurements under "findings" (and the online overshoot's under "reward_strength"); it is the
only copy once DIR is gone, so it is written whole or not at all, in `write_record` alone."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lm_human_preferences.utils import storage

from .cells import Cell

# Files the bench adds to a cell's run folder.
DONE_FILE = "wall_time"  # the run finished: its wall time in seconds
FAILED_FILE = "failed"  # the run's last attempt failed: its exit status
MEASURED_FILE = "findings.json"  # the cell's measurements
STRENGTH_FILE = "reward_strength.json"  # the reward's strength round by round
CEILING_FILE = "ceiling.json"  # the ceiling's normalization: the labeler's mean and std on initial samples

# Files of the record folder besides the cells' records.
TABLES_FILE = "tables.md"
LABELER_SCALES_FILE = "labeler_scales.json"


def kept(cell: Cell, keep: Path) -> bool:
    """Whether the cell's run finished in DIR."""
    return (keep / cell.name / DONE_FILE).exists()


def write_json(path: Path, value) -> None:
    storage.atomic_write_text(path, json.dumps(value, indent=1))


def read_record(cell: Cell, record: Path) -> dict:
    path = record / f"{cell.name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(cell: Cell, record: Path, key: str, value) -> None:
    """Set one entry of the cell's record (the record is replaced whole)."""
    entries = read_record(cell, record)
    if entries.get(key) == value:
        return
    storage.atomic_write_text(record / f"{cell.name}.json", json.dumps({**entries, key: value}, indent=1) + "\n")


def once(path: Path, compute: Callable[[], Any]) -> Any:
    """The JSON in `path`, computed and written there first if it is missing."""
    if not path.exists():
        write_json(path, compute())
    return json.loads(path.read_text())


def from_run_or_record(cell: Cell, keep: Path, record: Path, key: str, measured: Callable[[Path], Any]) -> Any:
    """`measured(DIR/<cell>)` if the cell's run is kept, recorded as the record's `key`; else the
    record's `key`; None if neither."""
    if not kept(cell, keep):
        return read_record(cell, record).get(key)
    value = measured(keep / cell.name)
    write_record(cell, record, key, value)
    return value
