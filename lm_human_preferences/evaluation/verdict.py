"""The offline demo: the whole method with a mock labeler standing in for people.

`labels.source mock:<labeler>[:<noise>]` makes a run collect its own labels first: the initial
policy answers the task's queries with N responses each, the mock labeler picks the best, and
the records are written in the released schema to `<save_dir>/labels.json`, which the reward
model then trains on like any label file. After PPO the labeler judges the result: its mean
score of the initial and of the trained policy's responses to the same test queries, and the
win rate — the share of those queries on which it prefers the trained policy's response (ties
count half), the way the paper reported its results.

An online run (`--rewards.online on`) collects no labels up front: its label rounds ask the
same mock labeler about the current policy's samples (online.py); the verdict is the same.
"""

import json
import tempfile
from pathlib import Path

import torch

from lm_human_preferences.task import lm_tasks
from lm_human_preferences.training import run, train_policy, train_reward
from lm_human_preferences.labeling import collect, label_files, mock_labelers
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.utils import distributed, logging, storage

HELD_OUT_SHARE = 4  # collect num_train · (1 + 1/4) records: the last fifth is held out
VERDICT_QUERIES = 256


def reward_hparams(hp) -> train_reward.HParams | None:
    """The hparams of the reward model a run trains (train_reward, or train_policy's train_new_model)."""
    return hp.rewards.train_new_model if isinstance(hp, train_policy.HParams) else hp


def uses_mock_labels(hp) -> bool:
    reward_hp = reward_hparams(hp)
    return reward_hp is not None and reward_hp.labels.source.startswith(mock_labelers.MOCK_PREFIX)


def initial_policy(task: lm_tasks.TaskHParams) -> Policy:
    model, encoding_name = trained_models.load_initial(task.policy.initial_model, device=distributed.device())
    return Policy(model.eval(), encodings.get(encoding_name), task)


def collect_mock_labels(reward_hp: train_reward.HParams, labeler_name: str, noise: float, path: Path,
                        seed: int) -> None:
    """Label the initial policy's samples with the mock labeler; write them to `path`."""
    n_responses = collect.count_responses(reward_hp.labels.type)
    num_records = reward_hp.labels.num_train + reward_hp.labels.num_train // HELD_OUT_SHARE
    logging.print_main(f"labelling {num_records} queries × {n_responses} responses with the {labeler_name!r} "
                       f"mock labeler (noise {noise}) → {path}")
    labeler = collect.MockLabeler(labeler_name, noise, seed)
    records = collect.collect(initial_policy(reward_hp.task), reward_hp.task, labeler, num_records, n_responses, seed,
                              reward_hp.run.chunk_size)
    label_files.write(records, path)


def resolve_mock_labels(hp, hparams_file: str) -> tuple[str, int]:
    """Point the reward model's labels.source at `<save_dir>/labels.json`, claim the save folder,
    fix the seed, and collect the labels there (rank 0) unless a resumed run has them already
    (an online run only claims the folder and fixes the seed).

    Returns (the labeler's name, the seed).
    """
    reward_hp = reward_hparams(hp)
    labeler_name, noise = mock_labelers.parse_source(reward_hp.labels.source)
    if isinstance(hp, train_policy.HParams) and hp.rewards.online is not None:  # its rounds label as they go
        run.prepare_save_dir(hp, hparams_file)
        return labeler_name, run.resolve_seed(hp)
    path = Path(hp.run.save_dir) / "labels.json" if hp.run.save_dir else None
    if path is not None:
        reward_hp.labels.source = str(path)  # before the save folder compares hparams with a run it holds
    run.prepare_save_dir(hp, hparams_file)
    seed = run.resolve_seed(hp)
    if distributed.is_main():
        path = path or Path(tempfile.mkdtemp()) / "labels.json"
        if path.exists():
            logging.print_main(f"using the labels collected before: {path}")
        else:
            collect_mock_labels(reward_hp, labeler_name, noise, path, seed)
    reward_hp.labels.source = distributed.broadcast_object(str(path) if path else None)
    return labeler_name, seed


