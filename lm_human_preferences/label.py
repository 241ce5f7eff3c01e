"""Label files from a mock labeler (`./label.py`), and the labeler's verdict on policies.

A label file is written in exactly the released schema (SPEC §5): a JSON list of
`{"query": [...], "sample0".."sample{N-1}": [...], "best": i}` with padded token lists, so
`train_reward` reads it unchanged. Responses are sampled from a policy (by default the task's
initial model) and truncated as the task says, as the released samples were.
"""

import json
import random
from pathlib import Path

import torch

from lm_human_preferences import labelers, lm_tasks
from lm_human_preferences.policy import Policy
from lm_human_preferences.utils import storage
from lm_human_preferences.utils.logging import print_main
from lm_human_preferences.utils.errors import UserError

MOCK_PREFIX = "mock:"
SAMPLING_CHUNK = 512  # rows sampled at once; sampling the small models is cheap


def parse_mock_source(source: str) -> tuple[str, float]:
    """`mock:<labeler>[:<noise>]` → (labeler name, noise)."""
    parts = source[len(MOCK_PREFIX):].split(":")
    try:
        noise = float(parts[1]) if len(parts) > 1 else 0.0
    except ValueError:
        raise UserError(f"{source}: the noise after the labeler name must be a number") from None
    if len(parts) > 2 or noise < 0:
        raise UserError(f"{source}: write a mock label source as mock:<labeler> or mock:<labeler>:<noise ≥ 0>")
    labelers.get(parts[0])
    return parts[0], noise


def sample_texts(policy: Policy, task: lm_tasks.TaskHParams, queries: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, list[str], list[str]]:
    """Truncated responses to `queries`, and the decoded query and response texts."""
    responses = policy.respond(queries, task.response_length, generator, SAMPLING_CHUNK)["responses"]
    responses = lm_tasks.postprocess_responses(task, responses, policy.encoding.padding_token)
    decode = policy.encoding.decode
    return responses, [decode(q) for q in queries.tolist()], [decode(r) for r in responses.tolist()]


def generate(policy: Policy, task: lm_tasks.TaskHParams, labeler: str, num_records: int, noise: float = 0.0,
             n_responses: int = 4, seed: int = 0, skip_ties: bool = True) -> list[dict]:
    """`num_records` best-of-n label records for queries of the task's training stream.

    With `skip_ties`, a query whose responses the labeler scores all alike is not labelled
    (a labeler with no preference would skip it) and the next query is tried instead.
    """
    judge = labelers.get(labeler)
    queries_stream = lm_tasks.query_batches(task, policy.encoding, SAMPLING_CHUNK // n_responses, device=policy.device)
    generator = torch.Generator(policy.device).manual_seed(seed)
    rng = random.Random(seed)
    records: list[dict] = []
    tried = 0
    while len(records) < num_records:
        if tried >= 20 * num_records:
            raise UserError(f"the {labeler!r} labeler scored the responses of {tried} queries all alike but for "
                            f"{len(records)}; it cannot tell this policy's samples apart")
        queries = next(queries_stream)
        tried += len(queries)
        responses, query_texts, texts = sample_texts(policy, task, queries.repeat_interleave(n_responses, 0), generator)
        for i, query in enumerate(queries.tolist()):
            rows = range(i * n_responses, (i + 1) * n_responses)
            scores = [judge(query_texts[r], texts[r]) for r in rows]
            if (skip_ties and len(set(scores)) == 1) or len(records) == num_records:
                continue
            record = {"query": query}
            record.update({f"sample{k}": responses[r].tolist() for k, r in enumerate(rows)})
            record["best"] = labelers.choose_best(scores, noise, rng)
            records.append(record)
    return records


def write(records: list[dict], path: Path) -> None:
    storage.atomic_write_text(path, json.dumps(records, separators=(",", ":")))


def labeler_verdict(policy: Policy, task: lm_tasks.TaskHParams, labeler: str, queries: torch.Tensor,
                    seed: int = 0) -> tuple[float, list[tuple[str, str, float]]]:
    """The labeler's mean score of the policy's responses to `queries`, and (query, response, score) triples."""
    judge = labelers.get(labeler)
    _, query_texts, texts = sample_texts(policy, task, queries, torch.Generator(policy.device).manual_seed(seed))
    scored = [(q, r, judge(q, r)) for q, r in zip(query_texts, texts)]
    return sum(s for _, _, s in scored) / len(scored), scored


def mock_summary(task: lm_tasks.TaskHParams, source: str, policy: Policy, ref_policy: Policy, reward_summary: dict,
                 final: dict[str, float], n_queries: int = 256) -> dict:
    """How a run on mock labels (`source`) did by the labeler's own judgement: its score before and after PPO."""
    labeler, _ = parse_mock_source(source)
    queries = next(lm_tasks.query_batches(task, policy.encoding, n_queries, mode="test", device=policy.device))
    before, before_samples = labeler_verdict(ref_policy, task, labeler, queries)
    after, after_samples = labeler_verdict(policy, task, labeler, queries)
    heldout = reward_summary.get("heldout", {})
    return {
        "labeler": labeler,
        "reward_model_heldout_accuracy": heldout.get("accuracy"), "heldout_count": heldout.get("count"),
        "chance": heldout.get("chance"),
        "true_score_before": before, "true_score_after": after,
        "final_kl": final["objective/kl"], "final_kl_coef": final["objective/kl_coef"],
        "samples": [{"query": q, "before": b, "before_score": bs, "after": a, "after_score": as_}
                    for (q, b, bs), (_, a, as_) in list(zip(before_samples, after_samples))[:3]],
    }


def print_mock_summary(summary: dict) -> None:
    print_main("=" * 80)
    print_main(f"mock labeler {summary['labeler']!r}: reward model held-out accuracy "
                       f"{summary['reward_model_heldout_accuracy']:.3f} (chance {summary['chance']:.2f}, "
                       f"{summary['heldout_count']} labels)")
    print_main(f"true score of policy samples: {summary['true_score_before']:.3f} before PPO → "
                       f"{summary['true_score_after']:.3f} after; final KL {summary['final_kl']:.2f} "
                       f"(kl_coef {summary['final_kl_coef']:.3f})")
    for pair in summary["samples"]:
        print_main(f"query:  {pair['query']!r}\nbefore: {pair['before']!r} ({pair['before_score']:+.0f})\n"
                           f"after:  {pair['after']!r} ({pair['after_score']:+.0f})")
