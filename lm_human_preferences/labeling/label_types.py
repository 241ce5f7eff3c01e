"""Kinds of human labels: their schemas, losses, held-out metrics and normalization targets.

A label record holds the query tokens, one or more response tokens and the label:
    best_of_N       query, sample0 … sample{N-1}, best (index of the best response)
    scalar_rating   query, sample, score (a float rating of the one response)
    scalar_compare  query, sample0, sample1, difference (how much better sample1 is)

A label type's loss and metrics take the reward model's rewards for every response of each
record, [batch, num_responses], so all responses are scored in one batched forward.
Held-out metrics are computed from sums, so every rank can add up its share first.
"""

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lm_human_preferences.utils.errors import UserError


@dataclass(frozen=True)
class Schema:
    dtype: str  # "int" or "float"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LabelType:
    name: str
    response_keys: tuple[str, ...]
    label_key: str

    def question_schemas(self, query_length: int, response_length: int) -> dict[str, Schema]:
        schemas = {"query": Schema("int", (query_length,))}
        schemas.update({key: Schema("int", (response_length,)) for key in self.response_keys})
        return schemas

    label_kind = "float"  # "int" for labels that are indices

    def label_schemas(self) -> dict[str, Schema]:
        return {self.label_key: Schema(self.label_kind, ())}

    @property
    def label_dtype(self) -> type:
        return np.int64 if self.label_kind == "int" else np.float32

    def label_problem(self, value) -> str | None:
        """Why `value` is not a valid label, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "must be a finite number"
        return None

    def loss(self, rewards: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def target_scales(self, labels: np.ndarray) -> np.ndarray | None:
        """Values whose mean/std the normalized reward should have; None means N(0, 1)."""
        raise NotImplementedError

    def metric_sums(self, rewards: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """float64 sums over records from which `metrics` computes the held-out metrics."""
        raise NotImplementedError

    def metrics(self, sums: list[float]) -> dict[str, float]:
        raise NotImplementedError


class BestOfN(LabelType):
    label_kind = "int"

    def __init__(self, n: int):
        if n < 2:
            raise UserError(f"best_of_{n}: a best-of-N label needs at least 2 responses")
        super().__init__(f"best_of_{n}", tuple(f"sample{i}" for i in range(n)), "best")

    def label_problem(self, value) -> str | None:
        n = len(self.response_keys)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            return f"must be an integer in 0..{n - 1}"
        return None

    def loss(self, rewards, labels):
        """Softmax cross-entropy over the N rewards, with the labelled best as the class."""
        loss = F.cross_entropy(rewards.float(), labels.long())
        accuracy = (rewards.argmax(dim=1) == labels).float().mean()
        return loss, dict(loss=loss, error=loss, accuracy=accuracy)

    def target_scales(self, labels):
        return None

    def metric_sums(self, rewards, labels):
        """[records, correct]: the reward model is right when the labelled best has the highest reward."""
        correct = (rewards.argmax(dim=1) == labels).double().sum()
        return torch.stack([torch.tensor(float(len(labels)), dtype=torch.float64, device=correct.device), correct])

    def metrics(self, sums):
        count, correct = sums
        return dict(count=int(count), accuracy=correct / count, chance=1 / len(self.response_keys))


class ScalarLabelType(LabelType):
    """Labels that are numbers, compared with a number predicted from the rewards."""

    def predicted(self, rewards: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metric_sums(self, rewards, labels):
        """Sums of 1, x, y, x², y², xy and (x − y)², with x the label and y the prediction."""
        x, y = labels.double(), self.predicted(rewards).double()
        return torch.stack([torch.ones_like(x).sum(), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum(),
                            ((x - y) ** 2).sum()])

    def metrics(self, sums):
        """Mean squared error and Pearson r (population moments; r is 0 when either side is constant)."""
        n, sx, sy, sxx, syy, sxy, sse = sums
        cov, vx, vy = sxy / n - sx * sy / n ** 2, sxx / n - (sx / n) ** 2, syy / n - (sy / n) ** 2
        corr = cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else 0.0
        return dict(count=int(n), mse=sse / n, corr=corr)


class ScalarRating(ScalarLabelType):
    def __init__(self):
        super().__init__("scalar_rating", ("sample",), "score")

    def predicted(self, rewards):
        return rewards[:, 0]

    def loss(self, rewards, labels):
        """Mean squared error between score and reward; also label mean/var and Pearson r."""
        predicted, labels = self.predicted(rewards).float(), labels.float()
        error = ((labels - predicted) ** 2).mean()
        return error, dict(loss=error, error=error, label_mean=labels.mean(),
                           label_var=labels.var(unbiased=False), corr=pearson(labels, predicted))

    def target_scales(self, labels):
        return labels


class ScalarCompare(ScalarLabelType):
    def __init__(self):
        super().__init__("scalar_compare", ("sample0", "sample1"), "difference")

    def predicted(self, rewards):
        return rewards[:, 1] - rewards[:, 0]

    def loss(self, rewards, labels):
        """Mean squared error between difference and reward(sample1) − reward(sample0)."""
        predicted = self.predicted(rewards).float()
        error = ((labels.float() - predicted) ** 2).mean()
        return error, dict(loss=error, error=error)

    def target_scales(self, labels):
        return labels / 2


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation with population moments (0 where either side is constant)."""
    da, db = a - a.mean(), b - b.mean()
    denominator = torch.sqrt((da ** 2).mean() * (db ** 2).mean())
    return torch.where(denominator > 0, (da * db).mean() / denominator.clamp(min=1e-30), torch.zeros(()))


def get(name: str) -> LabelType:
    """`best_of_N` for any N ≥ 2, `scalar_rating` or `scalar_compare`."""
    match = re.fullmatch(r"best_of_(\d+)", name)
    if match:
        return BestOfN(int(match.group(1)))
    if name == "scalar_rating":
        return ScalarRating()
    if name == "scalar_compare":
        return ScalarCompare()
    raise UserError(f"unknown label type {name!r}; known: best_of_N (e.g. best_of_4), scalar_rating, scalar_compare")
