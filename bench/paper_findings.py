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
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lm_human_preferences.evaluation import report, verdict  # noqa: E402
from lm_human_preferences.labeling import mock_labelers  # noqa: E402
from lm_human_preferences.language import encodings, trained_models  # noqa: E402
from lm_human_preferences.task import lm_tasks, rewards  # noqa: E402
from lm_human_preferences.task.policy import Policy  # noqa: E402
from lm_human_preferences.task.policy import load_policy as load_model_policy  # noqa: E402
from lm_human_preferences.training import train_policy  # noqa: E402
from lm_human_preferences.utils import save_folders  # noqa: E402

EXPERIMENTS = ("mock_sentiment", "mock_descriptiveness")
HORIZON = 640  # episodes: kl_coef can change by up to e^±2 over 6,400 episodes (1 ± 0.2 · 64/640 per update)
TARGET = 6.0  # the demo's KL target: label scaling and online cells
LABEL_COUNTS = (256, 512, 1024, 2048, 4096)
SWEEP_LABELS = 2048  # the reward model of the KL sweep, and the offline run of the online comparison
KL_TARGETS = (1.5, 3.0, 12.0, 24.0)  # and TARGET (the 2,048-label cell) and the penalty off
DISTINCT = "distinct-"  # the kinds whose labels come from the saturating labeler
DISTINCT_KL_TARGETS = (1.5, 24.0)  # their sweep: these, TARGET and the penalty off
DONE_FILE, FAILED_FILE, MEASURED_FILE = "wall_time", "failed", "findings.json"
DOCS = ROOT / "docs"
RECORD = ROOT / "bench" / "results" / "paper_findings"


@dataclass(frozen=True)
class Cell:
    experiment: str
    seed: int
    kind: str  # labels-N, ceiling, kl-T, kl-off, online-{current,initial}[-rescaled], distinct-{labels-N,kl-T,kl-off}

    @property
    def name(self) -> str:
        return f"{self.experiment}-s{self.seed}-{self.kind}"

    @property
    def labeler(self) -> str:
        return self.experiment.removeprefix("mock_")

    @property
    def distinct(self) -> bool:
        """Whether the cell's reward model learns from the saturating labeler (`<labeler>_distinct`)."""
        return self.kind.startswith(DISTINCT)

    def sweep_model(self) -> "Cell":
        """The cell whose reward model the KL sweep uses (and whose run is the offline run)."""
        return Cell(self.experiment, self.seed, f"{DISTINCT if self.distinct else ''}labels-{SWEEP_LABELS}")


# -- the grid


# One seed's cells, most informative first (the experiments interleaved).
KINDS = (f"labels-{SWEEP_LABELS}", "online-initial", "ceiling", "online-current", "labels-256", "kl-off",
         "online-initial-rescaled", "online-current-rescaled", "kl-1.5", "labels-4096", "kl-24.0",
         "labels-512", "labels-1024", "kl-3.0", "kl-12.0",
         f"{DISTINCT}labels-{SWEEP_LABELS}", f"{DISTINCT}kl-off", f"{DISTINCT}kl-24.0", f"{DISTINCT}kl-1.5")


def grid(seeds: Iterable[int], experiments: Iterable[str], kinds: Iterable[str] = KINDS) -> list[Cell]:
    """Every seed's cells in KINDS order, seed by seed."""
    return [Cell(e, seed, k) for seed in seeds for k in KINDS if k in kinds for e in experiments]


