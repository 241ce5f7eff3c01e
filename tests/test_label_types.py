import math

import numpy as np
import pytest
import torch

from lm_human_preferences.labeling import label_types
from lm_human_preferences.utils.errors import UserError


def test_best_of_n_loss_is_softmax_cross_entropy():
    bo4 = label_types.get("best_of_4")
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    best = torch.tensor([2, 3])
    loss, stats = bo4.loss(rewards, best)
    # row 0: ln 4; row 1: logsumexp(1..4) - 4 = ln(e^-3 + e^-2 + e^-1 + 1)
    row1 = math.log(math.exp(-3) + math.exp(-2) + math.exp(-1) + 1)
    assert loss.item() == pytest.approx((math.log(4) + row1) / 2, rel=1e-6)
    assert row1 == pytest.approx(0.4401897, rel=1e-6)
    assert stats["error"].item() == loss.item()
    assert stats["accuracy"].item() == 0.5  # row 0 ties → argmax 0 ≠ 2; row 1 correct
    assert bo4.target_scales(np.array([0, 1])) is None


def test_best_of_2_and_schemas():
    bo2 = label_types.get("best_of_2")
    assert bo2.response_keys == ("sample0", "sample1")
    loss, _ = bo2.loss(torch.tensor([[0.0, math.log(3)]]), torch.tensor([1]))
    assert loss.item() == pytest.approx(-math.log(0.75), rel=1e-6)
    schemas = bo2.question_schemas(64, 24)
    assert schemas["query"].shape == (64,) and schemas["sample1"].shape == (24,)
    assert bo2.label_schemas() == {"best": label_types.Schema("int", ())}
    assert bo2.label_problem(2) == "must be an integer in 0..1"
    assert bo2.label_problem(True) is not None and bo2.label_problem(1) is None


def test_scalar_rating_loss_and_stats():
    rating = label_types.get("scalar_rating")
    rewards = torch.tensor([[1.0], [2.0], [4.0]])
    scores = torch.tensor([1.0, 3.0, 2.0])
    loss, stats = rating.loss(rewards, scores)
    assert loss.item() == pytest.approx((0 + 1 + 4) / 3)
    assert stats["label_mean"].item() == pytest.approx(2.0)
    assert stats["label_var"].item() == pytest.approx(2 / 3)
    # s − 2 = [-1, 1, 0], p − 7/3 = [-4/3, -1/3, 5/3] → cov = (4/3 − 1/3 + 0)/3 = 1/3
    # var_p = (16/9 + 1/9 + 25/9)/3 = 14/9 → r = (1/3) / sqrt(2/3 · 14/9) = 0.32733
    assert stats["corr"].item() == pytest.approx(0.3273268, rel=1e-5)
    np.testing.assert_allclose(rating.target_scales(np.array([1.0, 3.0])), [1.0, 3.0])


def test_scalar_compare_loss():
    compare = label_types.get("scalar_compare")
    rewards = torch.tensor([[1.0, 3.0], [0.5, 0.0]])
    difference = torch.tensor([1.0, 0.5])
    loss, stats = compare.loss(rewards, difference)
    # predicted differences [2, -0.5] → errors [1, 1]
    assert loss.item() == pytest.approx(1.0)
    np.testing.assert_allclose(compare.target_scales(np.array([2.0, -1.0])), [1.0, -0.5])
    assert compare.label_problem(float("nan")) == "must be a finite number"
    assert compare.label_problem("1") == "must be a finite number"


def test_unknown_label_types():
    with pytest.raises(UserError, match="unknown label type 'best_of_four'"):
        label_types.get("best_of_four")
    with pytest.raises(UserError, match="at least 2 responses"):
        label_types.get("best_of_1")


def test_heldout_metrics_from_sums():
    # best_of_3: the highest reward is the labelled best in records 0 and 2 of 3.
    bo3 = label_types.get("best_of_3")
    rewards = torch.tensor([[0.1, 0.9, 0.2], [1.0, 0.0, 0.5], [0.0, 0.1, 0.3]], dtype=torch.float64)
    sums = bo3.metric_sums(rewards, torch.tensor([1, 2, 2]))
    assert bo3.metrics(sums.tolist()) == dict(count=3, accuracy=pytest.approx(2 / 3), chance=pytest.approx(1 / 3))
    # scalar_rating: labels x = [1, 2, 4], predictions y = [1, 3, 3] → mse (0 + 1 + 1) / 3;
    # Pearson r by hand: dx = [-4/3, -1/3, 5/3], dy = [-4/3, 2/3, 2/3]: cov 8/9, var x 14/9, var y 8/9.
    rating = label_types.get("scalar_rating")
    metrics = rating.metrics(rating.metric_sums(torch.tensor([[1.0], [3.0], [3.0]]), torch.tensor([1.0, 2.0, 4.0])).tolist())
    assert metrics["count"] == 3 and metrics["mse"] == pytest.approx(2 / 3)
    assert metrics["corr"] == pytest.approx((8 / 9) / math.sqrt(14 / 9 * 8 / 9))
    # scalar_compare predicts reward(sample1) − reward(sample0): [2, -1] against labels [1, -1].
    compare = label_types.get("scalar_compare")
    metrics = compare.metrics(compare.metric_sums(torch.tensor([[0.0, 2.0], [1.0, 0.0]]), torch.tensor([1.0, -1.0])).tolist())
    assert metrics == dict(count=2, mse=pytest.approx(0.5), corr=pytest.approx(1.0))
    # sums of equal parts add up to the sums of the whole (how ranks and micro-batches combine)
    whole = rating.metric_sums(torch.tensor([[1.0], [3.0], [3.0]]), torch.tensor([1.0, 2.0, 4.0]))
    parts = rating.metric_sums(torch.tensor([[1.0]]), torch.tensor([1.0])) + \
        rating.metric_sums(torch.tensor([[3.0], [3.0]]), torch.tensor([2.0, 4.0]))
    assert torch.allclose(whole, parts)
    assert bo3.label_dtype == np.int64 and rating.label_dtype == np.float32
