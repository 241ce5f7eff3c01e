#!/usr/bin/env python3
"""The paper's findings at demo scale, on the mock labelers: label scaling, the KL trade-off
(with over-optimization), and online against offline labels at equal KL.

    python bench/paper_findings.py --keep DIR                  # both mock experiments, seeds 0 1 2
    python bench/paper_findings.py --keep DIR --seeds 0 1 2 3  # more seeds
    python bench/paper_findings.py --keep DIR --report-only    # tables and plots from the finished runs

Every condition ("cell") is one run of the demo's PPO budget (100 updates of 64 episodes) in a
fresh process, with one CPU thread (OMP_NUM_THREADS=1), kept in DIR/<cell>: a cell that
finished there before is measured, not run again, and a cell cut short resumes where it
stopped; so the grid can be run in pieces. Seed 0 of every cell comes first, then seed 1, ...

A finished cell's measurements are also recorded in the repository (RECORD/<cell>.json, a few
kB; `--record` to put them elsewhere): a recorded cell is not run again, and the tables and
plots are made from the records, so the grid can be continued on another machine, where DIR
is gone. (A KL-sweep cell whose reward model is recorded but not kept runs that reward model's
cell again first: the sweep needs its weights.)

The KL controller's horizon is HORIZON episodes for every cell (the experiments' 10,000 lets
kl_coef move only by a factor 0.88–1.14 in a 6,400-episode run; see the README).

1. Label scaling: a reward model from 256 ... 4096 mock labels, then PPO at KL target 6; and
   the ceiling: PPO on the labeler's own score (normalized to mean 0, std 1 on the initial
   policy's samples, as a reward model is), with the same budget and target.
2. KL trade-off: the 2,048-label reward model of the same seed, PPO at KL targets 1.5 ... 24
   and with the KL penalty off (kl_coef 0). The labeler's (true) score against the reward
   model's (proxy) score of the final policy, and the score of a saturating labeler (each
   distinct word counts once: `<labeler>_distinct`). Then the same with a reward model from
   2,048 labels of that saturating labeler ("distinct-" cells: the true score is the saturating
   one), at KL targets 1.5, 6, 24 and the penalty off.
3. Online against offline: the 2,048-label offline run, online (`current`) and online
   (`normalize_on initial`) at the same target and horizon, each as shipped and with
   `rewards.online.rescale_kl_coef on` (a round rescales kl_coef by the reward's change of scale:
   online (`initial`) as shipped overshoots its target; see training/online.py).

Every finished cell is measured once (DIR/<cell>/findings.json) on the demo's 256 test
queries with the demo's sampling seed: the labeler's score and win rate (as the demo's
verdict), the KL of the final policy from the initial one on those samples, and reward-model
scores. `--report-only` writes the tables (stdout, and RECORD/tables.md) and the plots
(docs/paper_*.png) from whatever cells have finished.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.findings import EXPERIMENTS, KINDS, ceiling_run, grid, report_all, run_grid  # noqa: E402

DOCS = ROOT / "docs"
RECORD = ROOT / "bench" / "results" / "paper_findings"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="the runs' folder: finished cells there are measured, not run again")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="only these cells")
    parser.add_argument("--report-only", action="store_true", help="only the tables and plots of the finished cells")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the plots go (default: docs/)")
    parser.add_argument("--record", type=Path, default=RECORD,
                        help="where each finished cell's measurements are recorded (default: bench/results/paper_findings/)")
    parser.add_argument("--ceiling-run", nargs=4, metavar=("EXPERIMENT", "SEED", "KEEP", "KIND"), help=argparse.SUPPRESS)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="extra launch.py flags for every run (e.g. a shorter PPO to try the bench out)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ceiling_run:
        experiment, seed, keep, kind = args.ceiling_run
        ceiling_run(experiment, int(seed), Path(keep), kind, args.flags)
        return
    if args.keep is None:
        parser.error("--keep DIR is required (the runs are kept there)")
    args.keep.mkdir(parents=True, exist_ok=True)
    cells = grid(args.seeds, args.experiments, args.kinds)
    if not args.report_only:
        run_grid(args.keep, args.record, cells, args.flags)
    report_all(args.keep, args.record, cells, args.experiments, args.docs)


if __name__ == "__main__":
    main()
