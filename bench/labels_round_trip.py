#!/usr/bin/env python3
"""Labels out and back in: does a best_of_2 reward model trained on exported pairs match the best_of_4 one?

    python bench/labels_round_trip.py --dir /tmp/rt      # mock_descriptiveness, the demo's 2,560 labels

Each step is a command of docs/interchange.md, run in a fresh process and skipped when its output is
already in --dir (so an interrupted run goes on):
  1. ./label.py E --out DIR/labels.json --n 2560 --seed 0            (the demo's labels: 2,048 train + 512 held out)
  2. ./launch.py train_reward E rt4 --save_dir DIR --labels.source DIR/labels.json   (best_of_4)
  3. ./label.py export DIR/labels.json --experiment E --out DIR/pairs.jsonl          (3 pairs a question)
  4. ./label.py import DIR/pairs.jsonl --experiment E --out DIR/pairs.json           (best_of_2 records)
  5. ./launch.py train_reward E rt2 --save_dir DIR --labels.source DIR/pairs.json --labels.type best_of_2
         --labels.num_train K    (K: the pairs of the same 2,048 training questions; 3 times the steps)
  6. the same with --batch_size 96 (3 × the experiment's 32) as rt2b: as many steps as best_of_4 (64),
     each over the pairs of as many questions on average
Then both reward models score the held-out best-of-4 records (the questions after the first
2,048 that are not among them, as train_reward holds out): best-of-4 accuracy (the labelled
best gets the highest reward; chance 0.25) and pairwise accuracy (the best above each other
response; chance 0.5), beside the held-out accuracy each run saved in its train_reward_summary.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lm_human_preferences import experiments
from lm_human_preferences.labeling import interchange, label_files, label_types
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task import rewards

ROOT = Path(__file__).resolve().parent.parent

import common  # noqa: E402  (bench/)


def step(output: Path, command: list[str]) -> None:
    """Run `command` (a fresh process) unless `output` exists; print it and its wall time."""
    shown = " ".join(str(c) for c in command)
    if output.exists():
        print(f"kept {output} (from: {shown})", flush=True)
        return
    started = time.time()
    done = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shown} failed:\n{done.stderr[-3000:]}")
    last = done.stdout.strip().splitlines()[-1:] or [""]
    print(f"{time.time() - started:6.0f} s  {shown}\n         {last[0]}", flush=True)


def training_prefix(pairs: label_files.Labels, train: label_files.Labels) -> int:
    """How many leading records of `pairs` belong to the questions of `train`."""
    seen = {q.tobytes() for q in train.columns["query"]}
    k = 0
    while k < len(pairs) and pairs.columns["query"][k].tobytes() in seen:
        k += 1
    return k


def changed_pairs(labels: label_files.Labels, label_type: label_types.LabelType, pairs: label_files.Labels) -> int:
    """How many imported pairs differ from the label file's (query, best, other) tokens, in file order."""
    keys = label_type.response_keys
    expected = [(q, labels.columns[keys[b]][i], labels.columns[keys[j]][i])
                for i, (q, b) in enumerate(zip(labels.columns["query"], labels.columns["best"]))
                for j in range(len(keys)) if j != b]
    best = pairs.columns["best"]
    got = zip(pairs.columns["query"], pairs.columns["sample0"], pairs.columns["sample1"], best)
    imported = [(q, s1 if b else s0, s0 if b else s1) for q, s0, s1, b in got]
    if len(imported) != len(expected):
        raise SystemExit(f"{len(expected)} pairs exported but {len(imported)} imported: see the import's report")
    return sum(any(not np.array_equal(x, y) for x, y in zip(e, g)) for e, g in zip(expected, imported))


@torch.no_grad()
def rewards_of(save_dir: Path, labels: label_files.Labels, n: int, chunk: int = 128) -> np.ndarray:
    """[records, n] rewards of a trained reward model for every response of every record."""
    model = rewards.load_trained(str(save_dir)).eval()
    out = []
    for start in range(0, len(labels), chunk):
        part = labels[start:start + chunk]
        queries = torch.as_tensor(part.columns["query"]).long()
        responses = torch.stack([torch.as_tensor(part.columns[f"sample{i}"]).long() for i in range(n)], dim=1)
        scores = model(queries.repeat_interleave(n, dim=0), responses.reshape(len(queries) * n, -1))
        out.append(scores.float().view(len(queries), n).numpy())
    return np.concatenate(out)


