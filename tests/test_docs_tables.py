"""The docs' tables are what bench/docs_tables.py makes from the records in bench/results/: none
has drifted from its record, each names its machine and commit, and a changed record shows."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "bench" / "docs_tables.py")
docs_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_tables)


def test_every_table_matches_its_records():
    assert docs_tables.stale() == [], "run python bench/docs_tables.py"


def test_every_table_names_its_machine_commit_and_command():
    regions = [m for path in docs_tables.documents() for m in docs_tables.REGION.finditer(path.read_text())]
    assert len(regions) >= 12
    for region in regions:
        body = region.group("body")
        assert re.search(r"Measured with `python bench/\w+\.py[^`]*` on .+, torch .+, commit `[^`]+`, \d{4}-\d\d-\d\d",
                         body), region.group("spec")
        assert "|---|" in body


def test_every_record_has_its_provenance():
    for path in sorted(docs_tables.RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        assert {"bench", "command", "provenance", "results"} <= set(record), path.name
        assert {"machine", "torch", "commit", "date", "threads"} <= set(record["provenance"]), path.name


def test_a_changed_record_makes_its_table_stale(tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(docs_tables.RESULTS, results)
    monkeypatch.setattr(docs_tables, "RESULTS", results)
    record = json.loads((results / "labels_round_trip.json").read_text())
    record["results"]["models"][0]["pairwise_accuracy"] = 0.5
    (results / "labels_round_trip.json").write_text(json.dumps(record))
    assert docs_tables.stale() == ["docs/interchange.md"]
    text = (ROOT / "docs" / "interchange.md").read_text()
    assert "| 0.500 |" in docs_tables.rewrite(text) and "| 0.500 |" not in text


def test_a_record_written_by_a_bench_renders(tmp_path, monkeypatch):
    """The renderers read what the benches write (per-run values), not only transcribed summaries."""
    monkeypatch.setattr(docs_tables, "RESULTS", tmp_path)
    runs = [dict(seed=s, reward_model_heldout_accuracy=0.8 + s / 100, win_rate=0.9, true_score_before=0.1,
                 true_score_after=1.5 + s, final_kl=6.0, wall_time=100.0 + s) for s in range(3)]
    provenance = dict(machine=dict(kind="cuda", gpu="NVIDIA H100", gpus=1, cuda="12.8"), torch="2.13.0",
                      commit="0123456789ab", date="2026-12-08T00:00:00Z", threads=16)
    (tmp_path / "demo.json").write_text(json.dumps(dict(bench="mock_demo", command="python bench/mock_demo.py",
                                                        provenance=provenance, results=dict(runs={"x": runs}))))
    text = docs_tables.render("demo demo.json")
    assert "1× NVIDIA H100 (CUDA 12.8), torch 2.13.0, 16 threads, commit `0123456789ab`" in text
    assert "| `x` | mean | 0.810 | 0.900 | 0.10 → 2.50 | 6.00 | 101 s |" in text
    assert "|  | max | 0.820 | 0.900 | 0.10 → 3.50 | 6.00 | 102 s |" in text


@pytest.mark.parametrize("spec, message", [
    ("nonesuch demo.json", "unknown table kind"),
    ("demo missing.json", "no record"),
    ("demo", "names no record"),
])
def test_bad_regions_are_named(spec, message):
    with pytest.raises(docs_tables.TableError, match=message):
        docs_tables.render(spec)
