"""Validation up front: bad settings are one `error:` line and exit 1, in the parent process and
in --dry_run, before anything is written or any rank is started."""

import errno
import json
import os

import pytest

from lm_human_preferences import experiments
from lm_human_preferences.cli import main as cli
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.labeling import label_files, label_types
from lm_human_preferences.language import encodings
from lm_human_preferences.utils import distributed, storage
from lm_human_preferences.utils.errors import UserError


def fails(capsys, command: str, args: list[str], *words: str) -> str:
    """Run a command line in-process; it must fail with one `error:` line holding `words`."""
    assert cli.main(command, args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err


def launch_fails(capsys, tmp_path, dry_run: bool, args: list[str], *words: str) -> None:
    save = tmp_path / "save"
    fails(capsys, "launch", [*args[:3], "--save_dir", str(save), *(["--dry_run"] if dry_run else []), *args[3:]],
          *words)
    assert not save.exists()  # nothing was written (and no rank was started to write it)
    assert distributed.world_size() == 1  # validation's requested world does not outlive it


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "run"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_mpi_must_be_at_least_one(capsys, tmp_path, dry_run, value):
    launch_fails(capsys, tmp_path, dry_run, ["train_reward", "test", "x", "--mpi", value],
                 f"--mpi must be at least 1 (the number of ranks), got {value}")


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "run"])
@pytest.mark.parametrize("key, value, message", [
    ("ppo.noptepochs", "0", "ppo.noptepochs must be positive, got 0"),
    ("ppo.total_episodes", "0", "ppo.total_episodes must be positive, got 0"),
    ("ppo.nminibatches", "0", "ppo.nminibatches must be positive, got 0"),
    ("ppo.batch_size", "0", "ppo.batch_size must be positive, got 0"),
    ("ppo.batch_size", "-8", "ppo.batch_size must be positive, got -8"),
    ("run.save_interval", "0", "run.save_interval must be positive, got 0"),
    ("run.log_interval", "0", "run.log_interval must be positive, got 0"),
])
def test_counts_and_intervals_must_be_positive(capsys, tmp_path, dry_run, key, value, message):
    launch_fails(capsys, tmp_path, dry_run, ["train_policy", "test", "x", f"--{key}", value], message)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "run"])
@pytest.mark.parametrize("key, value, message", [
    ("ppo.lr", "-1", "ppo.lr must be a finite number ≥ 0, got -1.0"),
    ("ppo.lr", "nan", "ppo.lr must be a finite number ≥ 0, got nan"),
    ("ppo.lr", "inf", "ppo.lr must be a finite number ≥ 0, got inf"),
    ("ppo.vf_coef", "-0.1", "ppo.vf_coef must be a finite number ≥ 0, got -0.1"),
    ("ppo.cliprange", "-1", "ppo.cliprange must be a positive number, got -1.0"),
    ("ppo.cliprange", "0", "ppo.cliprange must be a positive number, got 0.0"),
    ("ppo.cliprange_value", "0", "ppo.cliprange_value must be a positive number, got 0.0"),
    ("ppo.gamma", "1.5", "ppo.gamma must be between 0 and 1, got 1.5"),
    ("ppo.lam", "-0.1", "ppo.lam must be between 0 and 1, got -0.1"),
    ("rewards.kl_coef", "-1", "rewards.kl_coef must be a finite number ≥ 0, got -1.0"),
    ("rewards.adaptive_kl.target", "0", "rewards.adaptive_kl needs a positive target"),
    ("rewards.adaptive_kl.target", "-6", "e.g. --rewards.adaptive_kl.target 6.0"),
    ("rewards.adaptive_kl.horizon", "0", "rewards.adaptive_kl.horizon must be positive (in episodes), got 0"),
    ("task.policy.temperature", "0", "task.policy.temperature must be positive, got 0.0"),
    ("task.policy.temperature", "-1", "task.policy.temperature must be positive, got -1.0"),
])
def test_ranges(capsys, tmp_path, dry_run, key, value, message):
    launch_fails(capsys, tmp_path, dry_run, ["train_policy", "test", "x", f"--{key}", value], message)


