"""The paper's findings at demo scale (bench/paper_findings.py is its command line), in pieces:

    cells.py        the grid: a cell's kind as a typed value, spelled as its name and parsed back there only
    runner.py       each cell's launch.py command, run in a fresh process; what is left to run
    ceiling.py      the ceiling cell: PPO on the labeler's own score
    measurement.py  a finished cell judged through evaluation/verdict.py; the online reward's strength
    records.py      the kept run's files and the cell's record in the repository (the one place it is written)
    tables.py, plots.py, report.py   the tables, the plots, and the report that makes both

What the command line and tests/test_paper_findings.py use is named here.
"""

from .cells import DISTINCT, EXPERIMENTS, HORIZON, KINDS, TARGET, Cell, grid
from .ceiling import LabelerReward, ceiling_run
from .measurement import measure
from .records import DONE_FILE, MEASURED_FILE, write_record
from .report import report_all
from .runner import command, launch_flags, run_grid, to_run

__all__ = ["DISTINCT", "DONE_FILE", "EXPERIMENTS", "HORIZON", "KINDS", "MEASURED_FILE", "TARGET", "Cell",
           "LabelerReward", "ceiling_run", "command", "grid", "launch_flags", "measure", "report_all", "run_grid",
           "to_run", "write_record"]
