"""Measuring a finished cell: its final policy judged as the demo's verdict judges it, and the online
runs' reward strength round by round. Each is computed once from the kept run (into a file of its
folder) and recorded; without the run, it is read from the record."""

import json
import statistics
from pathlib import Path

import torch

from lm_human_preferences.evaluation import report, verdict
from lm_human_preferences.labeling import mock_labelers
from lm_human_preferences.language import trained_models
from lm_human_preferences.task import lm_tasks, rewards
from lm_human_preferences.task.policy import Policy, load_policy
from lm_human_preferences.training import train_policy
from lm_human_preferences.utils import save_folders

from .cells import Cell
from .records import DONE_FILE, MEASURED_FILE, STRENGTH_FILE, from_run_or_record, once


def initial_policy(task: lm_tasks.TaskHParams) -> Policy:
    return load_policy(task.policy.initial_model, task)


def ppo_logs(folder: Path) -> dict[str, list[float]]:
    """Per-update KL, kl_coef and score of a run, from its TensorBoard logs."""
    scalars = report.read_scalars(folder / save_folders.TENSORBOARD / save_folders.PPO_LOG, [], "")
    out = {}
    for tag, key in (("objective/kl", "kl_history"), ("objective/kl_coef", "kl_coef_history"),
                     ("objective/score", "score_history")):
        values = scalars.get(tag, {})
        out[key] = [values[step] for step in sorted(values)]
    return out


@torch.no_grad()
def measure_folder(cell: Cell, keep: Path) -> dict:
    """The final policy against the initial one on the verdict's test queries and the cell's seed:
    both labelers' scores before and after and win rates, the KL, the share of repeated words, and
    the scores of the sweep's reward model (`proxy`) and of the run's own (`own`)."""
    folder = keep / cell.name
    hp = train_policy.HParams.from_json((folder / save_folders.POLICY_HPARAMS).read_text())
    policy, ref = load_policy(str(folder / save_folders.POLICY), hp.task), initial_policy(hp.task)
    samples = verdict.sample_before_after(policy, ref, hp.task, cell.seed)
    out: dict = {"cell": cell.name, "wall_time": float((folder / DONE_FILE).read_text()),
                 "kl": verdict.kl_from_initial(ref, samples)}
    for labeler in (cell.labeler, f"{cell.labeler}_distinct"):
        before, after = verdict.labeler_scores(labeler, samples)
        suffix = "" if labeler == cell.labeler else "_distinct"
        out["score_before" + suffix] = statistics.mean(before)
        out["score" + suffix] = statistics.mean(after)
        out["win_rate" + suffix] = verdict.win_rate(before, after)
    out["repeated_words"] = statistics.mean(1 - len(set(mock_labelers.words(t))) / max(1, len(mock_labelers.words(t)))
                                            for t in samples.texts["after"])
    models = {key: f for key, f in (("proxy", keep / cell.sweep_model().name), ("own", folder))
              if (f / save_folders.REWARD_MODEL).exists()}
    for key, model_folder in models.items():
        reward_model = rewards.load_trained(str(model_folder)).eval()
        for name in ("before", "after"):
            scores = reward_model(samples.queries, samples.responses[name])
            out[f"{key}_rm_{name}"] = scores.mean().item()
            out[f"{key}_rm_{name}_std"] = scores.std(unbiased=False).item()
    mock = folder / save_folders.MOCK_SUMMARY
    if mock.exists():
        summary = json.loads(mock.read_text())
        out["heldout_accuracy"] = summary["reward_model_heldout_accuracy"]
        out["demo_win_rate"], out["demo_final_kl"] = summary["win_rate"], summary["final_kl"]
    out.update(ppo_logs(folder))
    return out


