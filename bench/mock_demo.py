#!/usr/bin/env python3
"""The offline demo over several seeds: how well, how reliably and how fast it learns.

    python bench/mock_demo.py                        # both mock experiments, seeds 0 1 2
    python bench/mock_demo.py --experiments mock_sentiment --seeds 0 1 2 3 4
    python bench/mock_demo.py --flags --ppo.total_episodes 2560   # extra launch.py flags for every run

Each run is the README's main command (`./launch.py train_policy EXPERIMENT NAME --run.seed S`)
in a fresh process, timed from start to exit. The table gives, per experiment, the mean, min
and max over seeds of: the reward model's held-out accuracy against the labeler, the win rate
of the trained policy against the initial one, the labeler's mean score of the responses
before and after PPO, the final KL and the wall time. `--plot FILE` also saves the learning
curve of the first run (score and KL against episodes) as a PNG, via the run report.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (bench/)

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [("accuracy", "reward_model_heldout_accuracy"), ("win rate", "win_rate"),
           ("score before", "true_score_before"), ("score after", "true_score_after"), ("final KL", "final_kl"),
           ("wall s", "wall_time")]


def run_once(experiment: str, seed: int, save_root: Path, flags: list[str]) -> dict:
    name = f"{experiment}-seed{seed}"
    command = [sys.executable, str(ROOT / "launch.py"), "train_policy", experiment, name, "--save_dir", str(save_root),
               "--run.seed", str(seed), *flags]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((save_root / name / "mock_summary.json").read_text())
    summary["wall_time"], summary["seed"] = wall, seed
    return summary


def table(results: dict[str, list[dict]]) -> str:
    lines = [f"{'experiment':<22}{'':>6}" + "".join(f"{title:>14}" for title, _ in COLUMNS)]
    for experiment, runs in results.items():
        for label, stat in (("mean", statistics.mean), ("min", min), ("max", max)):
            cells = "".join(f"{stat([r[key] for r in runs]):>14.3f}" for _, key in COLUMNS)
            lines.append(f"{experiment if label == 'mean' else '':<22}{label:>6}{cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["mock_descriptiveness", "mock_sentiment"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--plot", type=Path, help="save the first run's PPO curves (a PNG from its report) here")
    common.add_out_arg(parser)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="extra launch.py flags for every run")
    args = parser.parse_args()
    save_root = Path(tempfile.mkdtemp(prefix="lmhp-bench-"))
    results: dict[str, list[dict]] = {}
    try:
        for experiment in args.experiments:
            for seed in args.seeds:
                summary = run_once(experiment, seed, save_root, args.flags)
                results.setdefault(experiment, []).append(summary)
                print(f"{experiment} seed {seed}: accuracy {summary['reward_model_heldout_accuracy']:.3f}, win rate "
                      f"{summary['win_rate']:.3f}, score {summary['true_score_before']:.2f} → "
                      f"{summary['true_score_after']:.2f}, KL {summary['final_kl']:.2f}, {summary['wall_time']:.0f} s",
                      flush=True)
        if args.plot:
            first = save_root / f"{args.experiments[0]}-seed{args.seeds[0]}"
            shutil.copyfile(first / "report" / "ppo_score.png", args.plot)
        print()
        print(table(results))
        common.write_results(args.out, "mock_demo", dict(flags=args.flags, runs=results))
    finally:
        shutil.rmtree(save_root, ignore_errors=True)


if __name__ == "__main__":
    main()
