"""bench/paper_findings.py's bookkeeping (bench/findings/): the grid's order, each cell's flags, kept cells
read back into tables and plots, and the ceiling's reward function. No learning is asserted here."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from lm_human_preferences.cli import launch, options
from lm_human_preferences.labeling import mock_labelers
from lm_human_preferences.language import encodings, trained_models

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    """The bench's package, bench/findings/ (bench/ is not installed: the repository's root goes on sys.path)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bench.findings")


def test_the_grid_runs_seed_by_seed_and_each_sweep_after_its_reward_model(bench):
    cells = bench.grid([0, 1], bench.EXPERIMENTS)
    assert len(cells) == len(set(cells)) == 2 * len(bench.EXPERIMENTS) * len(bench.KINDS)
    seeds = [c.seed for c in cells]
    assert seeds == sorted(seeds)
    for i, cell in enumerate(cells):
        if cell.kind.removeprefix(bench.DISTINCT).startswith("kl-"):
            assert cell.sweep_model() in cells[:i] and cell.sweep_model().distinct == cell.distinct
    assert bench.grid([3], ["mock_sentiment"], ["kl-off"]) == [bench.Cell("mock_sentiment", 3, "kl-off")]


@pytest.mark.parametrize("kind", ["labels-256", "kl-1.5", "kl-off", "online-current", "online-initial",
                                  "online-initial-rescaled", "online-current-rescaled", "distinct-labels-2048",
                                  "distinct-kl-24.0"])
def test_every_cell_resolves_to_valid_hparams(bench, kind, tmp_path):
    cell = bench.Cell("mock_descriptiveness", 2, kind)
    hp = launch.resolve("train_policy", cell.experiment, cell.name, options.parse(bench.launch_flags(cell, tmp_path),
                                                                                  set()))
    assert hp.run.seed == 2 and hp.run.save_dir == str(tmp_path / cell.name)
    if kind.endswith("kl-off"):
        assert hp.rewards.adaptive_kl is None and hp.rewards.kl_coef == 0
    else:
        assert hp.rewards.adaptive_kl.horizon == bench.HORIZON
    if "kl-" in kind:
        assert hp.rewards.train_new_model is None
        assert hp.rewards.trained_model == str(tmp_path / cell.sweep_model().name)
    if kind == "distinct-kl-24.0":
        assert cell.sweep_model().name == "mock_descriptiveness-s2-distinct-labels-2048"
        assert hp.rewards.adaptive_kl.target == 24.0
    if kind.startswith("labels") or kind.startswith("distinct-labels"):
        assert hp.rewards.train_new_model.labels.source == (
            "mock:descriptiveness_distinct" if kind.startswith("distinct") else "mock:descriptiveness")
    if kind == "kl-1.5":
        assert hp.rewards.adaptive_kl.target == 1.5
    if kind.startswith("online"):
        assert hp.rewards.online.normalize_on == kind.split("-")[1]
        assert hp.rewards.online.rescale_kl_coef == kind.endswith("-rescaled")
        assert hp.rewards.adaptive_kl.target == bench.TARGET
    if kind == "labels-256":
        assert hp.rewards.train_new_model.labels.num_train == 256 and hp.rewards.adaptive_kl.target == bench.TARGET


def fake_findings(cell, kl: float, score: float) -> dict:
    """What measure_folder writes, with made-up numbers."""
    return dict(cell=cell.name, wall_time=10.0, kl=kl, score=score, score_before=0.0, score_distinct=score / 2,
                win_rate=0.5 + score / 10, win_rate_distinct=0.25, repeated_words=0.1, proxy_rm_after=score * 2, heldout_accuracy=0.8,
                own_rm_after_std=1.0, proxy_rm_before=0.0, score_before_distinct=0.0, kl_history=[0.0, kl], kl_coef_history=[0.15, 0.1], score_history=[0.0, score])


def keep_cell(bench, keep, cell, findings: dict, target: float | None = 6.0) -> None:
    """A finished run in DIR/<cell>, as the grid leaves it (measured already)."""
    (keep / cell.name).mkdir(parents=True)
    (keep / cell.name / bench.DONE_FILE).write_text("10.0")
    (keep / cell.name / bench.MEASURED_FILE).write_text(json.dumps(findings))
    hparams = {"rewards": {"adaptive_kl": None if target is None else {"target": target}}}
    (keep / cell.name / "train_policy_hparams.json").write_text(json.dumps(hparams))


