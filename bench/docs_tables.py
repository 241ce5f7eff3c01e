#!/usr/bin/env python3
"""The docs' tables, made from the benches' records, so that a table cannot drift from its source.

    python bench/docs_tables.py            # rewrite every table region of README.md and docs/*.md
    python bench/docs_tables.py --check    # only list the regions that differ (tests/test_docs_tables.py)

A region is

    <!-- table:KIND RECORD [RECORD ...] [key=value ...] -->
    ...generated text...
    <!-- /table -->

KIND is one of RENDERERS below; each RECORD is a file of bench/results/ as a bench's `--out`
writes it (bench/common.py: {bench, command, provenance, results}). The text says where every
figure comes from — the machine, torch version, threads, commit, date and command of its
record — then gives the table. Records of figures measured before the benches wrote records
were transcribed from the README of their time, with the provenance it stated ("unknown" where
it stated none) and a `note` saying so.
"""

import argparse
import json
import re
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lm_human_preferences.utils.storage import atomic_write_text  # noqa: E402

RESULTS = ROOT / "bench" / "results"
REGION = re.compile(r"(<!-- table:(?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


class TableError(Exception):
    """A region names a kind, record or option that does not exist."""


def load(name: str) -> dict:
    path = RESULTS / name
    if not path.is_file():
        raise TableError(f"no record {path.relative_to(ROOT)}")
    return json.loads(path.read_text())


def machine_text(machine: dict | str) -> str:
    if isinstance(machine, str):
        return machine
    if machine.get("kind") == "cuda":
        return f"{machine['gpus']}× {machine['gpu']} (CUDA {machine['cuda']})"
    bf16 = "native bf16" if machine["native_bf16"] else "no native bf16"
    return f"{machine['cores']} cores of an {machine['cpu']} ({machine['capability']}, {bf16})"


def source(record: dict) -> str:
    """One line: what measured the record, where and when."""
    p = record["provenance"]
    threads = (f"{p['threads']} thread" + "s" * (p["threads"] != 1)) if isinstance(p["threads"], int) \
        else "threads not recorded"
    line = (f"Measured with `{record['command']}` on {machine_text(p['machine'])}, torch {p['torch']}, {threads}, "
            f"commit `{p['commit']}`, {p['date']}.")
    return line + (f" {record['note']}" if record.get("note") else "")


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def summaries(results: dict, group: str) -> dict[str, dict[str, dict[str, float]]]:
    """{name: {"mean"|"min"|"max": {column: value}}}: from the per-run values where the record
    holds them (`runs`), else as transcribed (`summary`)."""
    if "runs" in results:
        out = {}
        for name, runs in results["runs"].items():
            keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and k != "seed"]
            out[name] = {label: {k: stat([r[k] for r in runs]) for k in keys}
                         for label, stat in (("mean", statistics.mean), ("min", min), ("max", max))}
        return out
    if "summary" not in results:
        raise TableError(f"a {group} record needs `runs` or `summary`")
    return results["summary"]


def demo(records: list[dict]) -> str:
    """The offline demo over seeds (bench/mock_demo.py): mean, min and max per experiment."""
    header = ["experiment", "", "held-out accuracy", "win rate", "labeler's score before → after",
              "final KL (target 6)", "wall time"]
    blocks = []
    for record in records:
        rows = []
        for experiment, stats in summaries(record["results"], "demo").items():
            for label in ("mean", "min", "max"):
                s = stats.get(label)
                if s is None:
                    continue
                rows.append([f"`{experiment}`" if label == "mean" else "", label,
                             f"{s['reward_model_heldout_accuracy']:.3f}", f"{s['win_rate']:.3f}",
                             f"{s['true_score_before']:.2f} → {s['true_score_after']:.2f}".replace("-", "−"),
                             f"{s['final_kl']:.2f}", "–" if s.get("wall_time") is None else f"{s['wall_time']:.0f} s"])
        blocks.append(source(record) + "\n\n" + markdown(header, rows))
    return "\n\n".join(blocks)


