import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lm_human_preferences.task import rewards
from lm_human_preferences.training import train_reward
from lm_human_preferences.language import trained_models
from lm_human_preferences.utils.errors import UserError


def hparams(tmp_path=None, **overrides) -> train_reward.HParams:
    hp = train_reward.HParams()
    hp.override_from_dict({
        "task": {"query_length": 3, "query_dataset": "test", "response_length": 4, "policy": {"initial_model": "test"}},
        "labels": {"type": "best_of_4", "num_train": 32, "source": "test"},
        "batch_size": 8, "rollout_batch_size": 4, "lr": 1e-3,
        "run": {"seed": 1, "save_dir": str(tmp_path / "save") if tmp_path else None},
    })
    hp.override_from_dict(overrides)
    return hp


def synthetic_labels(path, n, label_type="best_of_4", seed=0):
    """Labels from a rule the test model can learn: more 'a's (token 0) in a response is better."""
    rng = random.Random(seed)
    recs = []
    while len(recs) < n:
        query = [rng.randrange(26) for _ in range(3)]
        samples = []
        for _ in range(4 if label_type == "best_of_4" else 2):
            p = rng.random()
            samples.append([0 if rng.random() < p else rng.randrange(1, 27) for _ in range(4)])
        counts = [s.count(0) for s in samples]
        rec = {"query": query}
        if label_type == "best_of_4":
            if counts.count(max(counts)) > 1:
                continue
            rec.update({f"sample{i}": s for i, s in enumerate(samples)}, best=counts.index(max(counts)))
        elif label_type == "scalar_rating":
            rec.update(sample=samples[0], score=counts[0] / 2 + 1.0)
        else:
            rec.update(sample0=samples[0], sample1=samples[1], difference=float(counts[1] - counts[0]))
        recs.append(rec)
    path.write_text(json.dumps(recs))
    return str(path)


@pytest.mark.parametrize("label_type", ["best_of_4", "scalar_rating", "scalar_compare"])
def test_end_to_end_saves_the_layout(tmp_path, label_type):
    source = synthetic_labels(tmp_path / "labels.json", 48, label_type)
    hp = hparams(tmp_path, labels={"type": label_type, "source": source})
    _, summary = train_reward.train(hp)
    save = tmp_path / "save"
    assert train_reward.HParams.from_json((save / "train_reward_hparams.json").read_text()) == hp
    folder = save / "reward_model"
    assert json.loads((folder / "encoding").read_text()) == "test"
    assert json.loads((folder / "hparams.json").read_text())["n_embd"] == 7
    latest = (folder / "checkpoints" / "latest").read_text()
    assert latest == "model-0000004.safetensors"
    tensors = load_file(folder / "checkpoints" / latest)
    assert {"heads.reward.weight", "reward_norm.gain", "reward_norm.bias", "wte.weight"} <= set(tensors)
    assert list((save / "tb" / "reward_model").glob("events.out.tfevents.*"))
    saved_summary = json.loads((save / "train_reward_summary.json").read_text())
    assert saved_summary["heldout"]["count"] == summary["heldout"]["count"] > 0
    assert np.isfinite(summary["train"]["train/loss"])
    # reloading gives the same rewards as the trained model
    reloaded = rewards.load_trained(str(save))
    queries, responses = torch.tensor([[1, 2, 3]]), torch.tensor([[0, 0, 5, 27]])
    model, _ = trained_models.load_initial(str(folder), heads=("reward",))
    expected = tensors["reward_norm.gain"] * model(torch.cat([queries, responses], 1), 27).heads["reward"][:, -1] \
        + tensors["reward_norm.bias"]
    torch.testing.assert_close(reloaded(queries, responses), expected)


def test_normalize_before_hits_label_target(tmp_path):
    source = synthetic_labels(tmp_path / "labels.json", 32, "scalar_rating")
    hp = hparams(tmp_path, labels={"type": "scalar_rating", "source": source}, lr=0.0,
                 normalize_before=True, normalize_samples=8, debug_normalize=0)
    _, summary = train_reward.train(hp)
    scores = np.array([r["score"] for r in json.loads((tmp_path / "labels.json").read_text())])
    norm = summary["normalize_before"]
    assert norm["target_mean"] == pytest.approx(scores.mean())
    assert norm["target_std"] == pytest.approx(scores.std())
    assert norm["gain"] == pytest.approx(norm["target_std"] / norm["std_before"], rel=1e-5)
    assert norm["bias"] == pytest.approx(norm["target_mean"] - norm["gain"] * norm["mean_before"], rel=1e-4, abs=1e-5)
    assert "normalize_after" not in summary


def test_normalize_before_and_after(tmp_path):
    hp = hparams(tmp_path, normalize_before=True, normalize_after=True, normalize_samples=8, debug_normalize=8)
    _, summary = train_reward.train(hp)
    assert summary["normalize_before"]["target_mean"] == 0 and summary["normalize_before"]["target_std"] == 1
    after = summary["normalize_after"]
    tensors = load_file(tmp_path / "save" / "reward_model" / "checkpoints" / "model-0000004.safetensors")
    assert tensors["reward_norm.gain"].item() == pytest.approx(after["gain"])
    assert tensors["reward_norm.bias"].item() == pytest.approx(after["bias"])
    assert {"mean_after", "std_after"} <= set(after)


def test_set_norm_reaches_target_on_fixed_sample():
    model, _ = trained_models.load_initial("test", heads=("reward",))
    from lm_human_preferences.language import encodings

    rm = rewards.RewardModel(model, encodings.get("test"))
    gen = torch.Generator().manual_seed(0)
    queries = torch.randint(0, 27, (64, 3), generator=gen)
    responses = torch.randint(0, 27, (64, 4), generator=gen)
    with torch.no_grad():
        mean, std = rewards.reward_stats(rm(queries, responses))
        rm.set_norm(mean, std, target_mean=2.0, target_std=3.0)
        after = rm(queries, responses)
    assert after.mean().item() == pytest.approx(2.0, abs=1e-5)
    assert after.std(unbiased=False).item() == pytest.approx(3.0, rel=1e-5)
    with pytest.raises(UserError, match="std over the samples is 0"):
        rm.set_norm(1.0, 0.0, 0.0, 1.0)


def test_learns_a_learnable_rule(tmp_path):
    source = synthetic_labels(tmp_path / "labels.json", 1500)
    hp = hparams(labels={"num_train": 1200, "source": source}, batch_size=16, lr=3e-3)
    _, summary = train_reward.train(hp)
    heldout = summary["heldout"]
    assert heldout["count"] > 250
    assert heldout["accuracy"] > 0.7, heldout  # chance is 0.25


@pytest.mark.parametrize("overrides, message", [
    (dict(labels={"num_train": 96}), "holds 50 labels but labels.num_train is 96"),
    (dict(labels={"num_train": 30}), "num_train=30 is not divisible by batch_size=8"),
    (dict(labels={"type": None}), "labels.type must be set"),
    (dict(labels={"type": "best_of_n"}), "unknown label type"),
    (dict(normalize_after=True), "need normalize_samples > 0"),
    (dict(task={"policy": {"initial_model": None}}), "policy.initial_model must be set"),
])
def test_bad_configurations(overrides, message):
    with pytest.raises(UserError, match=message):
        train_reward.train(hparams(**overrides))
