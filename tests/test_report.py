"""The run report: a page that renders from whatever a run folder holds, and never fails on what it lacks."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lm_human_preferences.evaluation import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

PPO_TAGS = ["objective/kl", "objective/kl_coef", "objective/entropy", "objective/score", "objective/score_total",
            "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/approxkl",
            "ppo/policy/clipfrac", "ppo/returns/mean", "ppo/returns/var", "ppo/val/vpred", "ppo/val/error",
            "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var", "ppo/val/var_explained", "elapsed/fps"]

MOCK = {"labeler": "vowels", "reward_model_heldout_accuracy": 0.734375, "heldout_count": 512, "chance": 0.25,
        "true_score_before": 3.125, "true_score_after": 7.5, "win_rate": 0.8125, "final_kl": 5.8671875,
        "final_kl_coef": 0.0712890625,
        "samples": [{"query": "In the beginning", "before": "was <script>alert(1)</script>", "before_score": 2,
                     "after": "  God\ncreated", "after_score": 9}]}


def write_scalars(folder: Path, rows: dict[int, dict[str, float]]) -> None:
    """One event file in `folder` holding `rows` (step -> {tag: value})."""
    writer = SummaryWriter(str(folder))
    for step, stats in rows.items():
        for tag, value in stats.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2))


def fake_run(folder: Path) -> Path:
    """A run folder like train_policy leaves after training a reward model on mock labels, then PPO."""
    folder.mkdir(parents=True, exist_ok=True)
    reward_hp = {"run": {"seed": 1234}, "labels": {"type": "best_of_4"}, "lr": 5e-5}
    write_json(folder / "train_reward_hparams.json", reward_hp)
    write_json(folder / "train_policy_hparams.json", {"run": {"seed": 1234}, "rewards": {
        "train_new_model": reward_hp, "adaptive_kl": {"target": 6.0, "horizon": 10000}, "kl_coef": 0.1}})
    write_scalars(folder / "tb" / "reward_model", {
        step: {"train/loss": 1.4 - 0.01 * step, "train/accuracy": 0.25 + 0.004 * step, "train/lr": 5e-5 - 1e-6 * step}
        for step in range(64)})
    write_json(folder / "train_reward_summary.json", {
        "normalize_before": {"mean_before": 0.3, "std_before": 2.0, "target_mean": 0.0, "target_std": 1.0,
                             "gain": 0.5, "bias": -0.15},
        "normalize_after": {"mean_before": 1.2, "std_before": 1.5, "target_mean": 0.0, "target_std": 1.0,
                            "gain": 0.6667, "bias": -0.8, "mean_after": 0.01, "std_after": 0.99},
        "train": {"train/loss": 0.77}, "heldout": {"count": 512, "accuracy": 0.734375, "chance": 0.25}})
    write_scalars(folder / "tb" / "ppo", {
        step: {**{tag: 0.1 * step for tag in PPO_TAGS}, "objective/kl": 4 + step / 10,
               "elapsed/episodes": 64 * (step + 1), "elapsed/time": 2.0 * (step + 1)} for step in range(20)})
    write_json(folder / "mock_summary.json", MOCK)
    return folder


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_full_run(tmp_path):
    path = report.write_report(fake_run(tmp_path))
    assert path == tmp_path / "report.html"
    page = path.read_text()
    sources = image_sources(page)
    assert len(sources) >= 3 + 8  # three reward tags; KL, the PPO_PLOTS and episodes/s
    for source in sources:
        png = tmp_path / source
        assert png.parent == tmp_path / "report"
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
    assert "<b>0.7344</b> (chance 0.25, 512 labels)" in page
    assert "<b>81.2%</b>" in page  # win rate
    assert "<b>3.125</b> before PPO → <b>7.5</b> after" in page
    assert "Final KL: <b>5.867</b> (kl_coef 0.07129)" in page
    assert "Seed (policy): <b>1234</b>" in page and "Seed (reward model): <b>1234</b>" in page
    assert "target 6 ±50%" not in page  # the band is inside the KL plot, not the text
    assert "0.6667" in page and "fixed KL coefficient" not in page
    assert "no mock_summary.json" not in page and "<details><summary>train_policy_hparams.json" in page


def test_rewrite_removes_stale_plots(tmp_path):
    report.write_report(fake_run(tmp_path))
    (tmp_path / "report" / "old_tag.png").write_bytes(b"stale")
    page = report.write_report(tmp_path).read_text()
    assert not (tmp_path / "report" / "old_tag.png").exists()
    assert sorted(image_sources(page)) == sorted(f"report/{p.name}" for p in (tmp_path / "report").iterdir())


def test_crashed_run_with_garbage_logs(tmp_path):
    (tmp_path / "tb" / "ppo").mkdir(parents=True)
    (tmp_path / "tb" / "ppo" / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "tb" / "reward_model").mkdir()
    (tmp_path / "tb" / "reward_model" / "events.out.tfevents.1700000000.host.1.1").write_bytes(b"")
    (tmp_path / "train_policy_hparams.json").write_text("{not json")
    page = report.write_report(tmp_path).read_text()
    assert "no logs in ppo: 1 event file(s) without scalars (the run may have stopped before its first update" in page
    assert "no logs in reward_model" in page and "train_policy_hparams.json could not be read" in page
    assert "no train_reward_summary.json" in page and "no mock_summary.json" in page
    assert image_sources(page) == []


def test_empty_folder_and_odd_values(tmp_path):
    assert "No headline numbers" in report.write_report(tmp_path).read_text()
    write_json(tmp_path / "samples.json", {"not": "a list"})
    write_json(tmp_path / "train_policy_hparams.json", {"run": {"seed": None}, "rewards": {"adaptive_kl": None}})
    write_scalars(tmp_path / "tb" / "ppo", {0: {"objective/kl": float("nan"), "elapsed/fps": 100.0},
                                            1: {"objective/kl": float("inf"), "elapsed/fps": 120.0}})
    page = report.write_report(tmp_path).read_text()
    assert "no usable samples" in page and "not recorded (drawn at random)" in page
    assert "fixed KL coefficient" in page and "report/ppo_speed.png" in page


def test_inputs_of_the_wrong_shape(tmp_path):
    write_json(tmp_path / "train_reward_hparams.json", [1, 2])
    write_json(tmp_path / "train_policy_hparams.json", {"run": [], "rewards": {"adaptive_kl": {"target": "x"},
                                                                              "train_new_model": 3}})
    write_json(tmp_path / "mock_summary.json", {"samples": "x", "win_rate": "high", "final_kl": "big"})
    write_json(tmp_path / "train_reward_summary.json", {"heldout": [1], "normalize_before": 3,
                                                        "normalize_after": {"gain": "<g>"}})
    page = report.write_report(tmp_path).read_text()
    assert "could not be shown" not in page
    assert "no usable samples" in page and "Final KL: <b>big</b>" in page and "&lt;g&gt;" in page


def test_a_failing_section_costs_only_itself(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(report, "ppo_section", broken)
    page = report.write_report(fake_run(tmp_path)).read_text()
    assert "<h2>PPO</h2><p class=\"note\">this section could not be shown: RuntimeError(&#x27;boom&#x27;)" in page
    assert "<h2>Samples before and after PPO</h2>" in page and "report/reward_train_loss.png" in page


def test_samples_are_escaped(tmp_path):
    fake_run(tmp_path)
    page = report.write_report(tmp_path).read_text()
    assert "<script>" not in page
    assert "was &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '<td class="text">  God\ncreated\n<b>score 9</b></td>' in page


def test_samples_json_without_mock_summary(tmp_path):
    write_json(tmp_path / "samples.json", [{"query": "q & a", "before": "b", "after": "<i>a</i>"}])
    page = report.write_report(tmp_path).read_text()
    assert "q &amp; a" in page and "&lt;i&gt;a&lt;/i&gt;" in page and "score" not in page.split("<h2>Samples")[1]


def test_resumed_run_merges_event_files_by_step(tmp_path):
    tb = tmp_path / "tb" / "ppo"
    write_scalars(tb, {step: {"objective/kl": 1.0} for step in range(5)})
    time.sleep(0.05)
    write_scalars(tb, {step: {"objective/kl": 2.0} for step in range(3, 8)})
    assert len(list(tb.iterdir())) == 2
    scalars = report.read_scalars(tb, [], "")
    assert scalars["objective/kl"] == {0: 1.0, 1: 1.0, 2: 1.0, 3: 2.0, 4: 2.0, 5: 2.0, 6: 2.0, 7: 2.0}
    assert "Final KL: <b>2</b>" in report.write_report(tmp_path).read_text()


def test_cli(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert report.main([str(tmp_path)]) == 1
    assert "holds none of a run's files" in capsys.readouterr().err
    assert report.main([str(fake_run(tmp_path))]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--help"])
    assert exit_info.value.code == 0 and "usage: lmhp-report" in capsys.readouterr().out


def test_console_entry_point_error_is_one_line(tmp_path):
    code = "from lm_human_preferences.evaluation.report import main_entry; main_entry()"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'missing'}: no such folder\n"


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH to render the page headless")
def test_page_renders_in_chromium(tmp_path):
    path = report.write_report(fake_run(tmp_path / "run"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert "Reward model held-out accuracy" in dom.stdout
    assert dom.stdout.count("<img") == len(image_sources(path.read_text()))
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,2000", path.as_uri()],
                   capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3]
    plot_blue = (np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=-1) < 0.03).sum()
    assert plot_blue > 500  # matplotlib's first line colour: the plots loaded; nothing else on the page is that blue