def verdict(policy: Policy, ref_policy: Policy, task: lm_tasks.TaskHParams, labeler_name: str, seed: int,
            n_queries: int = VERDICT_QUERIES) -> dict:
    """The labeler's mean score before and after, the win rate, and (query, before, after) samples."""
    judge = mock_labelers.get(labeler_name)
    queries = next(lm_tasks.query_batches(task, policy.encoding, n_queries, mode="test", device=policy.device))
    texts = {}
    for name, p in (("before", ref_policy), ("after", policy)):
        generator = torch.Generator(policy.device).manual_seed(seed)
        _, query_texts, texts[name] = collect.sample_texts(p, task, queries, generator, None)
    before = [judge(q, r) for q, r in zip(query_texts, texts["before"])]
    after = [judge(q, r) for q, r in zip(query_texts, texts["after"])]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(after, before))
    samples = [dict(query=q, before=b, before_score=bs, after=a, after_score=as_)
               for q, b, bs, a, as_ in zip(query_texts, texts["before"], before, texts["after"], after)]
    return dict(true_score_before=sum(before) / n_queries, true_score_after=sum(after) / n_queries,
                win_rate=wins / n_queries, verdict_queries=n_queries, samples=samples[:3])


def summary(hp: train_policy.HParams, labeler_name: str, policy: Policy, result: dict, seed: int) -> dict:
    """How the run did by the labeler's own judgement, with the reward model's held-out accuracy."""
    heldout = (result.get("reward_model") or {}).get("heldout", {})
    out = {"labeler": labeler_name, "seed": seed,
           "reward_model_heldout_accuracy": heldout.get("accuracy"), "heldout_count": heldout.get("count"),
           "chance": heldout.get("chance"),
           "final_kl": result["last"]["objective/kl"], "final_kl_coef": result["last"]["objective/kl_coef"],
           "kl_target": hp.rewards.adaptive_kl.target if hp.rewards.adaptive_kl else None}
    out.update(verdict(policy, initial_policy(hp.task), hp.task, labeler_name, seed))
    return out


def print_summary(s: dict) -> None:
    logging.print_main("=" * 80)
    logging.print_main(f"mock labeler {s['labeler']!r} (seed {s['seed']}): reward model held-out accuracy "
                       f"{s['reward_model_heldout_accuracy']:.3f} (chance {s['chance']:.2f}, {s['heldout_count']} labels)")
    logging.print_main(f"win rate of the trained policy against the initial one: {s['win_rate']:.3f} "
                       f"({s['verdict_queries']} test queries, ties count half)")
    logging.print_main(f"labeler's score of the responses: {s['true_score_before']:.3f} before PPO → "
                       f"{s['true_score_after']:.3f} after; final KL {s['final_kl']:.2f} "
                       f"(target {s['kl_target']}, kl_coef {s['final_kl_coef']:.3f})")
    for pair in s["samples"]:
        logging.print_main(f"query:  {pair['query']!r}\nbefore: {pair['before']!r} ({pair['before_score']:+.0f})\n"
                           f"after:  {pair['after']!r} ({pair['after_score']:+.0f})")


def train(mode: str, hp):
    """Run `mode` (train_reward or train_policy) on mock labels; train_policy ends with the labeler's verdict."""
    hparams_file = train_reward.HPARAMS_FILE if mode == "train_reward" else train_policy.HPARAMS_FILE
    labeler_name, seed = resolve_mock_labels(hp, hparams_file)
    if mode == "train_reward":
        return train_reward.train(hp)
    policy, result = train_policy.train(hp)
    if distributed.is_main():
        result["mock"] = summary(hp, labeler_name, policy, result, seed)
        print_summary(result["mock"])
        if hp.run.save_dir:
            storage.atomic_write_text(Path(hp.run.save_dir) / "mock_summary.json", json.dumps(result["mock"], indent=2))
    return policy, result
