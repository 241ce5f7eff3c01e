import json

import pytest
import torch
from safetensors.torch import load_file

from lm_human_preferences.training import train_policy, train_reward
from lm_human_preferences.language import trained_models
from lm_human_preferences.utils.errors import UserError
from lm_human_preferences.utils.tf_adam import TFAdam

TASK = {"query_length": 2, "query_dataset": "test", "response_length": 3,
        "policy": {"initial_model": "test", "temperature": 1.0}}


def reward_hparams(**overrides):
    hp = train_reward.HParams()
    hp.override_from_dict({"task": TASK, "labels": {"type": "best_of_4", "num_train": 16, "source": "test"},
                           "batch_size": 8, "rollout_batch_size": 8, "normalize_before": True,
                           "normalize_after": True, "normalize_samples": 8, "run": {"seed": 1}})
    hp.override_from_dict(overrides)
    return hp


def policy_hparams(tmp_path=None, **overrides):
    hp = train_policy.HParams()
    hp.override_from_dict({"task": TASK, "ppo": {"total_episodes": 32, "batch_size": 8, "lr": 1e-3},
                           "run": {"seed": 1, "save_dir": str(tmp_path / "policy") if tmp_path else None,
                                   "log_interval": 1}})
    hp.override_from_dict(overrides)
    return hp


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    save = tmp_path_factory.mktemp("rm")
    hp = reward_hparams(run={"save_dir": str(save)})
    train_reward.train(hp)
    return str(save)


def test_defaults(tmp_path, reward_dir, capsys):
    hp = policy_hparams(tmp_path, rewards={"trained_model": reward_dir})
    _, summary = train_policy.train(hp)
    last = summary["last"]
    for name in ["objective/kl", "objective/kl_coef", "objective/entropy", "objective/score", "objective/score_total",
                 "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy", "ppo/policy/approxkl",
                 "ppo/policy/clipfrac", "ppo/returns/mean", "ppo/returns/var", "ppo/val/vpred", "ppo/val/error",
                 "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var", "ppo/val/var_explained", "elapsed/updates",
                 "elapsed/steps/serial", "elapsed/steps/total", "elapsed/episodes", "elapsed/fps", "elapsed/time"]:
        assert torch.isfinite(torch.tensor(last[name])), name
    assert last["elapsed/updates"] == 4 and last["elapsed/episodes"] == 32
    assert last["objective/kl_coef"] == 0.2
    assert summary["first"]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy starts as the reference
    assert last["ppo/val/var_explained"] == pytest.approx(1 - last["ppo/val/error"] / last["ppo/returns/var"])
    out = capsys.readouterr().out
    assert "  score = " in out and "  kl = " in out and "  total = " in out and "[ppo_step 0]" in out


def test_truncation(tmp_path, reward_dir):
    task = {**TASK, "truncate_token": 26, "truncate_after": 1, "penalty_reward_value": -7.0}
    hp = policy_hparams(tmp_path, task=task, rewards={"trained_model": reward_dir})
    _, summary = train_policy.train(hp)
    # the untrained test model rarely emits '.', so most rollouts get the penalty
    assert summary["first"]["objective/score"] < -3


