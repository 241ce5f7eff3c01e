import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lm_human_preferences import experiments
from lm_human_preferences.cli import main as cli
from lm_human_preferences.utils import distributed
from lm_human_preferences.utils.errors import Stopped, UserError

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def dry_run(capsys, mode: str, experiment: str, *flags: str) -> dict:
    assert cli.main("launch", [mode, experiment, "x", "--dry_run", *flags]) == 0
    out = capsys.readouterr().out
    return json.JSONDecoder().raw_decode(out, out.index("{"))[0]  # the plan follows the hparams


def test_dry_run_books_experiments(capsys):
    for name in ("sentiment", "descriptiveness"):
        rm = dry_run(capsys, "train_reward", name)
        assert rm["task"]["query_length"] == 64 and rm["task"]["response_length"] == 24
        assert rm["task"]["query_dataset"] == f"books|labels:gs://lm-human-preferences/labels/{name}/offline_5k.json"
        assert rm["task"]["start_text"] == "." and rm["task"]["end_text"] == "."
        assert rm["task"]["truncate_token"] == 13 and rm["task"]["truncate_after"] == 16
        assert rm["task"]["policy"] == {"temperature": 0.7, "initial_model": "124M"}
        assert rm["labels"] == {"type": "best_of_4", "num_train": 4992,
                                "source": f"gs://lm-human-preferences/labels/{name}/offline_5k.json"}
        assert (rm["batch_size"], rm["lr"], rm["rollout_batch_size"], rm["normalize_samples"]) == (32, 5e-5, 512, 256)
        assert rm["normalize_before"] and rm["normalize_after"] and rm["run"]["seed"] == 1
        assert rm["run"]["save_dir"] == "/tmp/save/train_reward/x"
        policy = dry_run(capsys, "train_policy", name)
        assert policy["ppo"]["lr"] == 1e-5 and policy["ppo"]["total_episodes"] == 1_000_000
        assert policy["ppo"]["batch_size"] == 512 and policy["ppo"]["whiten_rewards"] is True
        assert policy["rewards"]["kl_coef"] == 0.15
        assert policy["rewards"]["adaptive_kl"] == {"target": 6.0, "horizon": 10000}
        assert policy["rewards"]["train_new_model"] == {**rm, "run": {**rm["run"], "save_dir": "/tmp/save/train_policy/x"}}
        assert policy["run"]["seed"] == 1 and policy["run"]["save_dir"] == "/tmp/save/train_policy/x"


def test_dry_run_summarization_experiments(capsys):
    cnndm = dry_run(capsys, "train_policy", "cnndm")
    task = cnndm["task"]
    assert (task["query_prefix"], task["query_suffix"], task["end_text"], task["start_text"]) == \
        ("Article:\n\n", "\n\nTL;DR:", "\n", None)
    assert (task["query_length"], task["response_length"], task["truncate_token"], task["truncate_after"]) == \
        (500, 75, 198, 55)
    assert task["policy"]["temperature"] == 0.5
    assert (cnndm["ppo"]["lr"], cnndm["ppo"]["batch_size"], cnndm["ppo"]["whiten_rewards"]) == (2e-6, 32, False)
    assert cnndm["rewards"]["kl_coef"] == 0.01 and cnndm["rewards"]["adaptive_kl"] is None
    rm = cnndm["rewards"]["train_new_model"]
    assert rm["labels"]["source"] == "gs://lm-human-preferences/labels/cnndm/online_45k.json"
    assert (rm["labels"]["num_train"], rm["batch_size"], rm["lr"], rm["rollout_batch_size"]) == (46000, 16, 2.5e-5, 128)
    tldr = dry_run(capsys, "train_policy", "tldr")
    assert tldr["task"]["query_prefix"] == "" and tldr["task"]["query_suffix"] == "\n\nTL;DR:"
    assert tldr["task"]["policy"]["temperature"] == 0.7 and tldr["task"]["end_text"] is None
    assert tldr["rewards"]["kl_coef"] == 0.03 and tldr["ppo"]["whiten_rewards"] is False
    assert tldr["rewards"]["train_new_model"]["labels"]["source"].endswith("labels/tldr/online_45k.json")
    rm = dry_run(capsys, "train_reward", "tldr")
    assert rm["labels"]["num_train"] == 46000 and rm["normalize_before"] and rm["normalize_samples"] == 256


