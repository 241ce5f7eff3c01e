"""The report: every cell's measurements (measured now if kept and not measured yet), the tables
(stdout and RECORD/tables.md) and the plots (docs/paper_*.png)."""

import json
from pathlib import Path

from lm_human_preferences.evaluation import verdict
from lm_human_preferences.utils import storage

from . import plots, tables
from .cells import ONLINE_KINDS, Cell
from .ceiling import labeler_moments
from .measurement import measure, strength
from .records import LABELER_SCALES_FILE, TABLES_FILE, write_json

PLOTS = ("paper_label_scaling.png", "paper_kl_tradeoff.png", "paper_online_kl.png")


def labeler_scales(record: Path, experiments: list[str]) -> dict[str, float]:
    """Each labeler's (and its distinct variant's) std on 256 of the initial policy's samples (seed 0),
    computed once (RECORD/labeler_scales.json): the unit the KL plot puts true scores in."""
    from lm_human_preferences import experiments as named

    path = record / LABELER_SCALES_FILE
    scales = json.loads(path.read_text()) if path.exists() else {}
    for e in experiments:
        labeler = e.removeprefix("mock_")
        for name in (labeler, f"{labeler}_distinct"):
            if name not in scales:
                scales[name] = labeler_moments(name, named.get("train_policy", e).task, verdict.VERDICT_QUERIES, 0)[1]
    write_json(path, scales)
    return scales


def report_all(keep: Path, record: Path, cells: list[Cell], experiments: list[str], docs: Path) -> None:
    results: tables.Results = {}
    for cell in cells:
        m = measure(cell, keep, record)
        if m is not None:
            results[cell] = m
    first_seed = min(c.seed for c in cells)
    online = [c for c in cells if c.kind in [k for k, _ in ONLINE_KINDS] and c.seed == first_seed]
    strengths = {c: found for c in online if (found := strength(c, keep, record))}
    missing = [c.name for c in cells if c not in results]
    text = "\n\n".join([
        f"Recorded in {record}, runs kept in {keep}; {len(results)} of {len(cells)} cells finished.",
        "### Label scaling\n\n" + tables.label_table(results, experiments),
        "### KL trade-off\n\n" + tables.kl_table(results, experiments),
        "### KL trade-off, reward model from the saturating labeler\n\n" + tables.kl_table(results, experiments, True),
        "### Online against offline\n\n" + tables.online_table(results, experiments),
        "### The reward's strength, round by round (first seed)\n\n" + tables.strength_table(strengths, results),
        "Missing cells: " + (", ".join(missing) or "none")])
    print(text)
    storage.atomic_write_text(record / TABLES_FILE, text + "\n")
    docs.mkdir(parents=True, exist_ok=True)
    plots.plot_labels(results, experiments, docs / PLOTS[0])
    plots.plot_kl(results, experiments, docs / PLOTS[1], labeler_scales(record, experiments))
    plots.plot_online(results, experiments, docs / PLOTS[2])
    print(f"plots: {', '.join(str(docs / n) for n in PLOTS)}")