def test_prefix_and_suffix(tmp_path, reward_dir):
    hp = policy_hparams(tmp_path, task={**TASK, "query_prefix": "a", "query_suffix": "b"},
                        rewards={"trained_model": reward_dir})
    policy, summary = train_policy.train(hp)
    assert torch.isfinite(torch.tensor(summary["last"]["ppo/loss/total"]))
    # The policy sees encode('a') + query + encode('b') (ids 0 and 1), then the response.
    queries, responses = torch.tensor([[7, 8], [9, 27]]), torch.tensor([[4, 5, 6], [10, 11, 12]])  # 27 pads
    context = torch.cat([torch.zeros(2, 1, dtype=torch.long), queries, torch.ones(2, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = policy.model(torch.cat([context, responses], dim=1), 27).logits[:, 3:-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0]
    got = policy.analyze_responses(queries, responses)["logprobs"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the prefix matters: without it the numbers differ
        bare = policy.model(torch.cat([queries, responses], dim=1), 27).logits[:, 1:-1].float()
    assert not torch.allclose(torch.log_softmax(bare, -1).gather(-1, responses[..., None])[..., 0], expected)


def test_learning_rate_schedules(tmp_path, reward_dir, monkeypatch):
    """PPO: lr · (1 − update / total_updates); reward model: lr · (1 − records done / all passes' records)."""
    seen, original = [], TFAdam.set_lr

    def recording(self, lr: float) -> None:
        seen.append(lr)
        original(self, lr)

    monkeypatch.setattr(TFAdam, "set_lr", recording)
    train_policy.train(policy_hparams(tmp_path, rewards={"trained_model": reward_dir}))  # 4 updates of 8
    assert seen == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    seen.clear()
    train_reward.train(reward_hparams(lr=0.01, epochs=2))  # 2 passes over 16 labels, batches of 8
    assert seen == pytest.approx([0.01, 0.0075, 0.005, 0.0025])


def test_adaptive_kl(tmp_path, reward_dir):
    hp = policy_hparams(tmp_path, rewards={"trained_model": reward_dir, "kl_coef": 0.15,
                                           "adaptive_kl": {"target": 6.0, "horizon": 100}})
    _, summary = train_policy.train(hp)
    expected = 0.15
    for stats in summary["history"]:
        assert stats["objective/kl_coef"] == pytest.approx(expected, rel=1e-9)
        expected *= 1 + min(max(stats["objective/kl"] / 6.0 - 1, -0.2), 0.2) * 8 / 100
    assert summary["last"]["objective/kl_coef"] < 0.15  # KL stays below target early on, so the coef falls


def test_save_and_reload(tmp_path, reward_dir):
    hp = policy_hparams(tmp_path, rewards={"trained_model": reward_dir}, run={"save_interval": 3})
    policy, _ = train_policy.train(hp)
    folder = tmp_path / "policy"
    assert train_policy.HParams.from_json((folder / "train_policy_hparams.json").read_text()) == hp
    assert sorted(p.name for p in (folder / "policy" / "checkpoints").glob("*.safetensors")) == \
        ["model-0000003.safetensors", "model-0000004.safetensors"]
    assert json.loads((folder / "policy" / "encoding").read_text()) == "test"
    assert list((folder / "tb" / "ppo").glob("events.out.tfevents.*"))
    reloaded, _ = trained_models.load_initial(str(folder / "policy"), heads=("value",))
    for key, value in policy.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)
    assert "heads.value.weight" in load_file(folder / "policy" / "checkpoints" / "model-0000004.safetensors")


def test_train_new_model(tmp_path):
    hp = policy_hparams(tmp_path)
    hp.rewards.train_new_model = reward_hparams()
    _, summary = train_policy.train(hp)
    save = tmp_path / "policy"
    assert (save / "train_reward_hparams.json").exists() and (save / "train_policy_hparams.json").exists()
    assert (save / "reward_model" / "checkpoints" / "latest").exists()
    assert list((save / "tb" / "reward_model").glob("events.*")) and list((save / "tb" / "ppo").glob("events.*"))
    assert summary["last"]["elapsed/updates"] == 4


def test_chunked_computation_equals_unsplit(reward_dir):
    """Chunked sampling/scoring and micro-batched gradients give the same training, up to rounding."""
    results = []
    for chunk in (None, 3):
        hp = policy_hparams(rewards={"trained_model": reward_dir}, run={"chunk_size": chunk},
                            ppo={"batch_size": 16, "nminibatches": 2, "total_episodes": 32, "whiten_rewards": False})
        policy, summary = train_policy.train(hp)
        results.append((policy.model.state_dict(), summary["last"]))
    for key, value in results[0][0].items():
        torch.testing.assert_close(results[1][0][key], value, atol=1e-5, rtol=1e-4)
    for key in ("objective/score", "objective/kl", "ppo/loss/total", "ppo/val/var_explained"):
        assert results[1][1][key] == pytest.approx(results[0][1][key], rel=1e-4, abs=1e-5)


def test_learns_a_programmatic_reward():
    """Reward = 5 × fraction of 'a' tokens: PPO must raise it within a few dozen updates."""
    hp = policy_hparams(task={**TASK, "response_length": 5, "start_text": None},
                        rewards={"trained_model": "unused", "kl_coef": 0.01},
                        ppo={"total_episodes": 64 * 30, "batch_size": 64, "lr": 3e-3, "nminibatches": 2},
                        run={"log_interval": 100})

    def fraction_of_a(queries, responses):
        return 5.0 * (responses == 0).float().mean(1)

    _, summary = train_policy.train(hp, reward_fn=fraction_of_a)
    history = summary["history"]
    before = sum(h["objective/score"] for h in history[:3]) / 3
    after = sum(h["objective/score"] for h in history[-3:]) / 3
    print(f"learning test: score {before:.3f} -> {after:.3f}, final kl {history[-1]['objective/kl']:.3f}")
    assert before < 0.5  # 1/27 of tokens are 'a' at first: about 0.19
    assert after > 2.5
    assert all(torch.isfinite(torch.tensor(h["objective/kl"])) for h in history)
    assert history[-1]["objective/kl"] < 20


@pytest.mark.parametrize("overrides, message", [
    (dict(), "set exactly one of rewards.trained_model"),
    (dict(rewards={"trained_model": "x", "train_new_model": {}}), "set exactly one of"),
    (dict(rewards={"trained_model": "x"}, ppo={"batch_size": 8, "nminibatches": 2}), "whitening needs at least 8"),
    (dict(rewards={"trained_model": "x"}, ppo={"batch_size": 12, "nminibatches": 8}), "must be divisible by ranks"),
    (dict(rewards={"trained_model": "x", "adaptive_kl": {"horizon": 10}}), "needs a positive target"),
    (dict(rewards={"trained_model": "/nonexistent/rm"}), "no reward model here"),
])
def test_bad_configurations(overrides, message):
    with pytest.raises(UserError, match=message):
        train_policy.train(policy_hparams(**overrides))


def test_train_new_model_task_must_match():
    hp = policy_hparams()
    hp.rewards.train_new_model = reward_hparams(task={"query_length": 3})
    with pytest.raises(UserError, match="train_new_model.task differs from task in query_length"):
        train_policy.train(hp)


def test_a_crash_keeps_the_policy_trained_so_far(tmp_path):
    calls = []

    def flaky_reward(queries, responses):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("reward server went away")
        return torch.zeros(len(responses))

    hp = policy_hparams(tmp_path, rewards={"trained_model": "unused"})
    with pytest.raises(RuntimeError, match="went away"):
        train_policy.train(hp, reward_fn=flaky_reward)
    checkpoints = tmp_path / "policy" / "policy" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "model-0000002.safetensors"
    assert (checkpoints / "model-0000002.safetensors").exists()