@pytest.mark.parametrize("args, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--nsamples", "-1"], "--nsamples must be at least 0 (0 samples forever), got -1"),
    (["--mpi", "0"], "--mpi must be at least 1 (the number of ranks), got 0"),
    (["--temperature", "0"], "--temperature must be a finite positive number, got 0.0"),
    (["--temperature", "-0.5"], "--temperature must be a finite positive number, got -0.5"),
    (["--temperature", "nan"], "--temperature must be a finite positive number, got nan"),
])
def test_sample_flags(capsys, tmp_path, monkeypatch, args, message):
    started = []
    monkeypatch.setattr(distributed, "run", lambda *a: started.append(a))
    fails(capsys, "sample", ["sample", "--save_dir", str(tmp_path / "run"), *args], message)
    assert not started  # checked in the parent, before any rank starts


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--n", "-5"], "--n must be at least 1, got -5"),
    (["--noise", "-1"], "--noise must be a finite non-negative number, got -1.0"),
    (["--noise", "inf"], "--noise must be a finite non-negative number, got inf"),
])
def test_label_flags(capsys, tmp_path, args, message):
    out = tmp_path / "labels.json"
    fails(capsys, "label", ["test", "--out", str(out), "--labeler", "sentiment", *args], message)
    assert not out.exists()


def test_unknown_options_stay_errors(capsys, tmp_path):
    fails(capsys, "sample", ["sample", "--save_dir", str(tmp_path), "--nsample", "3"], "unknown option --nsample")
    fails(capsys, "label", ["test", "--out", str(tmp_path / "l.json"), "--labeler", "sentiment", "--labeller", "x"],
          "unknown option --labeller")


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "run"])
def test_divisibility_uses_the_requested_ranks(capsys, tmp_path, monkeypatch, dry_run):
    started = []
    monkeypatch.setattr(distributed, "run", lambda *a: started.append(a))
    # the test experiment's batches (8 for the reward model, 16 for PPO) split over 2 ranks, not 3
    launch_fails(capsys, tmp_path, dry_run, ["train_policy", "test", "x", "--mpi", "3"],
                 "must be divisible by the number of ranks (3)", "--mpi")
    launch_fails(capsys, tmp_path, dry_run, ["train_policy", "test", "x", "--mpi", "3",
                                             "--rewards.train_new_model", "off", "--rewards.trained_model", "rm"],
                 "ppo.batch_size=16 must be divisible by ranks (3)")
    assert not started
    assert cli.main("launch", ["train_policy", "test", "x", "--mpi", "2", "--dry_run"]) == 0


def test_divisibility_uses_the_launchers_world(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets them; --mpi is then ignored
    launch_fails(capsys, tmp_path, True, ["train_policy", "test", "x", "--mpi", "2"],
                 "must be divisible by the number of ranks (3)")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main("launch", ["train_policy", "test", "x", "--mpi", "3", "--dry_run"]) == 0


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "run"])
def test_context_of_the_test_model(capsys, tmp_path, dry_run):
    launch_fails(capsys, tmp_path, dry_run, ["train_policy", "test", "x", "--task.response_length", "7"],
                 "task.query_length (2) + task.response_length (7) = 9 tokens exceed the context of model 'test' "
                 "(8 tokens); lower --task.response_length to at most 6")
    launch_fails(capsys, tmp_path, dry_run, ["train_reward", "test", "x", "--task.query_length", "8"],
                 "lower --task.query_length and --task.response_length to at most 8 together")
    assert cli.main("launch", ["train_policy", "test", "x", "--task.response_length", "6", "--dry_run"]) == 0


def test_context_of_kjv(capsys, tmp_path):
    launch_fails(capsys, tmp_path, True, ["train_reward", "mock_sentiment", "x", "--task.response_length", "60"],
                 "= 72 tokens exceed the context of model 'kjv' (64 tokens); lower --task.response_length to at most 52")
    label_out = tmp_path / "labels.json"
    fails(capsys, "label", ["mock_sentiment", "--out", str(label_out), "--task.query_length", "60"],
          "model 'kjv' (64 tokens); lower --task.response_length to at most 4")
    assert not label_out.exists()


def test_context_counts_prefix_and_suffix_of_gpt2(capsys, tmp_path):
    main = encodings.get("main")
    extra = len(main.encode("Article:\n\n")) + len(main.encode("\n\nTL;DR:"))
    launch_fails(capsys, tmp_path, True, ["train_policy", "cnndm", "x", "--task.query_length", "1000"],
                 f"+ {extra} tokens of task.query_prefix/query_suffix", "model '124M' (1024 tokens)",
                 f"lower --task.response_length to at most {1024 - extra - 1000}")


def test_context_check_needs_no_bpe_without_prefix(capsys, monkeypatch):
    real_get = encodings.get

    def get(name):
        assert name != "main", "the main encoding (a download) was loaded for an empty prefix and suffix"
        return real_get(name)

    monkeypatch.setattr(encodings, "get", get)
    assert cli.main("launch", ["train_policy", "sentiment", "x", "--dry_run"]) == 0  # GPT-2 124M, no prefix


