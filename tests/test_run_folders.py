"""A run's save folder: a run name stays inside the save root, and a run that never started leaves nothing."""

import json

import pytest

from lm_human_preferences.cli import main as cli
from lm_human_preferences.training import run
from lm_human_preferences.utils import save_folders


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", ""])
def test_a_run_name_is_one_folder(capsys, tmp_path, name):
    root = tmp_path / "root"
    assert cli.main("launch", ["train_reward", "test", name, "--save_dir", str(root), "--dry_run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be a plain folder name" in err and "--save_dir" in err
    assert not (tmp_path / "escape").exists() and not root.exists()


def test_a_run_that_never_started_leaves_nothing(capsys, tmp_path):
    missing = tmp_path / "no_such_labels.json"
    code = cli.main("launch", ["train_reward", "test", "x", "--save_dir", str(tmp_path / "root"),
                               "--labels.source", str(missing)])
    err = capsys.readouterr().err
    assert code == 1 and "no_such_labels.json" in err
    assert not (tmp_path / "root" / "x").exists()  # no report, no lock, no folder


def test_a_run_that_started_keeps_its_folder_and_report(tmp_path):
    """Only a folder holding nothing but the lock (and a report) counts as never started."""
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / save_folders.LOCK).write_text("1")
    (folder / save_folders.REWARD_HPARAMS).write_text(json.dumps({}))
    assert not run.release_if_unstarted(folder)
    assert (folder / save_folders.LOCK).exists()
    (folder / save_folders.REWARD_HPARAMS).unlink()
    (folder / save_folders.REPORT).write_text("<html>")
    (folder / save_folders.REPORT_PLOTS).mkdir()
    assert run.release_if_unstarted(folder) and not folder.exists()
