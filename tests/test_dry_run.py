"""`launch.py ... --dry_run` shows the run as it would start (cli/dry_run.py), and the rank count is
checked against the hparams with the valid counts named (cli/ranks.py)."""

import pytest
import torch

from lm_human_preferences.cli import main as cli
from lm_human_preferences.language import model as lm, trained_models
from lm_human_preferences.utils import distributed


def plan(capsys, *args: str) -> dict[str, str]:
    """The dry run's plan lines after the hparams, by label."""
    assert cli.main("launch", [*args, "--dry_run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    lines = out[out.rindex("\n}\n") + 3:].splitlines()
    labelled: dict[str, str] = {}
    for line in lines:
        label, _, text = line.partition(":")
        labelled[label] = labelled.get(label, "") + text.strip() + "\n"
    return labelled


def test_the_plan_follows_the_rank_count(capsys, tmp_path):
    eight = plan(capsys, "train_policy", "descriptiveness", "x", "--mpi", "8", "--save_dir", str(tmp_path))
    one = plan(capsys, "train_policy", "descriptiveness", "x", "--mpi", "1", "--save_dir", str(tmp_path))
    assert eight["ranks"].startswith("8 on the cpu") and one["ranks"].startswith("1 on the cpu")
    assert "batch 512 = 64 a rank, minibatch 64 a rank" in eight["PPO"]
    assert "micro-batches of 32 rows (run.chunk_size 32)" in eight["PPO"] and "1954 updates of 4 epochs" in eight["PPO"]
    assert "batch 512 = 512 a rank" in one["PPO"]
    assert "batches of 32 = 4 a rank (16 sequences, best_of_4), 156 steps" in eight["reward model"]
    assert "rollout batch 512 = 64 a rank" in eight["reward model"]
    dtype = distributed.compute_dtype(torch.device("cpu"), "auto", 124_440_577)
    assert eight["precision"].startswith(f"run.precision auto → {str(dtype).removeprefix('torch.')} on cpu")
    assert eight["memory"].startswith("≈ ") and "GiB of tensors a rank at its peak, in PPO" in eight["memory"]
    assert "an estimate" in eight["time"] and "PFLOP" in eight["time"]
    assert eight["save folder"] == f"{tmp_path / 'x'}: a new run\n"
    assert eight["checks"] == "passed on 8 ranks (valid rank counts: 1, 2, 4, 8, 16, 32)\n"
    bf16 = plan(capsys, "train_policy", "descriptiveness", "x", "--run.precision", "bf16", "--save_dir", str(tmp_path))
    assert bf16["precision"].startswith("run.precision bf16 → bfloat16 on cpu (as asked)")


def test_model_shapes_are_read_without_weights_or_network(tmp_path):
    assert trained_models.local_hparams("https://example.invalid/model") is None  # known once downloaded
    assert trained_models.local_hparams(str(tmp_path)) is None  # no model here
    assert trained_models.local_hparams("355M").n_layer == 24 and trained_models.local_hparams("kjv").n_embd == 128
    hparams = lm.HParams(n_vocab=30, n_ctx=16, n_embd=8, n_head=2, n_layer=3)
    (tmp_path / "hparams.json").write_text(hparams.to_json())
    assert trained_models.local_hparams(str(tmp_path)) == hparams


@pytest.mark.parametrize("ranks", ["3", "6", "7"])
def test_a_rank_count_that_does_not_fit_names_the_valid_ones(capsys, tmp_path, ranks):
    for dry_run in (["--dry_run"], []):
        assert cli.main("launch", ["train_policy", "descriptiveness", "x", "--mpi", ranks, "--save_dir",
                                   str(tmp_path), *dry_run]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --mpi {ranks}: ") and err.count("\n") == 1
        assert f"divisible by the number of ranks ({ranks})" in err and err.endswith(
            "valid rank counts: 1, 2, 4, 8, 16, 32\n")
    assert not any(tmp_path.iterdir())


def test_the_default_falls_back_to_the_largest_count_that_fits(capsys, tmp_path, monkeypatch):
    """On 3 visible GPUs the test experiment (batches 8 and 16, whitening ≥ 8 rows a rank) runs on 2."""
    monkeypatch.setattr(distributed, "default_ranks", lambda: 3)
    started = []
    monkeypatch.setattr(distributed, "run", lambda fn, args, ranks: started.append(ranks))
    assert cli.main("launch", ["train_policy", "test", "x", "--save_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert started == [2]
    assert "note: 3 GPUs are visible but 3 ranks do not fit these hparams (" in out
    assert "running on 2 (valid rank counts: 1, 2); choose with --mpi" in out
    assert out.splitlines()[0].endswith(f"--mpi 2 · logs: tensorboard --logdir {tmp_path / 'x' / 'tb'}")
    assert plan(capsys, "train_policy", "test", "x", "--save_dir", str(tmp_path))["ranks"].startswith("2 on the cpu")
    assert cli.main("launch", ["train_policy", "test", "x", "--mpi", "3", "--save_dir", str(tmp_path)]) == 1
    assert "valid rank counts: 1, 2" in capsys.readouterr().err and started == [2]


def test_the_dry_run_makes_the_save_folders_checks(capsys, tmp_path):
    args = ["train_reward", "test", "r", "--save_dir", str(tmp_path), "--run.save_interval", "2"]
    assert cli.main("launch", args) == 0
    capsys.readouterr()
    assert cli.main("launch", [*args, "--dry_run"]) == 1
    assert "holds a train_reward run that finished" in capsys.readouterr().err
    assert cli.main("launch", [*args, "--lr", "0.001", "--dry_run"]) == 1
    assert "holds a run with other hparams (lr)" in capsys.readouterr().err
    overwrite = plan(capsys, *args, "--lr", "0.001", "--run.overwrite", "on")
    assert "--run.overwrite on replaces the run there (reward model at batch 6)" in overwrite["save folder"]


def test_auto_is_float32_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    """A V100 (compute capability 7.0) emulates bf16, slower than float32: `auto` must not pick it."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert distributed.compute_dtype(torch.device("cuda", 0), "auto") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, H100
    assert distributed.compute_dtype(torch.device("cuda", 0), "auto") == torch.bfloat16


def test_under_torchrun_the_valid_counts_are_named_too(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "6")
    assert cli.main("launch", ["train_policy", "descriptiveness", "x", "--dry_run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: torchrun started 6 ranks: ") and "(6)" in err
    assert err.endswith("valid rank counts: 1, 2, 4, 8, 16, 32\n")
