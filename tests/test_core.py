import math

import pytest
import torch

from lm_human_preferences.utils import core
from lm_human_preferences.utils.errors import UserError


def test_whiten_matches_hand_computed():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # mean 2.5, biased variance ((1.5² + 0.5²) * 2) / 4 = 1.25
    expected = torch.tensor([[-1.5, -0.5], [0.5, 1.5]]) / math.sqrt(1.25 + 1e-8)
    torch.testing.assert_close(core.whiten(values), expected)
    torch.testing.assert_close(core.whiten(values, shift_mean=False), expected + 2.5)


def test_whiten_constant_input_uses_epsilon():
    values = torch.full((4,), 3.0)
    torch.testing.assert_close(core.whiten(values), torch.zeros(4))
    torch.testing.assert_close(core.whiten(values, shift_mean=False), torch.full((4,), 3.0))


def test_logprobs_and_entropy_from_logits():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 2.0]]))  # probs /6 and /4
    labels = torch.tensor([2, 0])
    logprobs, entropy = core.logprobs_and_entropy(logits, labels)
    torch.testing.assert_close(logprobs, torch.tensor([math.log(0.5), math.log(0.25)]))
    entropy0 = -(1 / 6 * math.log(1 / 6) + 2 / 6 * math.log(2 / 6) + 3 / 6 * math.log(3 / 6))  # 1.011404
    entropy1 = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))  # 1.039721
    torch.testing.assert_close(entropy, torch.tensor([entropy0, entropy1]))
    assert core.logprobs_and_entropy(logits, labels, entropy=False)[1] is None
    assert abs(entropy0 - 1.011404) < 1e-6


def test_logprobs_shift_invariant_and_float32_under_bf16():
    logits = torch.tensor([[100.0, 101.0]], dtype=torch.bfloat16)
    out, _ = core.logprobs_and_entropy(logits, torch.tensor([1]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-math.log1p(math.exp(-1.0))]))


def test_exact_div_and_ceil_div():
    assert core.exact_div(12, 4) == 3
    with pytest.raises(UserError, match="13 is not divisible by 4"):
        core.exact_div(13, 4)
    with pytest.raises(UserError, match="zero"):
        core.exact_div(1, 0)
    assert core.ceil_div(256, 512) == 1
    assert core.ceil_div(513, 512) == 2
    assert core.ceil_div(512, 512) == 1
    assert core.ceil_div(0, 5) == 0
    with pytest.raises(UserError, match="positive"):
        core.ceil_div(5, 0)
