"""Collecting labels: a policy answers queries, a labeler answers the resulting questions.

A *question* is a query with its N sampled responses (truncated as the task says, as the
released samples were). A *labeler* is anything with `answer(questions) -> [label or None]`:
the mock labelers here, people through the labeling app, or the online trainer's queue. A
None answer is a skip (no clear preference); skipped questions are not written. Every answer
becomes one record of the released schema: `{"query", "sample0".."sample{N-1}", "best"}`.
"""

import random
from dataclasses import dataclass
from typing import Protocol

import torch

from lm_human_preferences.task import lm_tasks
from lm_human_preferences.labeling import label_types, mock_labelers
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.utils.errors import UserError


@dataclass
class Question:
    query: list[int]  # padded query tokens
    responses: list[list[int]]  # N padded, truncated responses
    query_text: str
    response_texts: list[str]


class Labeler(Protocol):
    def answer(self, questions: list[Question]) -> list[int | None]: ...


def record(question: Question, best: int) -> dict:
    """A best-of-N label record in the released schema."""
    out: dict = {"query": question.query}
    out.update({f"sample{k}": r for k, r in enumerate(question.responses)})
    out["best"] = best
    return out


def sample_texts(policy: Policy, task: lm_tasks.TaskHParams, queries: torch.Tensor, generator: torch.Generator,
                 chunk_size: int | None) -> tuple[torch.Tensor, list[str], list[str]]:
    """Truncated responses to `queries`, and the decoded query and response texts."""
    responses = policy.respond(queries, task.response_length, generator, chunk_size)["responses"]
    responses = lm_tasks.postprocess_responses(task, responses, policy.encoding.padding_token)
    decode = policy.encoding.decode
    return responses, [decode(q) for q in queries.tolist()], [decode(r) for r in responses.tolist()]


def ask(policy: Policy, task: lm_tasks.TaskHParams, queries: torch.Tensor, n_responses: int,
        generator: torch.Generator, chunk_size: int | None) -> list[Question]:
    """One question per query: the policy's `n_responses` answers to it."""
    responses, query_texts, texts = sample_texts(policy, task, queries.repeat_interleave(n_responses, 0),
                                                 generator, chunk_size)
    questions = []
    for i, query in enumerate(queries.tolist()):
        rows = range(i * n_responses, (i + 1) * n_responses)
        questions.append(Question(query, [responses[r].tolist() for r in rows], query_texts[i * n_responses],
                                  [texts[r] for r in rows]))
    return questions


class MockLabeler:
    """A mock labeler (`mock_labelers`) choosing the best response; with `skip_ties`, a question
    whose best responses score alike is skipped, as a person with no clear preference would."""

    def __init__(self, name: str, noise: float = 0.0, seed: int = 0, skip_ties: bool = True):
        self.name = name
        self.judge = mock_labelers.get(name)
        self.noise = noise
        self.skip_ties = skip_ties
        self.rng = random.Random(seed)

    def answer(self, questions: list[Question]) -> list[int | None]:
        answers: list[int | None] = []
        for question in questions:
            scores = [self.judge(question.query_text, text) for text in question.response_texts]
            tied = sorted(scores)[-2] == max(scores)
            answers.append(None if self.skip_ties and tied else mock_labelers.choose_best(scores, self.noise, self.rng))
        return answers


def collect(policy: Policy, task: lm_tasks.TaskHParams, labeler: Labeler, num_records: int, n_responses: int = 4,
            seed: int = 0, chunk_size: int | None = 512, mode: str = "train") -> list[dict]:
    """`num_records` best-of-N records on queries of the task's `mode` stream, skipped questions replaced."""
    per_batch = max(1, (chunk_size or 512) // n_responses)
    queries = lm_tasks.query_batches(task, policy.encoding, per_batch, mode=mode, device=policy.device)
    generator = torch.Generator(policy.device).manual_seed(seed)
    records: list[dict] = []
    asked = 0
    while len(records) < num_records:
        if asked >= 20 * num_records:
            raise UserError(f"the labeler skipped all but {len(records)} of {asked} questions; it cannot tell "
                            "this policy's samples apart")
        questions = ask(policy, task, next(queries), n_responses, generator, chunk_size)
        asked += len(questions)
        for question, best in zip(questions, labeler.answer(questions)):
            if best is not None and len(records) < num_records:
                records.append(record(question, best))
    return records


def count_responses(label_type_name: str) -> int:
    """N of a best-of-N label type name; collecting other label types needs a person (the app)."""
    label_type = label_types.get(label_type_name)
    if not isinstance(label_type, label_types.BestOfN):
        raise UserError(f"mock labelers give best-of-N labels; {label_type_name} labels need the labeling app")
    return len(label_type.response_keys)

