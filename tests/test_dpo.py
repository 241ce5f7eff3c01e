"""DPO (training/dpo.py, training/train_dpo.py): its losses by hand, its log-probabilities of
truncated responses, a short run on labels of a learnable rule, and the command line."""

import json
import math
import os
import random
import signal

import pytest
import torch
import torch.nn.functional as F

from lm_human_preferences import experiments
from lm_human_preferences.cli import main as cli
from lm_human_preferences.evaluation import report
from lm_human_preferences.labeling import label_types
from lm_human_preferences.task.policy import load_policy
from lm_human_preferences.training import dpo, train_dpo, train_reward
from lm_human_preferences.utils.errors import Stopped, UserError

PADDING = 27  # the test encoding's


def synthetic_labels(path, n: int, seed: int = 0) -> str:
    """Best-of-4 labels of the `test` experiment's task (2-token queries, 3-token responses) from a
    rule the test model can learn: the response with the most 'a's (token 0) is best. A quarter of
    the responses are truncated (padding after their first token), as a task's truncation leaves them."""
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        samples = []
        for _ in range(4):
            share = rng.random()
            tokens = [0 if rng.random() < share else rng.randrange(1, 27) for _ in range(3)]
            samples.append(tokens[:1] + [PADDING] * 2 if rng.random() < 0.25 else tokens)
        counts = [s.count(0) for s in samples]
        if counts.count(max(counts)) == 1:
            records.append({"query": [rng.randrange(27) for _ in range(2)],
                            **{f"sample{i}": s for i, s in enumerate(samples)}, "best": counts.index(max(counts))})
    path.write_text(json.dumps(records))
    return str(path)


# -- the losses


def test_the_pairwise_loss_equals_the_best_of_2_loss():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(16, 2, generator=generator, requires_grad=True)
    best = torch.randint(0, 2, (16,), generator=generator)
    pairwise, stats = dpo.loss("pairwise", rewards, best)
    (grad_pairwise,) = torch.autograd.grad(pairwise, rewards)
    best_of_2, stats_of_2 = dpo.loss("best_of_n", rewards, best)
    (grad_best_of_2,) = torch.autograd.grad(best_of_2, rewards)
    torch.testing.assert_close(pairwise, best_of_2)
    torch.testing.assert_close(grad_pairwise, grad_best_of_2)
    torch.testing.assert_close(stats, stats_of_2)


def test_the_losses_by_hand():
    # Implicit rewards β·(log π − log π_ref) = log 1, log 2, log 3, log 4: softmax 0.1, 0.2, 0.3, 0.4.
    beta = 0.5
    ref = torch.tensor([[-3.0, -1.0, 0.5, 2.0]])
    logprobs = ref + torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]])) / beta
    rewards = dpo.implicit_rewards(logprobs, ref, beta)
    torch.testing.assert_close(rewards, torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]])))
    best = torch.tensor([2])
    value, stats = dpo.loss("best_of_n", rewards, best)
    assert value.item() == pytest.approx(-math.log(0.3))
    # the best (reward log 3) against log 1, log 2 and log 4: −log σ(log(3/x)) = log(1 + x/3)
    pairwise, _ = dpo.loss("pairwise", rewards, best)
    assert pairwise.item() == pytest.approx((math.log(4 / 3) + math.log(5 / 3) + math.log(7 / 3)) / 3)
    assert stats["accuracy"].item() == 0.0  # log 4 is higher
    assert stats["chosen_reward"].item() == pytest.approx(math.log(3))
    assert stats["rejected_reward"].item() == pytest.approx(math.log(8) / 3)
    assert stats["margin"].item() == pytest.approx(math.log(3) - math.log(8) / 3)


def test_the_best_of_n_gradient_is_that_of_the_plain_formula():
    generator = torch.Generator().manual_seed(1)
    logprobs = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    ref = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    best = torch.tensor([0, 3, 1, 1, 2])
    beta = 0.3

    mine = logprobs.clone().requires_grad_(True)
    value, _ = dpo.loss("best_of_n", dpo.implicit_rewards(mine, ref, beta), best)
    value.backward()

    plain = logprobs.clone().requires_grad_(True)
    r = beta * (plain - ref)
    chosen = r[torch.arange(5), best]
    (-(torch.log(torch.exp(chosen) / torch.exp(r).sum(1))).mean()).backward()
    torch.testing.assert_close(mine.grad, plain.grad.float().double(), atol=1e-6, rtol=1e-5)
    # and by hand: β · (softmax − one-hot) / records
    by_hand = beta * (torch.softmax(beta * (logprobs - ref), 1) - F.one_hot(best, 4)) / 5
    torch.testing.assert_close(mine.grad, by_hand, atol=1e-6, rtol=1e-5)


def test_response_logprobs_end_where_the_response_does():
    task = experiments.tiny_task()
    policy = load_policy("test", task)
    queries = torch.tensor([[3, 4], [5, 6]])
    truncated = torch.tensor([[0, PADDING, PADDING], [7, 8, PADDING]])
    whole = policy.analyze_responses(queries, torch.tensor([[0, 1, 2], [7, 8, 9]]), entropies=False)["logprobs"]
    expected = torch.stack([whole[0, :1].sum(), whole[1, :2].sum()])
    torch.testing.assert_close(dpo.response_logprobs(policy, queries, truncated), expected)