def launch_flags(cell: Cell, keep: Path) -> list[str]:
    """The launch.py flags of a cell (all but the ceiling), before the bench's --flags."""
    flags = ["--save_dir", str(keep), "--run.seed", str(cell.seed)]
    horizon = ["--rewards.adaptive_kl.horizon", str(HORIZON)]
    target = ["--rewards.adaptive_kl.target", str(TARGET)]
    kind = cell.kind.removeprefix(DISTINCT)
    if kind.startswith("labels-"):
        source = ["--rewards.train_new_model.labels.source", f"mock:{cell.labeler}_distinct"] if cell.distinct else []
        return flags + target + horizon + source + ["--rewards.train_new_model.labels.num_train",
                                                    kind.removeprefix("labels-")]
    if kind.startswith("kl-"):
        model = ["--rewards.train_new_model", "off", "--rewards.trained_model", str(keep / cell.sweep_model().name)]
        if kind == "kl-off":
            return flags + model + ["--rewards.adaptive_kl", "off", "--rewards.kl_coef", "0"]
        return flags + model + horizon + ["--rewards.adaptive_kl.target", kind.removeprefix("kl-")]
    if kind.startswith("online-"):
        online = ["--rewards.online", "on"]
        if kind.startswith("online-initial"):
            online += ["--rewards.online.normalize_on", "initial"]
        if kind.endswith("-rescaled"):
            online += ["--rewards.online.rescale_kl_coef", "on"]
        return flags + target + horizon + online
    raise ValueError(f"unknown cell kind {kind}")


def command(cell: Cell, keep: Path, extra: list[str]) -> list[str]:
    if cell.kind.startswith("ceiling"):
        return [sys.executable, str(Path(__file__).resolve()), "--ceiling-run", cell.experiment, str(cell.seed),
                str(keep), cell.kind, "--flags", *extra]
    return [sys.executable, str(ROOT / "launch.py"), "train_policy", cell.experiment, cell.name,
            *launch_flags(cell, keep), *extra]


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_cell(cell: Cell, keep: Path, extra: list[str]) -> float | None:
    """Run a cell in a fresh process (its output in DIR/<cell>.log); its wall time, or None if it failed."""
    folder = keep / cell.name
    if cell.kind.removeprefix(DISTINCT).startswith("kl-") and not (keep / cell.sweep_model().name / DONE_FILE).exists():
        print(f"{cell.name}: skipped, its reward model ({cell.sweep_model().name}) has not finished", flush=True)
        return None
    started = time.time()
    with open(keep / f"{cell.name}.log", "a") as log:
        done = subprocess.run(command(cell, keep, extra), stdout=log, stderr=subprocess.STDOUT, env=one_thread_env())
    wall = time.time() - started
    folder.mkdir(parents=True, exist_ok=True)
    if done.returncode != 0:
        (folder / FAILED_FILE).write_text(f"exit status {done.returncode}; see {keep / cell.name}.log\n")
        print(f"{cell.name}: FAILED after {wall:.0f} s (exit {done.returncode}; log {keep / cell.name}.log)", flush=True)
        return None
    (folder / DONE_FILE).write_text(str(wall))
    (folder / FAILED_FILE).unlink(missing_ok=True)
    return wall


# -- the ceiling: PPO on the labeler's score