def spread(stats: dict, key: str, digits: int, unit: str = "") -> str:
    mean, low, high = (stats[label][key] for label in ("mean", "min", "max"))
    digits = 1 if key == "final_kl" and mean >= 10 else digits
    return f"{mean:.{digits}f}{unit} ({low:.{digits}f}–{high:.{digits}f})"


def online(records: list[dict]) -> str:
    """Offline against online label collection (bench/online_vs_offline.py), one record an experiment."""
    header = ["experiment", "mode", "accuracy on the final policy's samples", "held-out accuracy", "win rate",
              "score after", "final KL (target 6)", "wall time"]
    rows, sources = [], []
    for record in records:
        sources.append(f"`{record['results']['experiment']}`: " + source(record))
        for i, (mode, stats) in enumerate(summaries(record["results"], "online").items()):
            rows.append([f"`{record['results']['experiment']}`" if i == 0 else "", mode,
                         spread(stats, "final_policy_accuracy", 3), spread(stats, "reward_model_heldout_accuracy", 3),
                         spread(stats, "win_rate", 3), spread(stats, "true_score_after", 2),
                         spread(stats, "final_kl", 2), spread(stats, "wall_time", 0, " s")])
    return "\n".join(f"- {s}" for s in sources) + "\n\n" + markdown(header, rows)


def label_app(records: list[dict]) -> str:
    """The labeling app under load (bench/label_app_load.py): per answer, against the answers already in the queue."""
    def ms(value: float | None) -> str:
        if value is None:
            return "–"
        return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.{1 if value < 10 else 0}f} ms"

    blocks = []
    for record in records:
        rows = [[f"{r['k']:,}", ms(r["p50"]), ms(r.get("p99")), f"{r['rate']:.{1 if r['rate'] < 100 else 0}f}"] for r in record["results"]["runs"]]
        blocks.append(source(record) + "\n\n" + markdown(
            ["K answered before", "median per answer", "p99 per answer", "answers/s"], rows))
    return "\n\n".join(blocks)


def round_trip(records: list[dict]) -> str:
    """Labels → text pairs → labels (bench/labels_round_trip.py): reward models on the held-out questions."""
    blocks = []
    for record in records:
        res = record["results"]
        rows = [[m["model"], str(m["updates"]), f"{m['saved_heldout_accuracy']:.3f} ({m['saved_heldout_count']:,})",
                 f"{m['best_of_n_accuracy']:.3f}", f"{m['pairwise_accuracy']:.3f}"] for m in res["models"]]
        blocks.append(source(record) + f" {res['training_questions']:,} training questions, "
                      f"{res['heldout_questions']:,} held out; {res['changed_pairs']} of {res['pairs']:,} pairs came "
                      "back by their text with other tokens.\n\n" + markdown(
                          ["reward model", "updates", "held-out accuracy its run saved (records)",
                           "best-of-4 accuracy", "pairwise accuracy"], rows))
    return "\n\n".join(blocks)


def roofline(records: list[dict]) -> str:
    """bench/roofline.py: measured time against the floor per phase; one column per record (run)."""
    phases: list[str] = []
    for record in records:
        phases += [p["phase"] for p in record["results"]["phases"] if p["phase"] not in phases]

    def cell(record: dict, phase: str) -> str:
        p = next((p for p in record["results"]["phases"] if p["phase"] == phase), None)
        if p is None:
            return "–"
        # A transcribed record keeps the ratio the bench printed from its unrounded times.
        ratio = p.get("ratio") or (p["measured_s"] / p["floor_s"] if p.get("measured_s") and p.get("floor_s") else None)
        if p.get("measured_s") is None:
            return f"{ratio:.2f}×"
        if ratio is None:
            return f"{p['measured_s']:.2f} s"
        return f"{p['measured_s']:.2f} / {p['floor_s']:.2f} s = {ratio:.2f}×"

    header = ["phase"] + [f"run {i + 1}: measured / floor" if len(records) > 1 else "measured / floor"
                          for i in range(len(records))]
    rows = [[phase] + [cell(record, phase) for record in records] for phase in phases]
    sources = [f"- Run {i + 1}: " + source(r) if len(records) > 1 else source(r) for i, r in enumerate(records)]
    return "\n".join(sources) + "\n\n" + markdown(header, rows)


