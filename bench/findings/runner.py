"""Running the grid: each cell in a fresh process with one CPU thread, its output in DIR/<cell>.log;
cells kept or recorded before are not run again."""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lm_human_preferences.utils import storage

from .cells import HORIZON, TARGET, Ceiling, Cell, KLSweep, Labels, Online
from .measurement import measure
from .records import DONE_FILE, FAILED_FILE, kept, read_record

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "bench" / "paper_findings.py"  # runs a ceiling cell (--ceiling-run)


def launch_flags(cell: Cell, keep: Path) -> list[str]:
    """The launch.py flags of a cell (all but the ceiling), before the bench's --flags."""
    flags = ["--save_dir", str(keep), "--run.seed", str(cell.seed)]
    horizon = ["--rewards.adaptive_kl.horizon", str(HORIZON)]
    target = ["--rewards.adaptive_kl.target", str(TARGET)]
    match cell.spec:
        case Labels(count=count, distinct=distinct):
            source = ["--rewards.train_new_model.labels.source", f"mock:{cell.labeler}_distinct"] if distinct else []
            return flags + target + horizon + source + ["--rewards.train_new_model.labels.num_train", str(count)]
        case KLSweep(target=kl_target):
            model = ["--rewards.train_new_model", "off", "--rewards.trained_model", str(keep / cell.sweep_model().name)]
            if kl_target is None:
                return flags + model + ["--rewards.adaptive_kl", "off", "--rewards.kl_coef", "0"]
            return flags + model + horizon + ["--rewards.adaptive_kl.target", str(kl_target)]
        case Online(normalize_on=normalize_on, rescaled=rescaled):
            online = ["--rewards.online", "on"]
            if normalize_on == "initial":
                online += ["--rewards.online.normalize_on", "initial"]
            if rescaled:
                online += ["--rewards.online.rescale_kl_coef", "on"]
            return flags + target + horizon + online
    raise ValueError(f"cell kind {cell.kind} is not run by launch.py")


def command(cell: Cell, keep: Path, extra: list[str]) -> list[str]:
    if isinstance(cell.spec, Ceiling):
        return [sys.executable, str(CLI), "--ceiling-run", cell.experiment, str(cell.seed), str(keep), cell.kind,
                "--flags", *extra]
    return [sys.executable, str(ROOT / "launch.py"), "train_policy", cell.experiment, cell.name,
            *launch_flags(cell, keep), *extra]


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_cell(cell: Cell, keep: Path, extra: list[str]) -> float | None:
    """Run a cell in a fresh process (its output in DIR/<cell>.log); its wall time, or None if it failed."""
    folder = keep / cell.name
    if cell.loads_sweep_model and not kept(cell.sweep_model(), keep):
        print(f"{cell.name}: skipped, its reward model ({cell.sweep_model().name}) has not finished", flush=True)
        return None
    started = time.time()
    with open(keep / f"{cell.name}.log", "a") as log:
        done = subprocess.run(command(cell, keep, extra), stdout=log, stderr=subprocess.STDOUT, env=one_thread_env())
    wall = time.time() - started
    folder.mkdir(parents=True, exist_ok=True)
    if done.returncode != 0:
        storage.atomic_write_text(folder / FAILED_FILE, f"exit status {done.returncode}; see {keep / cell.name}.log\n")
        print(f"{cell.name}: FAILED after {wall:.0f} s (exit {done.returncode}; log {keep / cell.name}.log)", flush=True)
        return None
    storage.atomic_write_text(folder / DONE_FILE, str(wall))
    (folder / FAILED_FILE).unlink(missing_ok=True)
    return wall


def to_run(cells: list[Cell], keep: Path, record: Path) -> list[Cell]:
    """The cells neither kept nor recorded, in grid order; before a KL-sweep cell, its reward
    model's cell if that is not kept (recorded only), since the sweep loads its weights."""
    todo: list[Cell] = []
    for cell in cells:
        if kept(cell, keep) or "findings" in read_record(cell, record):
            continue
        model = cell.sweep_model()
        if cell.loads_sweep_model and not kept(model, keep) and model not in todo:
            todo.append(model)
        todo.append(cell)
    return todo


def run_grid(keep: Path, record: Path, cells: list[Cell], extra: list[str]) -> None:
    walls = [m["wall_time"] for c in cells if (m := measure(c, keep, record)) is not None]
    todo = to_run(cells, keep, record)
    rerun = [c.name for c in todo if c not in cells or "findings" in read_record(c, record)]
    print(f"{len(cells) - len([c for c in todo if c in cells])} of {len(cells)} cells finished before; "
          f"{len(todo)} to run" + (f" (again, for their weights: {', '.join(rerun)})" if rerun else ""), flush=True)
    for i, cell in enumerate(todo):
        print(f"{time.strftime('%H:%M:%S')} {cell.name}: running", flush=True)
        wall = run_cell(cell, keep, extra)
        if wall is None:
            continue
        walls.append(wall)
        left = len(todo) - i - 1
        estimate = (f"{left} cells left, about {left * statistics.mean(walls) / 60:.0f} min at "
                    f"{statistics.mean(walls):.0f} s a cell")
        try:
            m = measure(cell, keep, record)
        except Exception as error:  # the run is kept: --report-only measures it again
            print(f"{cell.name}: {wall:.0f} s; measuring it failed ({error!r}); {estimate}", flush=True)
            continue
        print(f"{cell.name}: {wall:.0f} s; score {m['score_before']:.2f} → {m['score']:.2f}, win rate "
              f"{m['win_rate']:.3f}, KL {m['kl']:.2f}; {estimate}", flush=True)
