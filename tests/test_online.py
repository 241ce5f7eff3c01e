"""Online training: label rounds on the current policy's samples, a reward model trained further
every round, runs that resume, and people labelling through the app while the run waits."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_human_preferences import experiments
from lm_human_preferences.cli import main as cli
from lm_human_preferences.evaluation import report
from lm_human_preferences.training import online, train_policy
from lm_human_preferences.labeling import collect, mock_labelers, sources
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task import rewards
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.utils import save_folders
from lm_human_preferences.utils.errors import UserError

FAULT_RUN = Path(__file__).with_name("fault_run.py")
SEED = 3
# mock_descriptiveness shortened: a budget of 96 labels in batches of 16, 6 PPO updates of 16
# episodes, a round every 2 updates: rounds before updates 0, 2 and 4 with 48, 80 and 96 labels.
SHORT = ["--rewards.online", "on", "--rewards.train_new_model.labels.num_train", "96",
         "--rewards.train_new_model.batch_size", "16", "--rewards.train_new_model.normalize_samples", "32",
         "--rewards.train_new_model.rollout_batch_size", "32", "--ppo.batch_size", "16", "--ppo.total_episodes", "96",
         "--ppo.lr", "5e-4", "--rewards.online.interval", "32", "--run.log_interval", "100", "--run.seed", str(SEED)]


def short(**values: str) -> list[str]:
    """SHORT with some of its flags given other values (a flag may be given once)."""
    flags = list(SHORT)
    for key, value in values.items():
        flags[flags.index(f"--{key}") + 1] = value
    return flags


# The module's straight and killed runs rescale kl_coef at every round (a resume must restore it).
RESCALED = ["--rewards.online.rescale_kl_coef", "on"]


def launch(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FAULT", None)
    if fault:
        env["FAULT"] = fault
    return subprocess.run([sys.executable, str(FAULT_RUN), *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """One online run of the shortened mock_descriptiveness, start to end."""
    root = tmp_path_factory.mktemp("online")
    done = launch(["train_policy", "mock_descriptiveness", "straight", "--save_dir", str(root), *SHORT, *RESCALED])
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "straight"


def key(record: dict) -> tuple:
    return tuple(record["query"]), tuple(tuple(record[f"sample{k}"]) for k in range(4))


def policy_at(run_dir: Path, checkpoint: str | None) -> Policy:
    """The initial policy, or the policy saved at `checkpoint` of the run."""
    task = experiments.kjv_task()
    model, encoding_name = trained_models.load_initial(task.policy.initial_model, heads=("value",))
    if checkpoint is not None:
        trained_models.load_into(model, trained_models.load_file(run_dir / "policy", checkpoint).tensors, checkpoint)
    return Policy(model.eval(), encodings.get(encoding_name), task)


@torch.no_grad()
def first_questions(policy: Policy, summary: dict) -> list[dict]:
    """What a round's first ask was: its queries and the round's seed, answered by `policy`."""
    new = summary["new_labels"]
    queries = online.LabelQueries(experiments.kjv_task(), policy.encoding, "cpu", summary["first_query"])
    generator = torch.Generator().manual_seed(online.round_seed(SEED, summary["round"]))
    asked = collect.ask(policy, experiments.kjv_task(), queries.take(max(128, new + sources.held_out_count(new))), 4,
                        generator, 512)
    return [collect.record(q, 0) for q in asked]


def schedule(hp: train_policy.HParams) -> list[online.Round]:
    return online.schedule(hp.rewards.online, hp.rewards.train_new_model, hp.ppo)


def test_schedule_is_front_loaded_and_offline_by_default():
    for name in experiments.TRAIN_POLICY:
        assert experiments.get("train_policy", name).rewards.online is None
    hp = experiments.get("train_policy", "mock_descriptiveness")
    hp.override_from_str("rewards.online", "on")
    rounds = schedule(hp)
    assert [r.update for r in rounds] == [0, 20, 40, 60, 80]  # K = a fifth of the 100 updates
    assert [r.labels for r in rounds] == [1024, 1536, 1760, 1920, 2048]  # 2048 · (½ + ½ √(k/4)), whole batches
    new = [b.labels - a.labels for a, b in zip(rounds, rounds[1:])]
    assert new == sorted(new, reverse=True) and all(n % 32 == 0 for n in new)
    hp.override_from_str("rewards.online.initial_share", "1")
    assert [(r.update, r.labels) for r in schedule(hp)] == [(0, 2048)]  # everything up front: offline
    hp.override_from_str("rewards.online.initial_share", "0.5")
    hp.override_from_str("rewards.online.interval", "6400")
    assert [(r.update, r.labels) for r in schedule(hp)] == [(0, 2048)]


@pytest.mark.parametrize("flags, message", [
    (["--rewards.online.interval", "100"], "whole number of PPO batches"),
    (["--rewards.train_new_model.labels.source", "labels.json"], "collects its own labels"),
    (["--rewards.train_new_model.labels.source", "app:http"], "a port"),
    (["--rewards.online.initial_share", "0"], "initial_share"),
    (["--rewards.online.normalize_on", "final"], "normalize_on must be one of current, initial"),
])
def test_online_hparams_are_checked(flags, message, capsys):
    args = ["train_policy", "mock_descriptiveness", "x", "--rewards.online", "on", *flags, "--dry_run"]
    assert cli.main("launch", args) == 1
    assert message in capsys.readouterr().err


def test_rounds_label_the_current_policy_and_retrain_the_reward_model(straight):
    rounds = json.loads((straight / save_folders.ONLINE_SUMMARY).read_text())
    assert [(r["round"], r["update"], r["labels"]) for r in rounds] == [(0, 0, 48), (1, 2, 80), (2, 4, 96)]
    train = json.loads((straight / save_folders.LABELS).read_text())
    heldout = json.loads((straight / save_folders.HELDOUT_LABELS).read_text())
    assert len(train) == 96 and len(heldout) == 12 + 8 + 4
    assert set(train[0]) == {"query", "sample0", "sample1", "sample2", "sample3", "best"}
    initial = policy_at(straight, None)
    for previous, summary in zip(rounds, rounds[1:]):
        assert summary["policy_checkpoint"] == trained_models.checkpoint_name(summary["update"])
        records = train[previous["labels"]:summary["labels"]]
        current = first_questions(policy_at(straight, summary["policy_checkpoint"]), summary)
        before = first_questions(initial, summary)
        current_keys, before_keys = {key(r) for r in current}, {key(r) for r in before}
        # the round's labels are on the policy's samples at that update, not on the initial policy's
        assert key(records[0]) in current_keys
        assert sum(key(r) in current_keys for r in records) > sum(key(r) in before_keys for r in records)
        assert "accuracy" in summary["previous_accuracy"] and summary["heldout"]["count"] == summary["heldout_labels"]
    # by the last round the policy's samples differ from the initial policy's on most queries
    differ = sum(key(a) != key(b) for a, b in zip(current, before)) / len(current)
    assert differ > 0.3
    # the reward model was trained every round: its weights changed from round to round
    checkpoints = straight / "reward_model" / "checkpoints"
    weights = [load_file(checkpoints / trained_models.checkpoint_name(r["round"])) for r in rounds]
    for a, b in zip(weights, weights[1:]):
        assert not torch.equal(a["heads.reward.weight"], b["heads.reward.weight"])
        assert not torch.equal(a["h.0.attn.c_attn.weight"], b["h.0.attn.c_attn.weight"])
    assert all(r["train"]["train/loss"] > 0 for r in rounds)
    mock = json.loads((straight / "mock_summary.json").read_text())  # the demo's verdict ran
    assert mock["labeler"] == "descriptiveness" and mock["heldout_count"] == 24 and 0 <= mock["win_rate"] <= 1


def test_a_killed_run_resumes_exactly(straight):
    root = straight.parent
    killed = launch(["train_policy", "mock_descriptiveness", "killed", "--save_dir", str(root), *SHORT, *RESCALED],
                    fault="kill:3:policy")
    assert killed.returncode != 0
    state = json.loads((root / "killed" / "resume" / "reward_model" / "state-0000001.json").read_text())
    assert state["meta"]["extra"]["online"]["train"] == 80  # rounds 0 and 1 were done
    resumed = launch(["train_policy", "mock_descriptiveness", "killed", "--save_dir", str(root), *SHORT, *RESCALED])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "online: 2 label rounds done, PPO at update 2 of 6" in resumed.stdout
    for name in (save_folders.LABELS, save_folders.HELDOUT_LABELS):
        assert (straight / name).read_bytes() == (root / "killed" / name).read_bytes()
    for scope in ("policy", "reward_model"):
        final = [load_file(d / scope / "checkpoints" / (d / scope / "checkpoints" / "latest").read_text().strip())
                 for d in (straight, root / "killed")]
        assert final[0].keys() == final[1].keys()
        assert all(torch.equal(final[0][k], final[1][k]) for k in final[0]), scope
    # PPO's state was saved before round 1 rescaled kl_coef: the resumed run took it from the round
    coefs = [report.read_scalars(d / save_folders.TENSORBOARD / save_folders.PPO_LOG, [], "")["objective/kl_coef"]
             for d in (straight, root / "killed")]
    assert coefs[0] == coefs[1] and len(coefs[0]) == 6


def test_rounds_rescale_kl_coef_by_the_reward_models_change_of_spread(straight):
    """`rescale_kl_coef`: a round multiplies kl_coef by the new reward model's std over the old
    one's, both on every response of the round's new labels (recomputed here from the saved
    reward models and labels); PPO's next update uses the rescaled coefficient."""
    rounds = json.loads((straight / save_folders.ONLINE_SUMMARY).read_text())
    train = json.loads((straight / save_folders.LABELS).read_text())
    heldout = json.loads((straight / save_folders.HELDOUT_LABELS).read_text())
    scalars = report.read_scalars(straight / save_folders.TENSORBOARD / save_folders.PPO_LOG, [], "")
    coef, kl = scalars["objective/kl_coef"], scalars["objective/kl"]
    reward_model = rewards.load_trained(str(straight)).eval()
    target, horizon, batch = 6.0, 10000, 16  # mock_descriptiveness's controller, SHORT's PPO batch

    @torch.no_grad()
    def spread(checkpoint: str, records: list[dict]) -> float:
        reward_model.load_tensors(trained_models.load_file(straight / "reward_model", checkpoint).tensors)
        queries = torch.tensor([r["query"] for r in records for _ in range(4)])
        responses = torch.tensor([r[f"sample{k}"] for r in records for k in range(4)])
        return reward_model(queries, responses).std(unbiased=False).item()

    assert "reward_scale" not in rounds[0] and rounds[0]["kl_coef"] == pytest.approx(0.15)
    heldout_start = rounds[0]["heldout_labels"]
    for previous, summary in zip(rounds, rounds[1:]):
        records = train[previous["labels"]:summary["labels"]] + heldout[heldout_start:summary["heldout_labels"]]
        heldout_start = summary["heldout_labels"]
        scale = (spread(trained_models.checkpoint_name(summary["round"]), records)
                 / spread(trained_models.checkpoint_name(previous["round"]), records))
        assert summary["reward_scale"] == pytest.approx(scale, rel=1e-4)
        assert abs(scale - 1) > 0.01  # a change the test can see
        u = summary["update"]
        before = coef[u - 1] * (1 + min(max(kl[u - 1] / target - 1, -0.2), 0.2) * batch / horizon)
        assert summary["kl_coef"] == pytest.approx(before * scale, rel=1e-5)
        assert coef[u] == pytest.approx(summary["kl_coef"], rel=1e-6)


