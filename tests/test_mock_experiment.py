"""The offline mock experiment, shortened: it must show the method working end to end."""

import json

from lm_human_preferences import cli


def test_mock_descriptiveness_learns(tmp_path, capsys):
    args = ["train_policy", "mock_descriptiveness", "ci", "--save_dir", str(tmp_path),
            "--rewards.train_new_model.labels.num_train", "1024", "--ppo.total_episodes", str(64 * 30),
            "--run.log_interval", "100"]
    assert cli.main("launch", args) == 0
    summary = json.loads((tmp_path / "ci" / "mock_summary.json").read_text())
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    assert summary["heldout_count"] >= 200
    assert summary["reward_model_heldout_accuracy"] > 0.33  # chance is 0.25
    assert summary["true_score_after"] > summary["true_score_before"] + 0.3
    assert 0 < summary["final_kl"] < 30
    assert len(summary["samples"]) == 3
    records = json.loads((tmp_path / "ci" / "labels.json").read_text())
    assert len(records) == 1280 and set(records[0]) == {"query", "sample0", "sample1", "sample2", "sample3", "best"}
    assert "true score of policy samples" in capsys.readouterr().out