def _task(model: str, **fields) -> lm_tasks.TaskHParams:
    task = lm_tasks.TaskHParams(query_length=4, query_dataset="test", response_length=5, **fields)
    task.policy.initial_model = model
    return task


def test_context_of_folders(tmp_path):
    ours = tmp_path / "ours"  # our layout (and the original's): hparams.json and encoding
    ours.mkdir()
    (ours / "hparams.json").write_text(json.dumps(dict(n_vocab=27, n_ctx=10, n_embd=4, n_head=1, n_layer=1)))
    (ours / "encoding").write_text('"test"')
    _task(str(ours)).validate("task.")  # 4 + 5 fits 10
    with pytest.raises(UserError, match=r"\+ 2 tokens of task.query_prefix/query_suffix = 11 tokens exceed the "
                                        r"context of model '.*ours' \(10 tokens\); lower --task.response_length "
                                        r"to at most 4"):
        _task(str(ours), query_prefix="a", query_suffix="b").validate("task.")
    hf = tmp_path / "hf"  # a Hugging Face folder: config.json
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(model_type="gpt2", vocab_size=27, n_positions=6)))
    (hf / "encoding").write_text('"test"')
    with pytest.raises(UserError, match=r"context of model '.*hf' \(6 tokens\); lower --task.response_length "
                                        r"to at most 2"):
        _task(str(hf)).validate("task.")
    with pytest.raises(UserError, match="no model here"):
        _task(str(tmp_path / "missing")).validate("task.")


VOCAB = label_files.Vocabulary(n_vocab=27, padding_token=27)
BO4 = label_types.get("best_of_4")


def _record(**fields):
    return {"query": [1, 2], "sample0": [1], "sample1": [2], "sample2": [3], "sample3": [27], "best": 0, **fields}


@pytest.mark.parametrize("token", [2 ** 70, -(2 ** 70), 2 ** 63])
def test_huge_token_id_is_outside_the_vocabulary(tmp_path, token):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps([_record(), _record(sample2=[token])]))
    with pytest.raises(UserError, match=rf"record 1: 'sample2' holds token id {token}, outside the vocabulary"):
        label_files.load(str(path), BO4, 2, 1, VOCAB)


def test_label_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "labels.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([_record(best=2)]).encode())
    labels = label_files.load(str(path), BO4, 2, 1, VOCAB)
    assert len(labels) == 1 and labels.columns["best"].tolist() == [2]


def _full_disk(monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)  # every atomic write fails as on a full disk


def test_full_disk_is_one_line(capsys, tmp_path, monkeypatch):
    """A run that hits a full disk saving, again saving what it has, then closing its log (whose
    OSError carries the others as context) prints the clear message once, without tracebacks."""
    def train(hp):
        try:
            storage.atomic_write_text(tmp_path / "save" / "x" / "checkpoint", "weights")
        except BaseException:
            storage.atomic_write_text(tmp_path / "save" / "x" / "checkpoint", "weights")
            raise
        finally:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "save" / "x" / "events"))

    _full_disk(monkeypatch)
    monkeypatch.setattr(experiments, "train_function", lambda mode: train)
    monkeypatch.setattr(distributed, "default_ranks", lambda: 1)
    err = fails(capsys, "launch", ["train_reward", "test", "x", "--save_dir", str(tmp_path / "save")],
                f"error: disk full while writing {tmp_path / 'save' / 'x' / 'checkpoint'}; free space and run again")
    assert "Traceback" not in err


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, ["disk full while writing", "events", "No space left on device", "--save_dir"]),
    (errno.EDQUOT, ["disk quota exceeded while writing", "events", "raise the quota"]),
])
def test_bare_full_disk_error_is_one_line(capsys, tmp_path, monkeypatch, code, words):
    def train(hp):
        raise OSError(code, os.strerror(code), str(tmp_path / "events"))

    monkeypatch.setattr(experiments, "train_function", lambda mode: train)
    monkeypatch.setattr(distributed, "default_ranks", lambda: 1)
    fails(capsys, "launch", ["train_reward", "test", "x", "--save_dir", str(tmp_path / "save")], *words)


def test_other_os_errors_are_not_swallowed(tmp_path, monkeypatch):
    def train(hp):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(experiments, "train_function", lambda mode: train)
    monkeypatch.setattr(distributed, "default_ranks", lambda: 1)
    with pytest.raises(OSError):
        cli.main("launch", ["train_reward", "test", "x", "--save_dir", str(tmp_path / "save")])
