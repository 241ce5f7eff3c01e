"""The offline demo: it must show the method working end to end, by a wide margin."""

import contextlib
import io
import json
import re

import pytest

from lm_human_preferences.cli import main as cli

# The README's main job itself, at seed 0 (about 2 minutes on 2 idle CPU cores). Measured with
# `python bench/mock_demo.py --seeds 0 1 2` (2-core CPU, two sessions): held-out accuracy
# 0.869–0.916, win rate 0.867–0.900, labeler's score 0.12–0.18 → 1.61–1.81, final KL 5.81–7.18
# (target 6). The thresholds below sit far below every measured seed and far above chance
# (accuracy 0.25; a win rate of 0.5 is no change). A shortened run is not used: the reward model
# is limited by its labels (1,024 labels and 40 updates gave accuracy 0.56 and win rate 0.62).
MAIN_JOB = ["--run.log_interval", "100"]


def run_demo(tmp_path, name: str, seed: int, flags: list[str]) -> dict:
    args = ["train_policy", "mock_descriptiveness", name, "--save_dir", str(tmp_path), "--run.seed", str(seed), *flags]
    assert cli.main("launch", args) == 0
    return json.loads((tmp_path / name / "mock_summary.json").read_text())


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> tuple[dict, str, object]:
    """The main job at seed 0: its summary, its printed output and its save root."""
    root = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = run_demo(root, "ci", 0, MAIN_JOB)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    return summary, out.getvalue(), root


def test_mock_descriptiveness_learns(main_job):
    summary, out, tmp_path = main_job
    assert summary["heldout_count"] >= 400
    assert summary["reward_model_heldout_accuracy"] > 0.7
    assert summary["win_rate"] > 0.75
    assert summary["true_score_after"] > summary["true_score_before"] + 1.0
    assert 3 < summary["final_kl"] < 9  # the adaptive controller's target 6 ± 50%
    assert len(summary["samples"]) == 3
    records = json.loads((tmp_path / "ci" / "labels.json").read_text())
    assert len(records) == 2048 + 512 and set(records[0]) == {"query", "sample0", "sample1", "sample2", "sample3", "best"}
    assert "win rate of the trained policy against the initial one" in out
    assert "seed 0 (replay with --run.seed 0)" in out
    # the run ends with its report: every plot exists, and the headline numbers are the summary's
    assert f"report: {tmp_path / 'ci' / 'report.html'}" in out
    page = (tmp_path / "ci" / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) >= 8 and all((tmp_path / "ci" / src).stat().st_size > 1000 for src in images)
    assert f"{100 * summary['win_rate']:.1f}%" in page


# The paper's label scaling, shortened to two of bench/paper_findings.py's five label counts: the
# main job with 256 training labels instead of 2,048. Measured with `python bench/mock_demo.py
# --experiments mock_descriptiveness --seeds 0 1 2 --flags --rewards.train_new_model.labels.num_train
# 256` (2-core CPU, shared): held-out accuracy 0.312–0.359, win rate 0.525–0.660, labeler's
# score after 0.25–0.59; the main job (2,048 labels, above) 0.869–0.916, 0.867–0.900, 1.61–1.81.
# The smallest gap between any two seeds — accuracy 0.51, win rate 0.21, score 1.02 — is twice
# or more what the test asks. The paper_findings grid (horizon 640, seeds 0 1 2) agrees for
# mock_descriptiveness: 256 labels score 0.22–0.70 against 2,048's 1.41–1.72 at every seed; for
# mock_sentiment one seed's 256-label run scored 1.39, as much as 4,096 labels (README, "Label
# scaling"), so no test asserts the direction there.
def test_fewer_labels_learn_less(main_job, tmp_path):
    many = main_job[0]
    few = run_demo(tmp_path, "few", 0, [*MAIN_JOB, "--rewards.train_new_model.labels.num_train", "256"])
    assert few["heldout_count"] == 64
    assert few["reward_model_heldout_accuracy"] < many["reward_model_heldout_accuracy"] - 0.25
    assert few["win_rate"] < many["win_rate"] - 0.1
    assert few["true_score_after"] < many["true_score_after"] - 0.5


@pytest.mark.parametrize("given_seed", [None, 5])
def test_a_seed_replays_a_run(tmp_path, given_seed):
    """The seed used (drawn or given) is saved; the same seed gives the same summary."""
    tiny = ["--rewards.train_new_model.labels.num_train", "64", "--ppo.total_episodes", "128",
            "--rewards.train_new_model.normalize_samples", "64"]
    seed_flag = ["--run.seed", "none" if given_seed is None else str(given_seed)]
    assert cli.main("launch", ["train_policy", "mock_sentiment", "first", "--save_dir", str(tmp_path), *tiny,
                               *seed_flag]) == 0
    saved = json.loads((tmp_path / "first" / "train_policy_hparams.json").read_text())
    seed = saved["run"]["seed"]
    assert isinstance(seed, int) and (given_seed is None or seed == given_seed)
    assert saved["rewards"]["train_new_model"]["run"]["seed"] == seed
    args = ["train_policy", "mock_sentiment", "replay", "--save_dir", str(tmp_path), "--run.seed", str(seed), *tiny]
    assert cli.main("launch", args) == 0
    replay = json.loads((tmp_path / "replay" / "mock_summary.json").read_text())
    original = json.loads((tmp_path / "first" / "mock_summary.json").read_text())
    assert replay == original
    assert (tmp_path / "first" / "labels.json").read_bytes() == (tmp_path / "replay" / "labels.json").read_bytes()