def test_overrides_and_save_dir(capsys, tmp_path):
    hp = dry_run(capsys, "train_policy", "descriptiveness", "--rewards.trained_model",
                 "gs://lm-human-preferences/runs/descriptiveness/reward_model", "--rewards.train_new_model", "off",
                 "--ppo.lr=2e-5", "--rewards.adaptive_kl", "off", "--task.query_length", "32",
                 "--save_dir", str(tmp_path))
    assert hp["rewards"]["train_new_model"] is None and hp["rewards"]["adaptive_kl"] is None
    assert hp["ppo"]["lr"] == 2e-5 and hp["task"]["query_length"] == 32
    assert hp["run"]["save_dir"] == str(tmp_path / "x")
    # --task.* reaches the reward model trained first, so the two tasks stay equal
    both = dry_run(capsys, "train_policy", "sentiment", "--task.query_length", "32")
    assert both["rewards"]["train_new_model"]["task"]["query_length"] == 32


@pytest.mark.parametrize("args, message", [
    (["train_policy", "sentimental", "x"], "unknown train_policy experiment 'sentimental'; known: sentiment, "),
    (["train_value", "sentiment", "x"], "unknown mode 'train_value'"),
    (["train_policy", "sentiment", "x", "--ppo.lrr", "1"], "unknown hparam 'ppo.lrr'; did you mean 'ppo.lr'"),
    (["train_policy", "sentiment", "x", "--rewards.kl_coeff", "1"], "did you mean 'rewards.kl_coef'"),
    (["train_policy", "sentiment", "x", "--ppo.batch_size", "big"], "cannot parse 'big' as int"),
    (["train_policy", "sentiment", "x", "--rewards.train_new_model", "off"], "set exactly one of"),
    (["train_policy", "sentiment", "x", "--mpi"], "--mpi needs a value"),
    (["train_policy", "sentiment"], "usage: launch.py"),
    # errors that name the fix: the key with its groups, the held-out rule, a checked mock source
    (["train_policy", "mock_descriptiveness", "x", "--labels.source", "mine.json"],
     "unknown hparam 'labels.source'; did you mean 'rewards.train_new_model.labels.source'?"),
    (["train_reward", "mock_descriptiveness", "x", "--labels.num_train", "250"],
     "labels.num_train=250 is not divisible by batch_size=32; change one of them (e.g. num_train 224 or 256). "
     "The first num_train labels of the source train the reward model and the ones after them are held out"),
    (["train_policy", "mock_descriptiveness", "x", "--rewards.train_new_model.labels.source", "mock:bogus"],
     "rewards.train_new_model.labels.source: unknown mock labeler 'bogus'; known: sentiment, descriptiveness"),
    (["train_reward", "test", "x", "--labels.source", "mock:sentiment:-1"], "labels.source: mock:sentiment:-1: write"),
    (["train_policy", "test", "x", "--ppo.lr", "1e-5", "--ppo.lr=2e-5"],
     "option --ppo.lr is given twice ('1e-5' and '2e-5'); give it once"),
    (["train_policy", "test", "x", "--rewards.adaptive_kl", "off", "--rewards.adaptive_kl.target", "3"],
     "--rewards.adaptive_kl.target sets a field of rewards.adaptive_kl, which --rewards.adaptive_kl off switches off"),
    (["train_policy", "test", "x", "--rewards.adaptive_kl.target", "3", "--rewards.adaptive_kl", "none"],
     "--rewards.adaptive_kl.target sets a field of rewards.adaptive_kl, which --rewards.adaptive_kl none switches"),
])
def test_launch_errors_are_one_line(capsys, args, message):
    assert cli.main("launch", args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_help(capsys):
    assert cli.main("launch", ["--help"]) == 0
    out = capsys.readouterr().out
    assert "--mpi N" in out and "--dry_run" in out and "sentiment" in out and "--rewards.adaptive_kl on" in out
    assert cli.main("sample", ["--help"]) == 0
    assert "--nsamples" in capsys.readouterr().out


def test_readme_commands_on_the_test_experiment(tmp_path):
    """The original README's commands, verbatim but for the experiment and a --save_dir."""
    save = str(tmp_path)
    rm = run("launch.py", "train_reward", "test", "testrm", "--save_dir", f"{save}/train_reward")
    assert rm.returncode == 0, rm.stderr
    trained_reward_model = f"{save}/train_reward/testrm"
    policy = run("launch.py", "train_policy", "test", "testpolicy", "--rewards.trained_model", trained_reward_model,
                 "--rewards.train_new_model", "off", "--save_dir", f"{save}/train_policy")
    assert policy.returncode == 0, policy.stderr
    both = run("launch.py", "train_policy", "test", "testboth", "--save_dir", f"{save}/train_policy")
    assert both.returncode == 0, both.stderr
    assert (tmp_path / "train_policy" / "testboth" / "reward_model" / "checkpoints" / "latest").exists()
    out = run("sample.py", "sample", "--save_dir", f"{save}/train_policy/testpolicy", "--savescope", "policy",
              "--mpi", "1", "--nsamples", "5", "--seed", "3")
    assert out.returncode == 0, out.stderr
    blocks = out.stdout.split("=" * 80 + "\n")[1:]
    assert len(blocks) == 5 and all(len(b.splitlines()) == 2 for b in blocks)


def test_two_ranks_match_one_rank_for_reward_training(tmp_path):
    """Same global batch, one shared permutation: 2 ranks end with the 1-rank weights."""
    gen = torch.Generator().manual_seed(0)
    records = [{"query": torch.randint(0, 27, (2,), generator=gen).tolist(),
                **{f"sample{i}": torch.randint(0, 27, (3,), generator=gen).tolist() for i in range(4)},
                "best": int(torch.randint(0, 4, (), generator=gen))} for _ in range(48)]
    (tmp_path / "labels.json").write_text(json.dumps(records))
    common = ["train_reward", "test", "rm", "--normalize_before", "off", "--normalize_after", "off",
              "--labels.source", str(tmp_path / "labels.json")]
    for ranks in ("1", "2"):
        done = run("launch.py", *common, "--lr", "1e-2", "--mpi", ranks, "--save_dir", str(tmp_path / ranks))
        assert done.returncode == 0, done.stderr
    one, two = (load_file(tmp_path / r / "rm" / "reward_model" / "checkpoints" / "model-0000006.safetensors")
                for r in ("1", "2"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    initial = run("launch.py", *common, "--lr", "0", "--save_dir", str(tmp_path / "0"))
    assert initial.returncode == 0, initial.stderr
    untrained = load_file(tmp_path / "0" / "rm" / "reward_model" / "checkpoints" / "model-0000006.safetensors")
    assert (one["heads.reward.weight"] - untrained["heads.reward.weight"]).abs().max() > 1e-3  # it did train


def test_two_ranks_train_policy_and_sample(tmp_path):
    done = run("launch.py", "train_policy", "test", "p", "--mpi", "2", "--save_dir", str(tmp_path),
               "--ppo.total_episodes", "64")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p" / "policy" / "checkpoints" / "model-0000004.safetensors").exists()
    out = run("sample.py", "sample", "--save_dir", str(tmp_path / "p"), "--mpi", "2", "--nsamples", "6")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("=" * 80) == 6


FAILING = """
import sys
from lm_human_preferences.cli import main as cli
from lm_human_preferences.training import train_reward
from lm_human_preferences.utils import distributed

original = train_reward.RewardModelTrainer.train

def failing(self, *args, **kwargs):
    if distributed.rank() == 1:
        raise RuntimeError("injected failure on rank 1")
    return original(self, *args, **kwargs)

train_reward.RewardModelTrainer.train = failing

if __name__ == "__main__":
    sys.exit(cli.main("launch", sys.argv[1:]))
"""


def test_a_failing_rank_stops_every_rank(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    done = subprocess.run([sys.executable, str(script), "train_reward", "test", "x", "--mpi", "2",
                           "--save_dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1  # every rank stopped: the 120 s timeout above did not fire
    assert "injected failure on rank 1" in done.stderr
    assert "error: rank 1 failed" in done.stderr


def test_train_new_model_tasks_must_match_when_set_directly():
    hp = experiments.get("train_policy", "test")
    hp.task.query_length = 3
    with pytest.raises(UserError, match="differs from task in query_length"):
        hp.validate()


def test_the_rank_that_failed_first_is_named(tmp_path, capsys):
    """Once one rank fails, the others fail in their collectives; the earliest report names the cause."""
    (tmp_path / "0").write_text(json.dumps({"time_ns": 2000, "trace": "RuntimeError: connection closed by peer"}))
    (tmp_path / "1").write_text(json.dumps({"time_ns": 1000, "trace": "RuntimeError: the real cause"}))
    processes = [SimpleNamespace(exitcode=1), SimpleNamespace(exitcode=1)]
    error = distributed._failure(processes, 0, str(tmp_path))
    assert str(error) == "rank 1 failed with the error above; the other ranks were stopped"
    assert "the real cause" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    stopped = distributed._failure([SimpleNamespace(exitcode=143), SimpleNamespace(exitcode=143)], 1,
                                   str(tmp_path / "empty"))
    assert isinstance(stopped, Stopped) and stopped.signum == 15
