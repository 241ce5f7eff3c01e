"""Prepared questions for people: sampling them once, and the questions file that keeps them.

A questions file is one JSON object:
    {"label_type": "best_of_4", "questions": [{"query": [...], "responses": [[...], ...],
      "query_text": "...", "response_texts": ["...", ...], "ended": [false, ...]}, ...]}
A question's id is its index in the list. `ended[k]` says whether response k stopped early at
the task's truncate token (the tokens after it are padding); a response that did not was cut
at the response length, mid-text. The labeling app writes it beside the label file, so a
restart shows the same questions, and reads one given with `--questions`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lm_human_preferences.task import lm_tasks
from lm_human_preferences.labeling import collect, label_types
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.utils import storage
from lm_human_preferences.utils.errors import UserError


@dataclass
class Item:
    """A question as shown to people: with whether each response ended early."""

    question: collect.Question
    ended: list[bool]


def item(question: collect.Question, padding_token: int) -> Item:
    return Item(question, [padding_token in response for response in question.responses])


def count_responses(label_type: label_types.LabelType) -> int:
    """Responses per question: N for best_of_N, 1 for scalar_rating; other types have no page."""
    if isinstance(label_type, (label_types.BestOfN, label_types.ScalarRating)):
        return len(label_type.response_keys)
    raise UserError(f"the labeling app asks best_of_N or scalar_rating questions, not {label_type.name}")


def prepare(policy: Policy, task: lm_tasks.TaskHParams, n_questions: int, n_responses: int, seed: int,
            chunk_size: int | None) -> list[Item]:
    """The policy's truncated answers to the first `n_questions` queries of the task's train stream."""
    per_batch = max(1, min(n_questions, (chunk_size or 512) // n_responses))
    queries = lm_tasks.query_batches(task, policy.encoding, per_batch, mode="train", device=policy.device)
    generator = torch.Generator(policy.device).manual_seed(seed)
    items: list[Item] = []
    while len(items) < n_questions:
        asked = collect.ask(policy, task, next(queries), n_responses, generator, chunk_size)
        items.extend(item(q, policy.encoding.padding_token) for q in asked)
    return items[:n_questions]


def to_json(label_type: label_types.LabelType, items: list[Item]) -> str:
    questions = [dict(query=i.question.query, responses=i.question.responses, query_text=i.question.query_text,
                      response_texts=i.question.response_texts, ended=i.ended) for i in items]
    return json.dumps(dict(label_type=label_type.name, questions=questions), ensure_ascii=False)


def save(path: Path, label_type: label_types.LabelType, items: list[Item]) -> None:
    storage.atomic_write_text(path, to_json(label_type, items))


def _token_list(value, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(t) is int and t >= 0 for t in value):
        raise UserError(f"{what} must be a list of token ids (integers ≥ 0)")
    return value


def parse_item(entry, index: int, source: str) -> Item:
    """Question `index` of a questions file (checked: a UserError names what is wrong)."""
    where = f"{source}: question {index}"
    if not isinstance(entry, dict):
        raise UserError(f"{where} is not an object")
    missing = [k for k in ("query", "responses", "query_text", "response_texts") if k not in entry]
    if missing:
        raise UserError(f"{where} lacks {missing[0]!r}")
    responses, texts = entry["responses"], entry["response_texts"]
    if not isinstance(responses, list) or not isinstance(texts, list) or len(responses) != len(texts):
        raise UserError(f"{where}: 'responses' and 'response_texts' must be lists of the same length")
    if not isinstance(entry["query_text"], str) or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{where}: the texts must be strings")
    ended = entry.get("ended", [False] * len(responses))
    if not isinstance(ended, list) or len(ended) != len(responses) or not all(isinstance(e, bool) for e in ended):
        raise UserError(f"{where}: 'ended' must be a list of one true/false per response")
    question = collect.Question(_token_list(entry["query"], f"{where}: 'query'"),
                                [_token_list(r, f"{where}: a response") for r in responses],
                                entry["query_text"], texts)
    return Item(question, ended)


def load(path: Path) -> tuple[str, list[Item]]:
    """(label type name, questions) of a questions file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such questions file") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: also an integer too long to read
        raise UserError(f"{path}: not a JSON questions file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list) \
            or not isinstance(data.get("label_type"), str):
        raise UserError(f'{path}: a questions file is an object {{"label_type": ..., "questions": [...]}}')
    return data["label_type"], [parse_item(entry, i, str(path)) for i, entry in enumerate(data["questions"])]


def check(items: list[Item], n_responses: int, query_length: int, response_length: int, source: str) -> None:
    """Raise unless every question fits the task's lengths and the label type's number of responses."""
    for index, it in enumerate(items):
        q = it.question
        if len(q.responses) != n_responses:
            raise UserError(f"{source}: question {index} has {len(q.responses)} responses, the label type needs "
                            f"{n_responses}")
        if len(q.query) != query_length or any(len(r) != response_length for r in q.responses):
            raise UserError(f"{source}: question {index} does not have the task's lengths (query {query_length}, "
                            f"responses {response_length} tokens)")