def measure(cell: Cell, keep: Path, record: Path) -> dict | None:
    """The cell's measurements (measure_folder, computed once) with its KL target, from its kept run
    and recorded, or from its record when the run is not kept; None if neither."""
    def measured(folder: Path) -> dict:
        hp = json.loads((folder / save_folders.POLICY_HPARAMS).read_text())
        return {**once(folder / MEASURED_FILE, lambda: measure_folder(cell, keep)),
                "kl_target": (hp["rewards"]["adaptive_kl"] or {}).get("target")}

    return from_run_or_record(cell, keep, record, "findings", measured)


# -- the online overshoot: how strong the reward is, round by round


def checkpoint_names(folder: Path) -> dict[int, str]:
    """step → file name of the checkpoints a model folder kept (the newest few)."""
    return {int(p.stem.split("-")[1]): p.name
            for p in sorted((folder / save_folders.CHECKPOINTS).glob("model-*.safetensors"))}


@torch.no_grad()
def reward_strength(cell: Cell, keep: Path) -> list[dict]:
    """For each kept PPO checkpoint at a label round's update (and the offline run's checkpoints):
    the mean and spread (std) of the reward models' scores of that policy's responses to the 256
    test queries — the reward model the policy trained against until then (`before`) and the one
    it trains against from then on (`after`; offline both are the one reward model). PPO's
    advantages are whitened, so what weighs against kl_coef · KL is this spread."""
    folder = keep / cell.name
    hp = train_policy.HParams.from_json((folder / save_folders.POLICY_HPARAMS).read_text())
    task, ref = hp.task, initial_policy(hp.task)
    queries = next(lm_tasks.query_batches(task, ref.encoding, verdict.VERDICT_QUERIES, mode="test"))
    policies = checkpoint_names(folder / save_folders.POLICY)
    models = checkpoint_names(folder / save_folders.REWARD_MODEL)
    rounds_file = folder / save_folders.ONLINE_SUMMARY
    rounds = json.loads(rounds_file.read_text()) if rounds_file.exists() else []
    reward_model = rewards.load_trained(str(folder)).eval()
    policy = load_policy(str(folder / save_folders.POLICY), task)

    def scores(update: int, model_step: int | None) -> tuple[float, float]:
        if model_step is not None:
            reward_model.load_tensors(trained_models.load_file(folder / save_folders.REWARD_MODEL,
                                                               models[model_step]).tensors)
        p = ref
        if update > 0:
            trained_models.load_into(policy.model, trained_models.load_file(folder / save_folders.POLICY,
                                                                            policies[update]).tensors, "the policy")
            p = policy
        rollouts = p.respond(queries, task.response_length, torch.Generator(p.device).manual_seed(cell.seed))
        values = reward_model(queries, lm_tasks.postprocess_responses(task, rollouts["responses"],
                                                                      p.encoding.padding_token))
        return values.mean().item(), values.std(unbiased=False).item()

    out = []
    if rounds:
        for r in rounds:
            if r["update"] == 0 or r["update"] not in policies or r["round"] not in models \
                    or r["round"] - 1 not in models:
                continue
            entry = dict(update=r["update"], round=r["round"])
            for key, step in (("before", r["round"] - 1), ("after", r["round"])):
                entry[f"{key}_mean"], entry[f"{key}_std"] = scores(r["update"], step)
                entry[f"{key}_initial_mean"], entry[f"{key}_initial_std"] = scores(0, step)
            out.append(entry)
    else:
        for update in sorted(u for u in policies if u > 0):
            entry = dict(update=update)
            entry["after_mean"], entry["after_std"] = scores(update, None)
            entry["after_initial_mean"], entry["after_initial_std"] = scores(0, None)
            out.append(entry)
    return out


def strength(cell: Cell, keep: Path, record: Path) -> list[dict] | None:
    """reward_strength (computed once) from the kept run and recorded, or from the record; None if neither."""
    return from_run_or_record(cell, keep, record, "reward_strength",
                              lambda folder: once(folder / STRENGTH_FILE, lambda: reward_strength(cell, keep)))
