"""bench/findings/: a cell's kind as a typed value and its name, parsed back in one place; the cells'
records in the repository read back; a record's entries set one at a time."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not installed
    sys.path.insert(0, str(ROOT))

from bench.findings import cells, records  # noqa: E402
from bench.findings.cells import Ceiling, Cell, KLSweep, Labels, Online  # noqa: E402

RECORDED = ROOT / "bench" / "results" / "paper_findings"


@pytest.mark.parametrize("name, kind", [
    ("labels-256", Labels(256)), ("distinct-labels-2048", Labels(2048, distinct=True)), ("ceiling", Ceiling()),
    ("kl-1.5", KLSweep(1.5)), ("kl-24.0", KLSweep(24.0)), ("kl-off", KLSweep(None)),
    ("distinct-kl-24.0", KLSweep(24.0, distinct=True)), ("distinct-kl-off", KLSweep(None, distinct=True)),
    ("online-current", Online("current")), ("online-initial-rescaled", Online("initial", rescaled=True))])
def test_a_kind_is_parsed_from_its_name_and_spelled_back(name, kind):
    assert cells.parse_kind(name) == kind and kind.name == name
    cell = Cell("mock_sentiment", 4, name)
    assert cell.spec == kind and Cell.of("mock_sentiment", 4, kind) == cell
    assert Cell.from_name(f"mock_sentiment-s4-{name}") == cell and cell.name == f"mock_sentiment-s4-{name}"


def test_every_kind_of_the_grid_round_trips():
    for name in cells.KINDS:
        assert cells.parse_kind(name).name == name
    assert len(set(cells.KINDS)) == len(cells.KINDS)


@pytest.mark.parametrize("name", ["kl-24", "kl-", "labels-0256", "labels-", "distinct-ceiling", "online-both",
                                  "distinct-online-current", "online-current-rescaled-rescaled", "Labels-256", ""])
def test_a_name_no_kind_spells_is_refused(name):
    with pytest.raises(ValueError, match="unknown cell kind"):
        cells.parse_kind(name)
    with pytest.raises(ValueError, match="unknown cell kind"):
        Cell("mock_sentiment", 0, name)


def test_a_name_without_experiment_and_seed_is_refused():
    with pytest.raises(ValueError, match="is not a cell's name"):
        Cell.from_name("labels-256")


def test_the_sweep_model_is_the_same_labelers_2048_label_cell():
    assert Cell("mock_sentiment", 2, "distinct-kl-off").sweep_model() == Cell.of("mock_sentiment", 2,
                                                                                 Labels(2048, distinct=True))
    assert Cell("mock_sentiment", 2, "kl-1.5").loads_sweep_model
    assert not Cell("mock_sentiment", 2, "labels-2048").loads_sweep_model
    assert not Cell("mock_sentiment", 2, "ceiling").distinct


def test_every_record_in_the_repository_is_a_cell_of_the_grid():
    names = [p.stem for p in RECORDED.glob("*.json") if p.name != records.LABELER_SCALES_FILE]
    assert len(names) >= 100
    for name in names:
        cell = Cell.from_name(name)
        assert cell.name == name and cell.kind in cells.KINDS and cell.experiment in cells.EXPERIMENTS
        found = records.read_record(cell, RECORDED)
        assert found["findings"]["cell"] == name


def test_a_record_keeps_its_other_entries_and_is_not_rewritten_when_unchanged(tmp_path):
    cell = Cell("mock_sentiment", 0, "online-initial")
    assert records.read_record(cell, tmp_path) == {}
    records.write_record(cell, tmp_path, "findings", {"score": 1.0})
    records.write_record(cell, tmp_path, "reward_strength", [{"update": 3}])
    path = tmp_path / f"{cell.name}.json"
    assert json.loads(path.read_text()) == {"findings": {"score": 1.0}, "reward_strength": [{"update": 3}]}
    assert path.read_text().endswith("}\n")
    inode = os.stat(path).st_ino
    records.write_record(cell, tmp_path, "findings", {"score": 1.0})
    assert os.stat(path).st_ino == inode  # the same value: the file is left alone
    records.write_record(cell, tmp_path, "findings", {"score": 2.0})
    assert records.read_record(cell, tmp_path)["findings"] == {"score": 2.0}


def test_a_cell_is_kept_once_its_run_finished(tmp_path):
    cell = Cell("mock_descriptiveness", 1, "kl-off")
    (tmp_path / cell.name).mkdir()
    assert not records.kept(cell, tmp_path)
    (tmp_path / cell.name / records.DONE_FILE).write_text("12.5")
    assert records.kept(cell, tmp_path)