# -- the trainer


def dpo_hparams(tmp_path, **overrides) -> train_dpo.HParams:
    hp = experiments.get("train_dpo", "test")
    hp.labels.source = synthetic_labels(tmp_path / "labels.json", 80)
    hp.labels.num_train = 64
    hp.run.log_interval = 100
    hp.override_from_dict(overrides)
    return hp


def margins(hp: train_dpo.HParams, policy) -> torch.Tensor:
    """The chosen response's implicit reward less the mean of the others', per training record."""
    labels, _ = train_reward.load_labels(hp, policy.encoding, hp.labels.source)
    trainer = train_dpo.DPOTrainer(policy, load_policy("test", hp.task), hp)
    with torch.no_grad():
        rewards = trainer.rewards_of(labels)
    best = trainer.best_of(labels).long()
    chosen = rewards.gather(1, best[:, None]).squeeze(1)
    return chosen - (rewards.sum(1) - chosen) / 3


def test_a_short_run_raises_the_chosen_responses_margin(tmp_path):
    hp = dpo_hparams(tmp_path, run={"save_dir": str(tmp_path / "run")})
    assert torch.equal(margins(hp, load_policy("test", hp.task)), torch.zeros(64))  # π = π_ref at first
    policy, summary = train_dpo.train(hp)
    assert margins(hp, policy).mean() > 0
    assert 0 < summary["heldout"]["count"] <= 16 and summary["heldout"]["chance"] == 0.25
    run = tmp_path / "run"
    for name in ("train_dpo_hparams.json", "train_dpo_summary.json", "samples.json", "policy/checkpoints/latest",
                 "resume/policy/latest", "tb/dpo"):
        assert (run / name).exists(), name
    assert json.loads((run / "resume/policy" / (run / "resume/policy/latest").read_text()).read_text())["finished"]
    page = report.write_report(run).read_text()
    assert "<h2>DPO</h2>" in page and "Held-out labels (the implicit reward)" in page and "<h2>PPO</h2>" not in page
    assert (run / "report" / "dpo_margin.png").exists()
    assert cli.main("sample", ["sample", "--save_dir", str(run), "--nsamples", "2", "--seed", "1"]) == 0


def test_a_run_stopped_by_sigterm_resumes_exactly(tmp_path, monkeypatch):
    """As PPO's (test_faults.py, which also kills a DPO run on two ranks): the resumed run ends
    with the very weights of a run never stopped."""
    straight, _ = train_dpo.train(dpo_hparams(tmp_path, run={"save_dir": str(tmp_path / "straight")}))
    accumulate_gradients = train_dpo.DPOTrainer.accumulate_gradients

    def signalled(self, batch):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return accumulate_gradients(self, batch)

    monkeypatch.setattr(train_dpo.DPOTrainer, "accumulate_gradients", signalled)
    with pytest.raises(Stopped, match="stopped by SIGTERM after DPO batch 4; rerun the same command to resume"):
        train_dpo.train(dpo_hparams(tmp_path, run={"save_dir": str(tmp_path / "stopped")}))
    monkeypatch.undo()
    resumed, _ = train_dpo.train(dpo_hparams(tmp_path, run={"save_dir": str(tmp_path / "stopped")}))
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_finished_run_is_not_trained_again(tmp_path):
    hp = dpo_hparams(tmp_path, run={"save_dir": str(tmp_path / "run")})
    train_dpo.train(hp)
    with pytest.raises(UserError, match="holds a DPO run that finished"):
        train_dpo.train(dpo_hparams(tmp_path, run={"save_dir": str(tmp_path / "run")}))


@pytest.mark.parametrize("overrides, message", [
    (dict(labels={"type": "scalar_rating"}), "DPO learns from best-of-N labels"),
    (dict(loss="hinge"), "loss must be one of pairwise, best_of_n"),
    (dict(beta=0.0), "beta must be a positive number"),
    (dict(labels={"num_train": 60}), "num_train=60 is not divisible by batch_size=8"),
])
def test_bad_configurations(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train_dpo.train(dpo_hparams(tmp_path, **overrides))


def test_launch_dry_run(capsys):
    assert cli.main("launch", ["train_dpo", "mock_sentiment", "x", "--dry_run", "--beta", "0.3",
                               "--loss", "best_of_n"]) == 0
    printed = capsys.readouterr().out
    hp, _ = json.JSONDecoder().raw_decode(printed[printed.index("{"):])  # the plan follows the hparams
    assert "DPO:" in printed and "batches of 64" in printed
    assert hp["beta"] == 0.3 and hp["loss"] == "best_of_n" and hp["labels"]["source"] == "mock:sentiment"
    assert hp["labels"] == experiments.get("train_reward", "mock_sentiment").labels.to_nested_dict()


def test_every_dpo_experiment_validates():
    for name in experiments.TRAIN_DPO:
        hp = experiments.get("train_dpo", name)
        assert isinstance(label_types.get(hp.labels.type), label_types.BestOfN)
        assert hp.labels.num_train % hp.batch_size == 0, name