def test_kept_cells_make_tables_plots_and_a_list_of_missing_cells(bench, tmp_path, capsys):
    keep, record, docs = tmp_path / "keep", tmp_path / "record", tmp_path / "docs"
    cells = bench.grid([0, 1], ["mock_sentiment"], ["labels-2048", "labels-256", "kl-off", "online-initial",
                                                    "distinct-labels-2048"])
    done = cells[:-1]
    for i, cell in enumerate(done):
        keep_cell(bench, keep, cell, fake_findings(cell, kl=1.0 + i, score=float(i)),
                  target=None if cell.kind == "kl-off" else 6.0)
        strength = [dict(update=1, round=1, before_mean=0.5, before_std=1.5, before_initial_mean=0.0,
                         before_initial_std=1.0, after_mean=1.0, after_std=2.5, after_initial_mean=0.0,
                         after_initial_std=1.0)]
        (keep / cell.name / "reward_strength.json").write_text(json.dumps(strength))
    record.mkdir()
    (record / "labeler_scales.json").write_text(json.dumps({"sentiment": 0.7, "sentiment_distinct": 0.6}))
    bench.report_all(keep, record, cells, ["mock_sentiment"], docs)
    out = capsys.readouterr().out
    assert f"Missing cells: {cells[-1].name}" in out
    scores = [float(done.index(c)) for c in done if c.kind == "labels-2048"]  # both seeds
    two_seeds = [line for line in out.splitlines() if "| 2048 labels | 2 |" in line]
    assert two_seeds and f"{sum(scores) / 2:.2f} ({min(scores):.2f}–{max(scores):.2f})" in two_seeds[0]
    assert (record / "tables.md").read_text().startswith("Recorded in")
    assert "| `mock_sentiment` | 2048 labels | 2 | 6 |" in out  # the KL target, from the runs' hparams
    # the saturating labeler's sweep: its true score is the distinct-word score (score / 2 here)
    distinct = [float(done.index(c)) / 2 for c in done if c.kind == "distinct-labels-2048"]
    assert f"| `mock_sentiment` | 6 | 1 | {done.index(cells[4]) + 1.0:.2f} | {distinct[0]:.2f} |" in out
    assert "| mock_sentiment-s0-online-initial | 1 | round 1 | 1.00 | 2.50 | 1.00 | 0.100 |" in out
    for name in ("paper_label_scaling.png", "paper_kl_tradeoff.png", "paper_online_kl.png"):
        assert (docs / name).stat().st_size > 0

    # Another machine, the runs gone: the same tables from the records alone, and nothing to run but
    # the missing cell.
    (docs / "paper_label_scaling.png").unlink()
    bench.report_all(tmp_path / "elsewhere", record, cells, ["mock_sentiment"], docs)
    again = capsys.readouterr().out
    assert again.split("\n", 1)[1] == out.split("\n", 1)[1]
    assert (docs / "paper_label_scaling.png").stat().st_size > 0
    assert bench.to_run(cells, tmp_path / "elsewhere", record) == [cells[-1]]
    recorded = json.loads((record / f"{done[0].name}.json").read_text())
    assert recorded["findings"]["score"] == 0.0 and recorded["findings"]["kl_target"] == 6.0
    assert recorded["reward_strength"][0]["after_std"] == 2.5


def test_a_sweep_cell_whose_reward_model_is_only_recorded_runs_that_model_again_first(bench, tmp_path):
    keep, record = tmp_path / "keep", tmp_path / "record"
    model, sweep, other = (bench.Cell("mock_sentiment", 1, k) for k in ("labels-2048", "kl-off", "labels-256"))
    keep_cell(bench, keep, model, fake_findings(model, kl=6.0, score=1.0))
    assert bench.measure(model, keep, record)["kl_target"] == 6.0  # recorded now
    assert bench.to_run([model, sweep, other], keep, record) == [sweep, other]
    elsewhere = tmp_path / "elsewhere"
    assert bench.to_run([model, sweep, other], elsewhere, record) == [model, sweep, other]
    assert bench.to_run([model, other], elsewhere, record) == [other]
    # a record is replaced whole, never left half-written
    bench.write_record(model, record, "reward_strength", [])
    assert set(json.loads((record / f"{model.name}.json").read_text())) == {"findings", "reward_strength"}
    assert not list(record.glob("*.partial"))


def test_the_ceiling_rewards_the_labelers_score_normalized(bench):
    encoding = encodings.get(trained_models.load_initial("kjv")[1])
    text = " And the LORD was good and glad"
    response = torch.tensor([encoding.encode(text)])
    reward = bench.LabelerReward("sentiment", encoding, 0.5, 2.0)
    expected = (mock_labelers.sentiment("", encoding.decode(response[0].tolist())) - 0.5) / 2.0
    assert expected > 0
    assert reward(torch.zeros_like(response), response).tolist() == pytest.approx([expected])


def test_a_ceiling_cell_runs_this_script_with_its_kind_and_the_extra_flags(bench, tmp_path):
    cell = bench.Cell("mock_sentiment", 0, "ceiling")
    command = bench.command(cell, tmp_path, ["--ppo.lr", "1e-5"])
    assert command[command.index("--ceiling-run") + 1:] == ["mock_sentiment", "0", str(tmp_path), "ceiling",
                                                            "--flags", "--ppo.lr", "1e-5"]