def model_sizes(records: list[dict]) -> str:
    """bench/model_sizes.py: peak memory of a PPO update and a reward-model step per GPT-2 size."""
    blocks = []
    for record in records:
        runs = record["results"]["runs"]
        sizes = list(dict.fromkeys(r["size"] for r in runs))

        def cell(size: str, phase: str, checkpointing: str) -> str:
            r = next((r for r in runs if (r["size"], r["phase"], r["checkpointing"]) == (size, phase, checkpointing)),
                     None)
            if r is None:
                return "–"
            if r.get("failed"):
                return r["failed"]
            peak = r.get("peak_gpu_gib", r.get("peak_rss_gib"))
            return f"{peak:.2f} GiB" + (f" ({r['seconds']:.0f} s)" if r.get("show_seconds") else "")

        rows = [[size] + [cell(size, phase, ckpt) for phase in ("ppo", "reward") for ckpt in ("off", "on")]
                for size in sizes]
        kind = "peak GPU memory" if "peak_gpu_gib" in runs[0] else "peak RSS"
        blocks.append(source(record) + "\n\n" + markdown(
            ["model", f"PPO update, {kind}", "with `run.gradient_checkpointing on`", "reward step",
             "with checkpointing"], rows))
    return "\n\n".join(blocks)


def findings(records: list[dict], section: str = "") -> str:
    """A section of the findings grid's tables (bench/paper_findings.py --report-only writes them from
    bench/results/paper_findings/), with the grid's provenance."""
    record = records[0]
    text = (ROOT / record["results"]["tables"]).read_text()
    match = re.search(rf"^### {re.escape(section)}\n(.*?)(?=^### |\Z)", text, re.S | re.M)
    if not section or match is None:
        raise TableError(f"no section '### {section}' in {record['results']['tables']}")
    table = "\n".join(line for line in match.group(1).splitlines() if line.startswith("|"))
    return source(record) + "\n\n" + table


RENDERERS: dict[str, Callable[..., str]] = dict(demo=demo, online=online, label_app=label_app, round_trip=round_trip,
                                                roofline=roofline, model_sizes=model_sizes, findings=findings)


def render(spec: str) -> str:
    kind, *args = shlex.split(spec)
    if kind not in RENDERERS:
        raise TableError(f"unknown table kind {kind!r}; known: {', '.join(RENDERERS)}")
    options = dict(a.split("=", 1) for a in args if "=" in a)
    records = [load(a) for a in args if "=" not in a]
    if not records:
        raise TableError(f"table:{spec} names no record")
    return RENDERERS[kind](records, **options) + "\n"


def rewrite(text: str) -> str:
    return REGION.sub(lambda m: m.group(1) + render(m.group("spec")) + m.group(4), text)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def stale() -> list[str]:
    """The documents whose table regions differ from what their records give."""
    return [str(path.relative_to(ROOT)) for path in documents() if rewrite(path.read_text()) != path.read_text()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its records")
    args = parser.parse_args()
    try:
        changed = stale()
        if args.check:
            if changed:
                sys.exit(f"tables out of date in {', '.join(changed)}: run python bench/docs_tables.py")
            print("every table matches its records")
            return
        for name in changed:
            path = ROOT / name
            atomic_write_text(path, rewrite(path.read_text()))
            print(f"rewrote {name}")
    except TableError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