class LabelerReward:
    """A reward function: the mock labeler's score of the decoded response, normalized with the
    mean and std it has on the initial policy's samples (a reward model is normalized so)."""

    def __init__(self, labeler: str, encoding: encodings.Encoding, mean: float, std: float):
        self.judge, self.encoding, self.mean, self.std = mock_labelers.get(labeler), encoding, mean, std

    def raw(self, queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        decode = self.encoding.decode
        return torch.tensor([self.judge(decode(q), decode(r)) for q, r in zip(queries.tolist(), responses.tolist())])

    def __call__(self, queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        return ((self.raw(queries, responses) - self.mean) / self.std).to(responses.device)


@torch.no_grad()
def labeler_moments(labeler: str, task: lm_tasks.TaskHParams, n: int, seed: int) -> tuple[float, float]:
    """Mean and std of the labeler's score of the initial policy's responses to `n` train queries."""
    policy = initial_policy(task)
    queries = next(lm_tasks.query_batches(task, policy.encoding, n, device=policy.device))
    responses = policy.respond(queries, task.response_length, torch.Generator(policy.device).manual_seed(seed))
    postprocessed = lm_tasks.postprocess_responses(task, responses["responses"], policy.encoding.padding_token)
    scores = LabelerReward(labeler, policy.encoding, 0.0, 1.0).raw(queries, postprocessed)
    return scores.mean().item(), scores.std(unbiased=False).item()


def ceiling_run(experiment: str, seed: int, keep: Path, kind: str, extra: list[str]) -> None:
    """PPO against the labeler itself, with the label-scaling cells' budget, target and horizon."""
    from lm_human_preferences import experiments
    from lm_human_preferences.cli import launch, options
    from lm_human_preferences.utils import distributed

    cell = Cell(experiment, seed, kind)
    # Validation wants one reward source; the labeler is named there for the record (never loaded:
    # train() is given the reward function).
    flags = {"save_dir": str(keep), "run.seed": str(seed), "rewards.adaptive_kl.target": str(TARGET),
             "rewards.adaptive_kl.horizon": str(HORIZON), "rewards.train_new_model": "off",
             "rewards.trained_model": f"mock:{cell.labeler} (the labeler's own score)",
             **options.parse(extra, booleans=set())}
    hp = launch.resolve("train_policy", experiment, cell.name, flags)
    samples = experiments.TRAIN_REWARD[experiment]().normalize_samples
    mean, std = labeler_moments(cell.labeler, hp.task, samples, seed)
    print(f"the {cell.labeler!r} labeler on {samples} initial samples: mean {mean:.3f}, std {std:.3f}", flush=True)
    Path(hp.run.save_dir).mkdir(parents=True, exist_ok=True)
    (Path(hp.run.save_dir) / "ceiling.json").write_text(json.dumps(dict(mean=mean, std=std, samples=samples)))
    reward_fn = LabelerReward(cell.labeler, encodings.get(trained_models.load_initial(hp.task.policy.initial_model)[1]),
                              mean, std)
    def run(h: train_policy.HParams) -> None:
        try:
            train_policy.train(h, reward_fn)
        finally:
            experiments.write_report(h)

    distributed.run(run, (hp,), 1)


# -- measuring a finished cell


def load_policy(folder: Path, task: lm_tasks.TaskHParams) -> Policy:
    return load_model_policy(str(folder), task)


def initial_policy(task: lm_tasks.TaskHParams) -> Policy:
    return load_model_policy(task.policy.initial_model, task)


def ppo_logs(folder: Path) -> dict[str, list[float]]:
    """Per-update KL and kl_coef of a run, from its TensorBoard logs."""
    scalars = report.read_scalars(folder / save_folders.TENSORBOARD / save_folders.PPO_LOG, [], "")
    out = {}
    for tag, key in (("objective/kl", "kl_history"), ("objective/kl_coef", "kl_coef_history"),
                     ("objective/score", "score_history")):
        values = scalars.get(tag, {})
        out[key] = [values[step] for step in sorted(values)]
    return out


@torch.no_grad()
def measure_folder(cell: Cell, keep: Path) -> dict:
    """The final policy judged on the demo's verdict queries and sampling seed (see the module doc)."""
    folder = keep / cell.name
    hp = train_policy.HParams.from_json((folder / save_folders.POLICY_HPARAMS).read_text())
    task = hp.task
    policy, ref = load_policy(folder / save_folders.POLICY, task), initial_policy(task)
    queries = next(lm_tasks.query_batches(task, policy.encoding, verdict.VERDICT_QUERIES, mode="test"))
    out: dict = {"cell": cell.name, "wall_time": float((folder / DONE_FILE).read_text())}
    sampled = {}
    for name, p in (("before", ref), ("after", policy)):
        rollouts = p.respond(queries, task.response_length, torch.Generator(p.device).manual_seed(cell.seed))
        sampled[name] = (rollouts, lm_tasks.postprocess_responses(task, rollouts["responses"], p.encoding.padding_token))
    after_rollouts, after = sampled["after"]
    ref_logprobs = ref.analyze_responses(queries, after_rollouts["responses"], entropies=False)["logprobs"]
    out["kl"] = (after_rollouts["logprobs"] - ref_logprobs).sum(1).mean().item()
    decode = policy.encoding.decode
    texts = {name: [decode(r) for r in post.tolist()] for name, (_, post) in sampled.items()}
    query_texts = [decode(q) for q in queries.tolist()]
    for labeler in (cell.labeler, f"{cell.labeler}_distinct"):
        judge = mock_labelers.get(labeler)
        before = [judge(q, r) for q, r in zip(query_texts, texts["before"])]
        after_scores = [judge(q, r) for q, r in zip(query_texts, texts["after"])]
        suffix = "" if labeler == cell.labeler else "_distinct"
        out["score_before" + suffix] = statistics.mean(before)
        out["score" + suffix] = statistics.mean(after_scores)
        out["win_rate" + suffix] = statistics.mean(1.0 if a > b else 0.5 if a == b else 0.0
                                                   for a, b in zip(after_scores, before))
    out["repeated_words"] = statistics.mean(1 - len(set(mock_labelers.words(t))) / max(1, len(mock_labelers.words(t)))
                                            for t in texts["after"])
    models = {key: f for key, f in (("proxy", keep / cell.sweep_model().name), ("own", folder))
              if (f / save_folders.REWARD_MODEL).exists()}
    for key, model_folder in models.items():
        reward_model = rewards.load_trained(str(model_folder)).eval()
        for name in ("before", "after"):
            scores = reward_model(queries, sampled[name][1])
            out[f"{key}_rm_{name}"] = scores.mean().item()
            out[f"{key}_rm_{name}_std"] = scores.std(unbiased=False).item()
    mock = folder / "mock_summary.json"
    if mock.exists():
        summary = json.loads(mock.read_text())
        out["heldout_accuracy"] = summary["reward_model_heldout_accuracy"]
        out["demo_win_rate"], out["demo_final_kl"] = summary["win_rate"], summary["final_kl"]
    out.update(ppo_logs(folder))
    return out


def kept(cell: Cell, keep: Path) -> bool:
    return (keep / cell.name / DONE_FILE).exists()


def read_record(cell: Cell, record: Path) -> dict:
    path = record / f"{cell.name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(cell: Cell, record: Path, key: str, value) -> None:
    """Set one entry of the cell's record (written whole to a temporary file, then renamed)."""
    entries = read_record(cell, record)
    if entries.get(key) == value:
        return
    record.mkdir(parents=True, exist_ok=True)
    path = record / f"{cell.name}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({**entries, key: value}, indent=1) + "\n")
    partial.replace(path)


def measure(cell: Cell, keep: Path, record: Path) -> dict | None:
    """The cell's measurements: computed once from its kept run (DIR/<cell>/findings.json) and
    recorded, or read from its record when the run is not kept; None if neither."""
    folder = keep / cell.name
    if not kept(cell, keep):
        return read_record(cell, record).get("findings")
    path = folder / MEASURED_FILE
    if not path.exists():
        path.write_text(json.dumps(measure_folder(cell, keep), indent=1))
    hp = json.loads((folder / save_folders.POLICY_HPARAMS).read_text())
    findings = {**json.loads(path.read_text()), "kl_target": (hp["rewards"]["adaptive_kl"] or {}).get("target")}
    write_record(cell, record, "findings", findings)
    return findings


# -- the online overshoot: how strong the reward is, round by round


def checkpoint_names(folder: Path) -> dict[int, str]:
    """step → file name of the checkpoints a model folder kept (the newest few)."""
    return {int(p.stem.split("-")[1]): p.name for p in sorted((folder / "checkpoints").glob("model-*.safetensors"))}


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
    policies, models = checkpoint_names(folder / save_folders.POLICY), checkpoint_names(folder / save_folders.REWARD_MODEL)
    rounds = json.loads((folder / "online_summary.json").read_text()) if (folder / "online_summary.json").exists() else []
    reward_model = rewards.load_trained(str(folder)).eval()
    policy = load_policy(folder / save_folders.POLICY, task)

    def scores(update: int, model_step: int | None) -> tuple[float, float]:
        if model_step is not None:
            reward_model.load_tensors(trained_models.load_file(folder / save_folders.REWARD_MODEL, models[model_step]).tensors)
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
    """reward_strength, computed once from the kept run (DIR/<cell>/reward_strength.json) and
    recorded, or read from the record; None if neither."""
    folder = keep / cell.name
    if not kept(cell, keep):
        return read_record(cell, record).get("reward_strength")
    path = folder / "reward_strength.json"
    if not path.exists():
        path.write_text(json.dumps(reward_strength(cell, keep), indent=1))
    found = json.loads(path.read_text())
    write_record(cell, record, "reward_strength", found)
    return found


def strength_table(keep: Path, record: Path, cells: list[Cell]) -> str:
    header = ["run", "PPO update", "reward model", "mean score of the policy's samples", "their spread (std)",
              "spread on the initial policy's samples", "kl_coef then", "KL (6 updates before)"]
    rows = []
    for cell in cells:
        if cell.kind not in [k for k, _ in ONLINE_KINDS] or cell.seed != min(c.seed for c in cells):
            continue
        found, m = strength(cell, keep, record), measure(cell, keep, record)
        for entry in found or []:
            coef, kl = m["kl_coef_history"], m["kl_history"]
            at = min(entry["update"], len(coef) - 1)
            for key in ("before", "after"):
                if f"{key}_mean" in entry:
                    which = ("round " + str(entry["round"] - (key == "before"))) if "round" in entry else "the one"
                    rows.append([cell.name, str(entry["update"]), which, f"{entry[key + '_mean']:.2f}",
                                 f"{entry[key + '_std']:.2f}", f"{entry[key + '_initial_std']:.2f}", f"{coef[at]:.3f}",
                                 f"{statistics.mean(kl[max(0, at - 5):at + 1]):.2f}"])
    return markdown(header, rows)


# -- tables


def spread(values: list[float], digits: int = 2) -> str:
    """mean (min–max), or the one value, or '–'."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = f"{statistics.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}–{max(values):.{digits}f})"


Results = dict[Cell, dict]


def of(results: Results, experiment: str, kind: str) -> list[dict]:
    return [m for c, m in sorted(results.items(), key=lambda cm: cm[0].seed) if c.experiment == experiment and c.kind == kind]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def targets_of(results: Results, experiment: str, kind: str) -> str:
    targets = {m["kl_target"] for m in of(results, experiment, kind)}
    return ", ".join(f"{t:g}" for t in sorted(targets)) or "–"


def label_table(results: Results, experiments: Iterable[str]) -> str:
    header = ["experiment", "reward", "seeds", "KL target", "labeler's score after", "win rate", "held-out accuracy",
              "final KL", "wall s"]
    rows = []
    for e in experiments:
        for kind, title in [(f"labels-{n}", f"{n} labels") for n in LABEL_COUNTS] + [("ceiling", "labeler itself")]:
            ms = of(results, e, kind)
            rows.append([f"`{e}`", title, str(len(ms)), targets_of(results, e, kind), spread([m["score"] for m in ms]),
                         spread([m["win_rate"] for m in ms], 3), spread([m.get("heldout_accuracy") for m in ms], 3),
                         spread([m["kl"] for m in ms]), spread([m["wall_time"] for m in ms], 0)])
    return markdown(header, rows)


def sweep_kinds(distinct: bool = False) -> list[tuple[str, str]]:
    """(kind, KL target) of the KL sweep on the counting labeler's reward model, or on the saturating one's."""
    prefix = DISTINCT if distinct else ""
    targets = sorted((*(DISTINCT_KL_TARGETS if distinct else KL_TARGETS), TARGET))
    return [(f"{prefix}labels-{SWEEP_LABELS}" if t == TARGET else f"{prefix}kl-{t}", f"{t:g}") for t in targets] + [
        (f"{prefix}kl-off", "off")]


def kl_table(results: Results, experiments: Iterable[str], distinct: bool = False) -> str:
    """The sweep's rows; with `distinct`, the sweep on the saturating labeler's reward model, whose
    true score is the distinct-word score."""
    scores = ["distinct-word score (true)", "counting labeler's score"] if distinct else [
        "labeler's score (true)", "distinct-word score"]
    header = ["experiment", "KL target", "seeds", "final KL", scores[0], "reward model's score (proxy)", scores[1],
              "repeated words", "win rate (true score)"]
    true, other = ("score_distinct", "score") if distinct else ("score", "score_distinct")
    suffix = "_distinct" if distinct else ""
    rows = []
    for e in experiments:
        for kind, title in sweep_kinds(distinct):
            ms = of(results, e, kind)
            rows.append([f"`{e}`", title, str(len(ms)), spread([m["kl"] for m in ms]), spread([m[true] for m in ms]),
                         spread([m.get("proxy_rm_after") for m in ms]), spread([m[other] for m in ms]),
                         spread([m["repeated_words"] for m in ms]), spread([m["win_rate" + suffix] for m in ms], 3)])
    return markdown(header, rows)


ONLINE_KINDS = [(f"labels-{SWEEP_LABELS}", "offline"), ("online-current", "online (`current`)"),
                ("online-current-rescaled", "online (`current`), kl_coef rescaled"),
                ("online-initial", "online (`initial`)"),
                ("online-initial-rescaled", "online (`initial`), kl_coef rescaled")]


def online_table(results: Results, experiments: Iterable[str]) -> str:
    header = ["experiment", "mode", "seeds", "KL target", "final KL", "final kl_coef", "win rate", "labeler's score",
              "held-out accuracy", "own reward model's spread on final samples"]
    rows = []
    for e in experiments:
        for kind, title in ONLINE_KINDS:
            ms = of(results, e, kind)
            rows.append([f"`{e}`", title, str(len(ms)), targets_of(results, e, kind),
                         spread([m["kl"] for m in ms]), spread([m["kl_coef_history"][-1] for m in ms if m["kl_coef_history"]], 3), spread([m["win_rate"] for m in ms], 3),
                         spread([m["score"] for m in ms]), spread([m.get("heldout_accuracy") for m in ms], 3),
                         spread([m.get("own_rm_after_std") for m in ms])])
    return markdown(header, rows)


# -- plots


def band(ax, xs: list[float], groups: list[list[float]], label: str, color: str, marker: str = "o") -> None:
    """Mean line with a min–max band over seeds, at the xs that have values."""
    points = [(x, g) for x, g in zip(xs, groups) if g]
    if not points:
        return
    x = [p[0] for p in points]
    ax.plot(x, [statistics.mean(g) for _, g in points], marker=marker, color=color, label=label)
    ax.fill_between(x, [min(g) for _, g in points], [max(g) for _, g in points], color=color, alpha=0.2)


def errorbars(ax, xs: list[list[float]], ys: list[list[float]], labels: list[str], colors: list[str]) -> None:
    """One point per condition at the means, with min–max bars on both axes."""
    for x, y, label, color in zip(xs, ys, labels, colors):
        if not x:
            continue
        mx, my = statistics.mean(x), statistics.mean(y)
        ax.errorbar([mx], [my], xerr=[[mx - min(x)], [max(x) - mx]], yerr=[[my - min(y)], [max(y) - my]], fmt="o",
                    color=color, label=label, capsize=3)


def figure(n: int, rows: int = 1):
    """pyplot, a figure of n panels in `rows` rows, and its axes in reading order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = -(-n // rows)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4 * rows), squeeze=False)
    return plt, fig, list(axes.flat)


def plot_labels(results: Results, experiments: list[str], path: Path) -> None:
    plt, fig, axes = figure(len(experiments))
    for ax, e in zip(axes, experiments):
        groups = [[m["score"] for m in of(results, e, f"labels-{n}")] for n in LABEL_COUNTS]
        kls = [m["kl"] for n in LABEL_COUNTS for m in of(results, e, f"labels-{n}")]
        band(ax, list(LABEL_COUNTS), groups, "reward model from N labels" + (
            f" (final KL {min(kls):.1f}–{max(kls):.1f})" if kls else ""), "C0")
        ms = of(results, e, "ceiling")
        if ms:
            scores, kl = [m["score"] for m in ms], statistics.mean(m["kl"] for m in ms)
            ax.axhline(statistics.mean(scores), color="C3", label=f"PPO on the labeler's score (final KL {kl:.1f})")
            ax.axhspan(min(scores), max(scores), color="C3", alpha=0.15)
        before = [m["score_before"] for ms in ([m for m in of(results, e, f"labels-{n}")] for n in LABEL_COUNTS)
                  for m in ms]
        if before:
            ax.axhline(statistics.mean(before), color="grey", linestyle=":", label="initial policy")
        ax.set(xscale="log", xlabel="training labels", ylabel="labeler's score after PPO", title=e)
        ax.set_xticks(list(LABEL_COUNTS), [str(n) for n in LABEL_COUNTS])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def labeler_scales(record: Path, experiments: list[str]) -> dict[str, float]:
    """Each labeler's (and its distinct variant's) std on 256 of the initial policy's samples (seed 0),
    computed once (RECORD/labeler_scales.json): the unit the KL plot puts true scores in."""
    from lm_human_preferences import experiments as named

    record.mkdir(parents=True, exist_ok=True)
    path = record / "labeler_scales.json"
    scales = json.loads(path.read_text()) if path.exists() else {}
    for e in experiments:
        labeler = e.removeprefix("mock_")
        for name in (labeler, f"{labeler}_distinct"):
            if name not in scales:
                scales[name] = labeler_moments(name, named.get("train_policy", e).task, verdict.VERDICT_QUERIES, 0)[1]
    path.write_text(json.dumps(scales, indent=1))
    return scales


def plot_kl(results: Results, experiments: list[str], path: Path, scales: dict[str, float]) -> None:
    """Gains over the initial policy in units of the initial policy's spread, so that the labeler's
    score and the reward model's (normalized to std 1 there) share an axis. A second row of panels
    for the sweep on the saturating labeler's reward model, once any of it has finished."""
    distinct_rows = [True] if any(c.distinct for c in results) else []
    plt, fig, axes = figure(len(experiments) * (1 + len(distinct_rows)), rows=1 + len(distinct_rows))
    panels = [(e, distinct) for distinct in [False, *distinct_rows] for e in experiments]
    for ax, (e, distinct) in zip(axes, panels):
        labeler = e.removeprefix("mock_")
        per = [of(results, e, kind) for kind, _ in sweep_kinds(distinct)]
        xs = [statistics.mean([m["kl"] for m in ms]) if ms else None for ms in per]
        have = [(x, ms) for x, ms in zip(xs, per) if ms]
        counting = (lambda m: (m["score"] - m["score_before"]) / scales[labeler], "counting labeler's score", "C0")
        saturating = (lambda m: (m["score_distinct"] - m["score_before_distinct"]) / scales[f"{labeler}_distinct"],
                      "distinct-word score (saturating)", "C2")
        proxy = (lambda m: m["proxy_rm_after"] - m["proxy_rm_before"] if "proxy_rm_after" in m else None,
                 "its 2,048-label reward model's score (proxy)", "C1")
        true, other = (saturating, counting) if distinct else (counting, saturating)
        gains: list[tuple[Callable[[dict], float | None], str, str]] = [
            (true[0], true[1].replace(" (saturating)", "") + " (true)", true[2]), proxy, other]
        for gain, label, color in gains:
            points = [(x, [(m["kl"], gain(m)) for m in ms if gain(m) is not None]) for x, ms in have]
            points = [(x, ps) for x, ps in points if ps]
            band(ax, [x for x, _ in points], [[g for _, g in ps] for _, ps in points], label, color)
            for _, ps in points:
                ax.scatter([k for k, _ in ps], [g for _, g in ps], color=color, s=8, alpha=0.6)
        ax.set(xscale="log", xlabel="final KL from the initial policy (nats)",
               ylabel="gain over the initial policy (its std = 1)",
               title=f"{e}, {'saturating' if distinct else 'counting'} labeler's labels\n"
                     f"KL targets {', '.join(t for _, t in sweep_kinds(distinct))}")
        ticks = [t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200) if have and min(x for x, _ in have) / 2 <= t
                 <= max(x for x, _ in have) * 2]
        ax.minorticks_off()
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_online(results: Results, experiments: list[str], path: Path) -> None:
    """Per experiment, the labeler's score against the final KL of each mode (mean, min–max over
    seeds; the band is the offline runs' final KL ± 10%); then KL and kl_coef during PPO (first seed)."""
    plt, fig, axes = figure(len(experiments) + 2, rows=2)
    colors = ["C0", "C1", "C4", "C2", "C5", "C3"]
    labels = [t.replace("`", "") for _, t in ONLINE_KINDS]
    for ax, e in zip(axes, experiments):
        per = [of(results, e, kind) for kind, _ in ONLINE_KINDS]
        errorbars(ax, [[m["kl"] for m in ms] for ms in per], [[m["score"] for m in ms] for ms in per], labels, colors)
        if per[0]:
            offline = statistics.mean(m["kl"] for m in per[0])
            ax.axvspan(offline * 0.9, offline * 1.1, color="grey", alpha=0.15, label="offline final KL ± 10%")
        ax.set(xlabel="final KL (nats)", ylabel="labeler's score after PPO", title=e)
        ax.legend(fontsize=7)
    for ax, key, ylabel, title in ((axes[-2], "kl_history", "KL of the update's batch", "KL"),
                                   (axes[-1], "kl_coef_history", "kl_coef", "kl_coef")):
        for (kind, _), label, color in zip(ONLINE_KINDS, labels, colors):
            for e, style in zip(experiments, ("-", "--")):
                for m in of(results, e, kind)[:1]:
                    ax.plot(range(len(m[key])), m[key], style, color=color, alpha=0.8,
                            label=f"{label}, {e.removeprefix('mock_')}")
        ax.set(xlabel="PPO update", ylabel=ylabel, title=f"{title} during PPO (first seed)")
        ax.legend(fontsize=6)
    axes[-2].axhline(TARGET, color="grey", linestyle=":")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_all(keep: Path, record: Path, cells: list[Cell], experiments: list[str], docs: Path) -> None:
    results: Results = {}
    for cell in cells:
        m = measure(cell, keep, record)
        if m is not None:
            results[cell] = m
    missing = [c.name for c in cells if c not in results]
    text = "\n\n".join([
        f"Recorded in {record}, runs kept in {keep}; {len(results)} of {len(cells)} cells finished.",
        "### Label scaling\n\n" + label_table(results, experiments),
        "### KL trade-off\n\n" + kl_table(results, experiments),
        "### KL trade-off, reward model from the saturating labeler\n\n" + kl_table(results, experiments, True),
        "### Online against offline\n\n" + online_table(results, experiments),
        "### The reward's strength, round by round (first seed)\n\n" + strength_table(keep, record, cells),
        "Missing cells: " + (", ".join(missing) or "none")])
    print(text)
    (record / "tables.md").write_text(text + "\n")
    docs.mkdir(parents=True, exist_ok=True)
    plot_labels(results, experiments, docs / "paper_label_scaling.png")
    plot_kl(results, experiments, docs / "paper_kl_tradeoff.png", labeler_scales(record, experiments))
    plot_online(results, experiments, docs / "paper_online_kl.png")
    print(f"plots: {', '.join(str(docs / n) for n in ('paper_label_scaling.png', 'paper_kl_tradeoff.png', 'paper_online_kl.png'))}")


# -- main


def to_run(cells: list[Cell], keep: Path, record: Path) -> list[Cell]:
    """The cells neither kept nor recorded, in grid order; before a KL-sweep cell, its reward
    model's cell if that is not kept (recorded only), since the sweep loads its weights."""
    todo: list[Cell] = []
    for cell in cells:
        if kept(cell, keep) or "findings" in read_record(cell, record):
            continue
        model = cell.sweep_model()
        if cell.kind.removeprefix(DISTINCT).startswith("kl-") and not kept(model, keep) and model not in todo:
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
        estimate = f"{left} cells left, about {left * statistics.mean(walls) / 60:.0f} min at {statistics.mean(walls):.0f} s a cell"
        try:
            m = measure(cell, keep, record)
        except Exception as error:  # the run is kept: --report-only measures it again
            print(f"{cell.name}: {wall:.0f} s; measuring it failed ({error!r}); {estimate}", flush=True)
            continue
        print(f"{cell.name}: {wall:.0f} s; score {m['score_before']:.2f} → {m['score']:.2f}, win rate "
              f"{m['win_rate']:.3f}, KL {m['kl']:.2f}; {estimate}", flush=True)


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
