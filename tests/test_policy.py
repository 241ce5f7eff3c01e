import math

import pytest
import torch

from lm_human_preferences.task import lm_tasks
from lm_human_preferences.language import encodings, sample, trained_models
from lm_human_preferences.task.policy import Policy


def make_policy(temperature=0.7, prefix="", suffix=""):
    torch.manual_seed(0)
    model, _ = trained_models.load_initial("test", heads=("value",))
    with torch.no_grad():
        model.heads["value"].weight.normal_()  # non-zero so values are checked
        for p in model.parameters():
            p.mul_(4)
    task = lm_tasks.TaskHParams(query_length=3, query_dataset="test", response_length=3,
                                query_prefix=prefix, query_suffix=suffix)
    task.policy.temperature = temperature
    return Policy(model.eval(), encodings.get("test"), task)


@pytest.mark.parametrize("prefix, suffix", [("", ""), ("a", "."), ("", "z")])
def test_respond_and_analyze_agree(prefix, suffix):
    policy = make_policy(prefix=prefix, suffix=suffix)
    queries = torch.tensor([[1, 2, 27], [5, 27, 27], [7, 8, 9]])  # right-padded queries
    length = 8 - len(prefix) - len(suffix) - 3
    rollout = policy.respond(queries, length, generator=torch.Generator().manual_seed(1))
    assert rollout["responses"].shape == (3, length)
    with torch.no_grad():
        analysis = policy.analyze_responses(queries, rollout["responses"])
    torch.testing.assert_close(analysis["logprobs"], rollout["logprobs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(analysis["values"], rollout["values"], atol=1e-4, rtol=1e-4)
    assert (analysis["entropies"] > 0).all() and (analysis["entropies"] <= math.log(27) + 1e-5).all()


def test_logprobs_use_temperature_and_match_direct_computation():
    policy = make_policy(temperature=0.5)
    queries = torch.tensor([[1, 2, 3]])
    responses = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        analysis = policy.analyze_responses(queries, responses)
        logits = policy.model(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits[0, 2:5] / 0.5
    expected = torch.log_softmax(logits, -1)[torch.arange(3), responses[0]]
    torch.testing.assert_close(analysis["logprobs"][0], expected, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_and_follows_the_distribution():
    policy = make_policy(temperature=1.0)
    queries = torch.tensor([[1, 2, 3]]).expand(4000, -1)
    a = policy.respond(queries, 1, generator=torch.Generator().manual_seed(5))
    b = policy.respond(queries, 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["responses"], b["responses"])
    with torch.no_grad():
        probs = torch.softmax(policy.model(torch.tensor([[1, 2, 3]])).logits[0, -1], -1)
    freq = torch.bincount(a["responses"][:, 0], minlength=27).float() / 4000
    assert (freq - probs).abs().max() < 0.03


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    top2 = sample.filter_logits(logits, top_k=2)
    assert torch.isinf(top2[0, [3]]).all() and torch.isfinite(top2[0, :3]).all()  # ties at the k-th value are kept
    nucleus = sample.filter_logits(logits, top_p=0.6)  # 0.5 < 0.6, so the next token (0.2) is kept too
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    greedy = sample.filter_logits(logits, top_p=0.3)
    assert torch.isfinite(greedy[0, 0]) and torch.isinf(greedy[0, 1:]).all()
    torch.testing.assert_close(sample.filter_logits(logits), logits)


def test_top_k_1_is_greedy():
    policy = make_policy(temperature=1.0)
    context = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = sample.sample(policy.model, context, 3, padding_token=27, top_k=1)
    tokens = context
    for _ in range(3):
        with torch.no_grad():
            next_token = policy.model(tokens).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], 1)
    assert torch.equal(out.tokens, tokens[:, 3:])
