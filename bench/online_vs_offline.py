#!/usr/bin/env python3
"""Online against offline label collection at an equal label budget, over several seeds.

    python bench/online_vs_offline.py                       # mock_descriptiveness, seeds 0 1 2
    python bench/online_vs_offline.py --experiment mock_sentiment --seeds 0 1 2 3
    python bench/online_vs_offline.py --flags --ppo.total_episodes 2560   # extra launch.py flags for every run

Each seed runs the experiment three times, each time in a fresh process: offline (the README's
main command: every label from the initial policy, before PPO), online (`--rewards.online on`:
the same number of labels, collected in rounds from the current policy, the reward model
renormalized on the current policy's samples each round) and online-initial (the same, but
renormalized on the initial policy's samples, as round 0 is). Then the final
reward model of each run is put to the test where an offline one goes wrong: the mock
labeler labels `--eval` fresh best-of-4 questions on the FINAL policy's samples (test
queries), and the reward model's accuracy on them is measured (chance 0.25).

The table gives, per mode, the mean, min and max over seeds of: that accuracy, the reward
model's accuracy on its own held-out labels (offline: the initial policy's samples; online:
every round's), the win rate of the trained policy against the initial one by the labeler,
the labeler's mean score of the trained policy's responses, the final KL and the wall time.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lm_human_preferences.labeling import collect, label_types  # noqa: E402
from lm_human_preferences.task import rewards  # noqa: E402
from lm_human_preferences.training import online, train_policy  # noqa: E402

import common  # noqa: E402  (bench/)
from lm_human_preferences.utils import save_folders  # noqa: E402
from lm_human_preferences.task.policy import load_policy  # noqa: E402

MODES = {"offline": [], "online": ["--rewards.online", "on"],
         "online-initial": ["--rewards.online", "on", "--rewards.online.normalize_on", "initial"]}
COLUMNS = [("final-policy acc", "final_policy_accuracy"), ("held-out acc", "reward_model_heldout_accuracy"),
           ("win rate", "win_rate"), ("score after", "true_score_after"), ("final KL", "final_kl"),
           ("wall s", "wall_time")]
EVAL_SEED = 10007  # the evaluation's samples: the same queries and noise for both modes of a seed


def run_once(experiment: str, mode: str, seed: int, save_root: Path, flags: list[str]) -> Path:
    """The run's save folder, after running it (a run that finished in `save_root` before is kept)."""
    name = f"{experiment}-{mode}-seed{seed}"
    if (save_root / name / "wall_time").exists():
        return save_root / name
    command = [sys.executable, str(ROOT / "launch.py"), "train_policy", experiment, name, "--save_dir",
               str(save_root), "--run.seed", str(seed), *MODES[mode], *flags]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    (save_root / name / "wall_time").write_text(str(time.time() - started))
    return save_root / name


@torch.no_grad()
def final_policy_accuracy(run_dir: Path, labeler: str, n_labels: int, seed: int) -> float:
    """The final reward model's best-of-4 accuracy on mock labels of the final policy's samples."""
    hp = train_policy.HParams.from_json((run_dir / save_folders.POLICY_HPARAMS).read_text())
    policy = load_policy(str(run_dir / save_folders.POLICY), hp.task)
    reward_model = rewards.load_trained(str(run_dir)).eval()
    label_type = label_types.get(hp.rewards.train_new_model.labels.type)
    records = collect.collect(policy, hp.task, collect.MockLabeler(labeler, 0.0, seed), n_labels, seed=seed,
                              chunk_size=hp.run.chunk_size, mode="test")
    labels = online.as_labels(records, label_type, hp.task)
    keys = label_type.response_keys
    queries = torch.as_tensor(labels.columns["query"]).long()
    responses = torch.stack([torch.as_tensor(labels.columns[k]).long() for k in keys], dim=1)
    scores = reward_model(queries.repeat_interleave(len(keys), dim=0), responses.reshape(len(records) * len(keys), -1))
    best = torch.as_tensor(labels.columns[label_type.label_key]).long()
    return (scores.view(len(records), len(keys)).argmax(dim=1) == best).float().mean().item()


def measure(run_dir: Path, n_labels: int, seed: int) -> dict:
    summary = json.loads((run_dir / "mock_summary.json").read_text())
    summary["wall_time"] = float((run_dir / "wall_time").read_text())
    measured = run_dir / f"final_policy_accuracy-{n_labels}"
    if not measured.exists():
        measured.write_text(str(final_policy_accuracy(run_dir, summary["labeler"], n_labels, EVAL_SEED + seed)))
    summary["final_policy_accuracy"], summary["seed"] = float(measured.read_text()), seed
    return summary


def table(results: dict[str, list[dict]]) -> str:
    lines = [f"{'mode':<16}{'':>6}" + "".join(f"{title:>18}" for title, _ in COLUMNS)]
    for mode, runs in results.items():
        for label, stat in (("mean", statistics.mean), ("min", min), ("max", max)):
            cells = "".join(f"{stat([r[key] for r in runs]):>18.3f}" for _, key in COLUMNS)
            lines.append(f"{mode if label == 'mean' else '':<16}{label:>6}{cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="mock_descriptiveness")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--eval", type=int, default=256, help="fresh labels of the final policy's samples per run")
    parser.add_argument("--keep", type=Path, help="keep the runs' save folders here (default: a temporary folder); "
                        "runs that finished there before are measured, not run again")
    common.add_out_arg(parser)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="extra launch.py flags for every run")
    args = parser.parse_args()
    save_root = args.keep or Path(tempfile.mkdtemp(prefix="lmhp-online-bench-"))
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    try:
        for seed in args.seeds:
            for mode in MODES:
                summary = measure(run_once(args.experiment, mode, seed, save_root, args.flags), args.eval, seed)
                results[mode].append(summary)
                print(f"{mode} seed {seed}: final-policy accuracy {summary['final_policy_accuracy']:.3f}, held-out "
                      f"accuracy {summary['reward_model_heldout_accuracy']:.3f}, win rate {summary['win_rate']:.3f}, "
                      f"score {summary['true_score_before']:.2f} → {summary['true_score_after']:.2f}, "
                      f"KL {summary['final_kl']:.2f}, {summary['wall_time']:.0f} s", flush=True)
        print(f"\n{args.experiment}, seeds {' '.join(map(str, args.seeds))}, flags {' '.join(args.flags) or '-'}")
        print(table(results))
        common.write_results(args.out, "online_vs_offline", dict(experiment=args.experiment, flags=args.flags,
                                                                 runs=results))
    finally:
        if args.keep is None:
            shutil.rmtree(save_root, ignore_errors=True)


if __name__ == "__main__":
    main()