def accuracies(scores: np.ndarray, best: np.ndarray) -> tuple[float, float]:
    """(best-of-N accuracy, pairwise accuracy: the best strictly above each other response)."""
    best_scores = scores[np.arange(len(best)), best][:, None]
    others = np.ones_like(scores, dtype=bool)
    others[np.arange(len(best)), best] = False
    return float((scores.argmax(axis=1) == best).mean()), float((best_scores > scores)[others].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="where the labels, pairs and both runs go (kept)")
    parser.add_argument("--experiment", default="mock_descriptiveness")
    parser.add_argument("--n", type=int, default=2560, help="labelled questions")
    parser.add_argument("--num_train", type=int, default=2048, help="training questions; the rest are held out")
    parser.add_argument("--seed", type=int, default=0, help="the labels' seed")
    common.add_out_arg(parser)
    args = parser.parse_args()
    d, e = args.dir.resolve(), args.experiment
    d.mkdir(parents=True, exist_ok=True)
    step(d / "labels.json", ["label.py", e, "--out", d / "labels.json", "--n", args.n, "--seed", args.seed])
    step(d / "rt4" / "train_reward_summary.json", ["launch.py", "train_reward", e, "rt4", "--save_dir", d,
                                                   "--labels.source", d / "labels.json", "--labels.num_train",
                                                   args.num_train])
    step(d / "pairs.jsonl", ["label.py", "export", d / "labels.json", "--experiment", e, "--out", d / "pairs.jsonl"])
    step(d / "pairs.json", ["label.py", "import", d / "pairs.jsonl", "--experiment", e, "--out", d / "pairs.json"])

    task = experiments.get("train_reward", e).task
    enc = encodings.get(trained_models.context_and_encoding(task.policy.initial_model)[1])
    vocab = label_files.Vocabulary(enc.n_vocab, enc.padding_token)
    first = json.loads((d / "labels.json").read_text())[0]
    label_type = label_types.get(interchange.detect_type(first, str(d / "labels.json")))
    n = len(label_type.response_keys)
    labels = label_files.load(str(d / "labels.json"), label_type, task.query_length, task.response_length, vocab)
    train, heldout = label_files.split(labels, args.num_train, str(d / "labels.json"))
    pairs = label_files.load(str(d / "pairs.json"), label_types.get("best_of_2"), task.query_length,
                             task.response_length, vocab)
    k = training_prefix(pairs, train)
    changed = changed_pairs(labels, label_type, pairs)
    batch = experiments.get("train_reward", e).batch_size
    runs = {"rt4": f"best_of_{n} on labels.json", "rt2": f"best_of_2 on the pairs, batch {batch}",
            "rt2b": f"best_of_2, batch {(n - 1) * batch}"}
    for name, flags in (("rt2", []), ("rt2b", ["--batch_size", (n - 1) * batch])):
        step(d / name / "train_reward_summary.json", ["launch.py", "train_reward", e, name, "--save_dir", d,
                                                      "--labels.source", d / "pairs.json", "--labels.type",
                                                      "best_of_2", "--labels.num_train", k, *flags])

    print(f"\n{len(train)} training questions ({k} pairs), {len(heldout)} held-out questions; "
          f"chance: best-of-{n} {1 / n:.2f}, pairwise 0.50")
    print(f"{changed} of {len(pairs)} imported pairs hold other tokens than the label file's "
          "(text that its encoding reads differently, such as a word sampled glued to the one before)")
    print(f"{'reward model':<34}{'steps':>6}{'saved held-out acc.':>22}{f'best-of-{n} acc.':>16}{'pairwise acc.':>15}")
    best = heldout.columns["best"]
    models = []
    for name, title in runs.items():
        saved = json.loads((d / name / "train_reward_summary.json").read_text())
        hp = json.loads((d / name / "train_reward_hparams.json").read_text())
        of_n, pairwise = accuracies(rewards_of(d / name, heldout, n), best)
        steps = hp["labels"]["num_train"] // hp["batch_size"]
        print(f"{title:<34}{steps:>6}{saved['heldout']['accuracy']:>14.3f} ({saved['heldout']['count']:>4})"
              f"{of_n:>16.3f}{pairwise:>15.3f}")
        models.append(dict(model=title, updates=steps, saved_heldout_accuracy=saved["heldout"]["accuracy"],
                           saved_heldout_count=saved["heldout"]["count"], best_of_n_accuracy=of_n,
                           pairwise_accuracy=pairwise))
    common.write_results(args.out, "labels_round_trip", dict(
        experiment=e, n=args.n, num_train=args.num_train, seed=args.seed, training_questions=len(train),
        heldout_questions=len(heldout), pairs=len(pairs), changed_pairs=changed, models=models))


if __name__ == "__main__":
    main()
