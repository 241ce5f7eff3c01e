"""A run's save folder: a run name stays inside the save root, and a run that never started leaves nothing."""

import errno
import json
import os

import pytest
import torch

from lm_human_preferences import experiments
from lm_human_preferences.cli import main as cli
from lm_human_preferences.training import resume, run
from lm_human_preferences.utils import save_folders
from lm_human_preferences.utils.errors import UserError
from lm_human_preferences.utils.tf_adam import TFAdam


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


class _GpuGenerator:
    """What a CUDA generator saves: 16 bytes (seed and offset), not the CPU generator's 5,056."""

    def get_state(self):
        return torch.zeros(16, dtype=torch.uint8)


def test_a_state_saved_on_a_gpu_is_a_clear_error_on_the_cpu(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = TFAdam([param], lr=0.1)
    resume.save_state(tmp_path, 2, "model-0000002.safetensors", optimizer, {"sampling": _GpuGenerator()}, {})
    state = resume.load_state(tmp_path)
    with pytest.raises(UserError, match="drew its random numbers on a GPU and cannot resume exactly on the CPU"):
        resume.restore(state, optimizer, {"sampling": torch.Generator()})
    cpu = torch.Generator().manual_seed(3)
    resume.save_state(tmp_path, 3, "model-0000003.safetensors", optimizer, {"sampling": cpu}, {})
    resume.restore(resume.load_state(tmp_path), optimizer, {"sampling": torch.Generator()})  # same kind: fine


def _no_space(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("full_at", ["lock", "hparams"])
def test_a_run_refused_for_a_full_disk_leaves_nothing(capsys, tmp_path, monkeypatch, full_at):
    """The disk fills writing the lock (os.write) or the hparams (an atomic write's fsync): the
    error names the file, and neither the run's folder nor the save root it made is left."""
    monkeypatch.setattr(os, "write" if full_at == "lock" else "fsync", _no_space)
    root = tmp_path / "root"
    assert cli.main("launch", ["train_reward", "test", "x", "--save_dir", str(root)]) == 1
    written = root / "x" / (save_folders.LOCK if full_at == "lock" else save_folders.REWARD_HPARAMS)
    assert f"disk full while writing {written}" in capsys.readouterr().err
    assert not root.exists()


def test_a_full_disk_leaves_a_save_root_that_was_there(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setattr(os, "write", _no_space)
    with pytest.raises(OSError, match="No space left"):
        run.claim(root / "x")
    assert root.is_dir() and list(root.iterdir()) == []


def mock_reward_hparams(save_dir, labeler: str = "descriptiveness"):
    hp = experiments.get("train_reward", f"mock_{labeler}")
    hp.run.save_dir = str(save_dir)
    return hp


def test_start_leaves_the_hparams_as_given_and_resolves_beside_them(tmp_path):
    """The seed drawn, the save folder and the mock labels' file are in the `Resolved`; the hparams
    keep `run.seed none` and `labels.source mock:...`, and their file holds the seed used."""
    hp = mock_reward_hparams(tmp_path)
    hp.run.seed = None
    hp.labels.num_train, hp.batch_size = 8, 8
    given = hp.to_json()
    resolved = run.start_run(hp, save_folders.REWARD_HPARAMS, labels_hp=hp)
    assert hp.to_json() == given
    assert resolved.save_dir == tmp_path and resolved.labels == str(tmp_path / save_folders.LABELS)
    assert len(json.loads((tmp_path / save_folders.LABELS).read_text())) == 8 + 2  # and a quarter held out
    run.save_hparams(hp, resolved, save_folders.REWARD_HPARAMS)
    saved = json.loads((tmp_path / save_folders.REWARD_HPARAMS).read_text())
    assert saved["run"]["seed"] == resolved.seed and saved["labels"]["source"] == "mock:descriptiveness"
    assert run.prepare_save_dir(hp, save_folders.REWARD_HPARAMS, tmp_path, None) == resolved.seed  # resumed


def test_a_rerun_with_another_mock_labeler_is_refused(tmp_path):
    hp = mock_reward_hparams(tmp_path)
    (tmp_path / save_folders.REWARD_HPARAMS).write_text(run.replayable(hp, 1).to_json())
    with pytest.raises(UserError, match=r"other hparams \(labels.source\)"):
        run.prepare_save_dir(mock_reward_hparams(tmp_path, "sentiment"), save_folders.REWARD_HPARAMS, tmp_path, None)


def test_a_folder_whose_hparams_name_the_mock_labels_file_resumes(tmp_path):
    """Folders written before hparams stayed as given hold the collected file as labels.source."""
    hp = mock_reward_hparams(tmp_path)
    old = run.replayable(hp, 1).to_nested_dict()
    old["labels"]["source"] = str(tmp_path / save_folders.LABELS)
    (tmp_path / save_folders.REWARD_HPARAMS).write_text(json.dumps(old))
    assert run.prepare_save_dir(hp, save_folders.REWARD_HPARAMS, tmp_path, None) == 1
    old["labels"]["source"] = str(tmp_path / "other.json")
    (tmp_path / save_folders.REWARD_HPARAMS).write_text(json.dumps(old))
    with pytest.raises(UserError, match="other hparams"):
        run.prepare_save_dir(hp, save_folders.REWARD_HPARAMS, tmp_path, None)
