"""evaluation/verdict.py on the tiny test model: the verdict's before/after samples (those the
findings bench measures too), the KL estimate on them, and the win rate."""

import pytest
import torch

from lm_human_preferences.evaluation import verdict
from lm_human_preferences.labeling import mock_labelers
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.training import train_policy


def test_the_win_rate_counts_ties_half():
    assert verdict.win_rate([1.0, 3.0, 2.0, 0.0], [1.0, 2.0, 3.0, 4.0]) == (0.5 + 0 + 1 + 1) / 4


@pytest.fixture()
def count_a(monkeypatch):
    """A labeler for the test model's letters: more 'a's is better."""
    monkeypatch.setitem(mock_labelers.LABELERS, "count_a", lambda query, response: float(response.count("a")))


def tiny_policies() -> tuple[Policy, Policy, lm_tasks.TaskHParams]:
    """The tiny model as the initial policy, and a copy with perturbed weights as the trained one."""
    task = lm_tasks.TaskHParams(query_length=3, query_dataset="test", response_length=4, start_text=None,
                                truncate_token=26, truncate_after=2)
    task.policy.initial_model = "test"
    initial, _ = trained_models.load_initial("test")
    trained, _ = trained_models.load_initial("test")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    encoding = encodings.get("test")
    return Policy(trained.eval(), encoding, task), Policy(initial.eval(), encoding, task), task


def test_the_verdicts_samples_are_the_runs_samples_with_their_tokens(count_a):
    policy, ref, task = tiny_policies()
    samples = verdict.sample_before_after(policy, ref, task, seed=3, n_queries=16)
    assert list(zip(samples.query_texts, samples.texts["before"], samples.texts["after"])) == \
        train_policy.before_after_samples(policy, ref, task, 3, 16)
    assert samples.texts["before"] != samples.texts["after"]
    for name in ("before", "after"):
        assert samples.responses[name].shape == (16, 4)
        assert [policy.encoding.decode(r) for r in samples.responses[name].tolist()] == samples.texts[name]
    result = verdict.verdict(policy, ref, task, "count_a", seed=3, n_queries=16)
    before, after = verdict.labeler_scores("count_a", samples)
    assert before == [float(t.count("a")) for t in samples.texts["before"]]
    assert result["true_score_before"] == sum(before) / 16 and result["true_score_after"] == sum(after) / 16
    assert result["win_rate"] == verdict.win_rate(before, after)
    assert result["samples"][0]["after"] == samples.texts["after"][0]


def test_the_kl_is_zero_from_itself_and_the_mean_log_ratio_of_the_trained_policys_samples():
    policy, ref, task = tiny_policies()
    itself = verdict.sample_before_after(ref, ref, task, seed=1, n_queries=8)
    assert verdict.kl_from_initial(ref, itself) == pytest.approx(0.0, abs=1e-5)
    samples = verdict.sample_before_after(policy, ref, task, seed=1, n_queries=8)
    responses = samples.rollouts["after"]["responses"]
    log_ratio = (policy.analyze_responses(samples.queries, responses, entropies=False)["logprobs"]
                 - ref.analyze_responses(samples.queries, responses, entropies=False)["logprobs"])
    assert verdict.kl_from_initial(ref, samples) == pytest.approx(log_ratio.sum(1).mean().item(), rel=1e-4)
    assert verdict.kl_from_initial(ref, samples) > 0.1