# -- people, through the labeling app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Person(threading.Thread):
    """Answers the app's questions over HTTP, the most descriptive response each time; with
    `stop_at`, sends SIGTERM to this process when shown question `stop_at` instead."""

    def __init__(self, port: int, stop_at: int | None = None):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/api/"
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        self.stop_at, self.done = stop_at, threading.Event()
        self.judge = mock_labelers.get("descriptiveness")

    def call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        with self.opener.open(request, timeout=10) as response:
            return json.loads(response.read())

    def run(self) -> None:
        while not self.done.is_set():
            try:
                question = self.call("state")["question"]
            except OSError:  # the app is not up yet, or gone
                time.sleep(0.2)
                continue
            if question is None:
                time.sleep(0.1)
            elif question["id"] == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            else:
                scores = [self.judge("", r["text"]) for r in question["responses"]]
                self.call("label", {"id": question["id"], "label": scores.index(max(scores))})


def test_people_label_through_the_app_and_a_stopped_wait_resumes(tmp_path, capsys):
    port = free_port()
    args = ["train_policy", "mock_descriptiveness", "people", "--save_dir", str(tmp_path),
            *short(**{"rewards.train_new_model.labels.num_train": "32", "ppo.total_episodes": "64"}),
            "--rewards.train_new_model.labels.source", f"app:{port}"]
    # rounds before updates 0 and 2, 16 + 4 questions each; SIGTERM while round 1 waits
    person = Person(port, stop_at=20)
    person.start()
    assert cli.main("launch", args) == 128 + signal.SIGTERM
    person.join(10)
    out, err = capsys.readouterr()
    assert "waiting for people: 0/20 questions answered at http://127.0.0.1" in out
    assert "stopped by SIGTERM while waiting for label round 1; rerun the same command to resume" in err
    person = Person(port)
    person.start()
    try:
        assert cli.main("launch", args) == 0
    finally:
        person.done.set()
    assert "online: 1 label rounds done, PPO at update 2 of 4" in capsys.readouterr().out
    run_dir = tmp_path / "people"
    rounds = json.loads((run_dir / save_folders.ONLINE_SUMMARY).read_text())
    assert [(r["update"], r["labels"], r["questions"]) for r in rounds] == [(0, 16, 20), (2, 32, 20)]
    asked = json.loads((run_dir / "app" / "labels.json.questions.json").read_text())["questions"]
    assert len(asked) == 40  # round 1's questions were kept across the stop, not asked again
    assert len(json.loads((run_dir / save_folders.LABELS).read_text())) == 32


