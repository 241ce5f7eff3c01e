"""The findings' tables (markdown), from the cells' measurements."""

import statistics
from collections.abc import Iterable

from .cells import LABEL_COUNTS, ONLINE_KINDS, Ceiling, Cell, Labels, sweep_kinds

Results = dict[Cell, dict]  # a finished cell's measurements (measurement.measure)


def spread(values: list[float], digits: int = 2) -> str:
    """mean (min–max), or the one value, or '–'."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = f"{statistics.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def of(results: Results, experiment: str, kind: str) -> list[dict]:
    """The measurements of an experiment's cells of one kind, seed by seed."""
    return [m for c, m in sorted(results.items(), key=lambda cm: cm[0].seed)
            if c.experiment == experiment and c.kind == kind]


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
        for kind, title in [(Labels(n).name, f"{n} labels") for n in LABEL_COUNTS] + [(Ceiling.name, "labeler itself")]:
            ms = of(results, e, kind)
            rows.append([f"`{e}`", title, str(len(ms)), targets_of(results, e, kind), spread([m["score"] for m in ms]),
                         spread([m["win_rate"] for m in ms], 3), spread([m.get("heldout_accuracy") for m in ms], 3),
                         spread([m["kl"] for m in ms]), spread([m["wall_time"] for m in ms], 0)])
    return markdown(header, rows)


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


def online_table(results: Results, experiments: Iterable[str]) -> str:
    header = ["experiment", "mode", "seeds", "KL target", "final KL", "final kl_coef", "win rate", "labeler's score",
              "held-out accuracy", "own reward model's spread on final samples"]
    rows = []
    for e in experiments:
        for kind, title in ONLINE_KINDS:
            ms = of(results, e, kind)
            rows.append([f"`{e}`", title, str(len(ms)), targets_of(results, e, kind), spread([m["kl"] for m in ms]),
                         spread([m["kl_coef_history"][-1] for m in ms if m["kl_coef_history"]], 3),
                         spread([m["win_rate"] for m in ms], 3), spread([m["score"] for m in ms]),
                         spread([m.get("heldout_accuracy") for m in ms], 3),
                         spread([m.get("own_rm_after_std") for m in ms])])
    return markdown(header, rows)


def strength_table(strengths: dict[Cell, list[dict]], results: Results) -> str:
    """The online cells' reward strength round by round (measurement.reward_strength), with kl_coef
    and the KL of the updates before."""
    header = ["run", "PPO update", "reward model", "mean score of the policy's samples", "their spread (std)",
              "spread on the initial policy's samples", "kl_coef then", "KL (6 updates before)"]
    rows = []
    for cell, found in strengths.items():
        m = results.get(cell)
        for entry in found:
            coef, kl = m["kl_coef_history"], m["kl_history"]
            at = min(entry["update"], len(coef) - 1)
            for key in ("before", "after"):
                if f"{key}_mean" in entry:
                    which = ("round " + str(entry["round"] - (key == "before"))) if "round" in entry else "the one"
                    rows.append([cell.name, str(entry["update"]), which, f"{entry[key + '_mean']:.2f}",
                                 f"{entry[key + '_std']:.2f}", f"{entry[key + '_initial_std']:.2f}", f"{coef[at]:.3f}",
                                 f"{statistics.mean(kl[max(0, at - 5):at + 1]):.2f}"])
    return markdown(header, rows)
