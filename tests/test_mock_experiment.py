"""The offline mock experiment, shortened: it must show the method working end to end."""

import json

from lm_human_preferences import cli


def test_mock_descriptiveness_learns(tmp_path, capsys):
    # Labels and reward model as the full experiment (fewer labels are not enough to learn from in one
    # pass); PPO shortened from 100 updates to 40.
    args = ["train_policy", "mock_descriptiveness", "ci", "--save_dir", str(tmp_path),
            "--ppo.total_episodes", str(64 * 40), "--run.log_interval", "100"]
    assert cli.main("launch", args) == 0
    summary = json.loads((tmp_path / "ci" / "mock_summary.json").read_text())
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    assert summary["heldout_count"] >= 400
    assert summary["reward_model_heldout_accuracy"] > 0.4  # chance is 0.25
    assert summary["true_score_after"] > summary["true_score_before"] + 0.2
    assert 0 < summary["final_kl"] < 30
    assert len(summary["samples"]) == 3
    records = json.loads((tmp_path / "ci" / "labels.json").read_text())
    assert len(records) == 2560 and set(records[0]) == {"query", "sample0", "sample1", "sample2", "sample3", "best"}
    assert "true score of policy samples" in capsys.readouterr().out