def test_labels_from_people_need_a_save_folder():
    hp = experiments.get("train_policy", "mock_descriptiveness")
    hp.override_from_str("rewards.online", "on")
    hp.override_from_str("rewards.train_new_model.labels.source", "app:0")
    with pytest.raises(UserError, match="need a save folder"):
        train_policy.train_online(hp)


@pytest.mark.parametrize("normalize_on", ["current", "initial"])
def test_later_rounds_normalize_on_the_chosen_policy(tmp_path, monkeypatch, normalize_on):
    """Rounds after the first renormalize the reward model on samples of the current policy (a
    snapshot taken at the round), or with `normalize_on initial` on the initial policy's."""
    sampled_by = []
    real_normalize = online.train_reward.RewardModelTrainer.normalize

    def normalize(trainer, *args, **kwargs):
        sampled_by.append(trainer.policy)
        return real_normalize(trainer, *args, **kwargs)

    monkeypatch.setattr(online.train_reward.RewardModelTrainer, "normalize", normalize)
    args = ["train_policy", "mock_descriptiveness", "n", "--save_dir", str(tmp_path), *SHORT,
            "--rewards.online.normalize_on", normalize_on]
    assert cli.main("launch", args) == 0
    assert len(sampled_by) == 4  # round 0 before and after training; rounds 1 and 2 after it
    initial, later = sampled_by[0], sampled_by[2:]
    assert sampled_by[1] is initial
    if normalize_on == "initial":
        assert all(p is initial for p in later)
    else:  # a frozen snapshot of the policy, new each round
        assert all(p is not initial for p in later) and later[0] is not later[1]
        assert all(not any(t.requires_grad for t in p.model.parameters()) for p in later)
