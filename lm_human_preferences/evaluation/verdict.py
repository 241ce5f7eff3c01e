"""The mock labeler's verdict on a trained policy (the offline demo's last step).

A run on mock labels (`labels.source mock:<labeler>[:<noise>]`, offline or online) ends with the
labeler judging the result: its mean score of the initial and of the trained policy's responses
to the same test queries, sampled with the same random numbers, and the win rate — the share of
those queries on which it prefers the trained policy's response (ties count half), the way the
paper reported its results. A DPO run (train_dpo) is judged the same way; its final KL is
measured on the test queries (`sampled_kl`), as it samples nothing while it trains.
"""

from dataclasses import dataclass

import torch

from lm_human_preferences.labeling import mock_labelers
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.task.policy import Policy, load_policy
from lm_human_preferences.training import train_dpo, train_policy
from lm_human_preferences.utils import core, distributed, logging

VERDICT_QUERIES = 256


@dataclass(frozen=True)
class BeforeAfter:
    """The initial (`before`) and the trained policy's (`after`) responses to the same test queries,
    each sampled with the same random numbers: as sampled (`rollouts`: Policy.respond's tokens and
    their log-probs), truncated as the task says (`responses`), and decoded (`texts`)."""

    queries: torch.Tensor
    query_texts: list[str]
    rollouts: dict[str, dict]
    responses: dict[str, torch.Tensor]
    texts: dict[str, list[str]]


@torch.no_grad()
def sample_before_after(policy: Policy, ref_policy: Policy, task: lm_tasks.TaskHParams, seed: int,
                        n_queries: int = VERDICT_QUERIES) -> BeforeAfter:
    """Both policies' responses to the first `n_queries` test queries, sampled from `seed`."""
    queries = next(lm_tasks.query_batches(task, policy.encoding, n_queries, mode="test", device=policy.device))
    decode = policy.encoding.decode
    rollouts, responses, texts = {}, {}, {}
    for name, p in (("before", ref_policy), ("after", policy)):
        rollouts[name] = p.respond(queries, task.response_length, torch.Generator(policy.device).manual_seed(seed))
        responses[name] = lm_tasks.postprocess_responses(task, rollouts[name]["responses"], p.encoding.padding_token)
        texts[name] = [decode(r) for r in responses[name].tolist()]
    return BeforeAfter(queries, [decode(q) for q in queries.tolist()], rollouts, responses, texts)


@torch.no_grad()
def kl_from_initial(ref_policy: Policy, samples: BeforeAfter) -> float:
    """The trained policy's KL from the initial one, estimated on its own samples: the sum over
    response tokens of log π − log π_ref, averaged over the queries."""
    after = samples.rollouts["after"]
    ref_logprobs = ref_policy.analyze_responses(samples.queries, after["responses"], entropies=False)["logprobs"]
    return (after["logprobs"] - ref_logprobs).sum(1).mean().item()


def labeler_scores(labeler_name: str, samples: BeforeAfter) -> tuple[list[float], list[float]]:
    """The labeler's score of each query's response before and after."""
    judge = mock_labelers.get(labeler_name)
    before, after = ([judge(q, r) for q, r in zip(samples.query_texts, samples.texts[name])]
                     for name in ("before", "after"))
    return before, after


def win_rate(before: list[float], after: list[float]) -> float:
    """The share of queries on which the labeler prefers the response after (ties count half)."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(after, before)) / len(before)


def verdict(policy: Policy, ref_policy: Policy, task: lm_tasks.TaskHParams, labeler_name: str, seed: int,
            n_queries: int = VERDICT_QUERIES) -> dict:
    """The labeler's mean score before and after, the win rate, and (query, before, after) samples."""
    samples = sample_before_after(policy, ref_policy, task, seed, n_queries)
    before, after = labeler_scores(labeler_name, samples)
    shown = [dict(query=q, before=b, before_score=bs, after=a, after_score=as_)
             for q, b, a, bs, as_ in zip(samples.query_texts[:3], samples.texts["before"], samples.texts["after"],
                                         before, after)]
    return dict(true_score_before=sum(before) / n_queries, true_score_after=sum(after) / n_queries,
                win_rate=win_rate(before, after), verdict_queries=n_queries, samples=shown)


@torch.no_grad()
def sampled_kl(policy: Policy, ref_policy: Policy, task: lm_tasks.TaskHParams, seed: int,
               n_queries: int = VERDICT_QUERIES, chunk_size: int | None = None) -> float:
    """KL(policy ‖ reference) estimated as PPO's objective/kl is: the mean over the policy's own
    responses to the first `n_queries` test queries of Σ_t (log π − log π_ref)."""
    queries = next(lm_tasks.query_batches(task, policy.encoding, n_queries, mode="test", device=policy.device))
    sampled = policy.respond(queries, task.response_length, torch.Generator(policy.device).manual_seed(seed), chunk_size)
    ref_logprobs = core.map_chunks(lambda q, r: ref_policy.analyze_responses(q, r, entropies=False)["logprobs"],
                                   chunk_size, queries, sampled["responses"])
    return (sampled["logprobs"] - ref_logprobs).sum(dim=1).mean().item()


def _judged(hp: train_policy.HParams | train_dpo.HParams, labeler_name: str, policy: Policy, heldout: dict,
            initial: Policy, seed: int, final_kl: float, final_kl_coef: float, kl_target: float | None) -> dict:
    out = {"labeler": labeler_name, "seed": seed,
           "reward_model_heldout_accuracy": heldout.get("accuracy"), "heldout_count": heldout.get("count"),
           "chance": heldout.get("chance"), "final_kl": final_kl, "final_kl_coef": final_kl_coef, "kl_target": kl_target}
    out.update(verdict(policy, initial, hp.task, labeler_name, seed))
    return out


def summary(hp: train_policy.HParams, labeler_name: str, policy: Policy, result: dict) -> dict:
    """How the run did by the labeler's own judgement, with the reward model's held-out accuracy;
    `result` is what `train_policy.train` returned (the seed it used among it)."""
    heldout = (result.get("reward_model") or {}).get("heldout", {})
    initial = load_policy(hp.task.policy.initial_model, hp.task, distributed.device())
    return _judged(hp, labeler_name, policy, heldout, initial, result["seed"], result["last"]["objective/kl"],
                   result["last"]["objective/kl_coef"], hp.rewards.adaptive_kl.target if hp.rewards.adaptive_kl else None)


def dpo_summary(hp: train_dpo.HParams, labeler_name: str, policy: Policy, result: dict) -> dict:
    """`summary` of a DPO run: the held-out accuracy is its implicit reward's, the final KL is
    `sampled_kl`'s, and the KL coefficient is β (DPO solves PPO's objective with kl_coef β)."""
    initial = load_policy(hp.task.policy.initial_model, hp.task, distributed.device())
    kl = sampled_kl(policy, initial, hp.task, result["seed"], chunk_size=hp.run.chunk_size)
    return _judged(hp, labeler_name, policy, result.get("heldout", {}), initial, result["seed"], kl, hp.beta, None)


def print_summary(s: dict) -> None:
    logging.print_main("=" * 80)
    logging.print_main(f"mock labeler {s['labeler']!r} (seed {s['seed']}): reward model held-out accuracy "
                       f"{s['reward_model_heldout_accuracy']:.3f} (chance {s['chance']:.2f}, {s['heldout_count']} labels)")
    logging.print_main(f"win rate of the trained policy against the initial one: {s['win_rate']:.3f} "
                       f"({s['verdict_queries']} test queries, ties count half)")
    logging.print_main(f"labeler's score of the responses: {s['true_score_before']:.3f} before training → "
                       f"{s['true_score_after']:.3f} after; final KL {s['final_kl']:.2f} "
                       f"(target {s['kl_target']}, kl_coef {s['final_kl_coef']:.3f})")
    for pair in s["samples"]:
        logging.print_main(f"query:  {pair['query']!r}\nbefore: {pair['before']!r} ({pair['before_score']:+.0f})\n"
                           f"after:  {pair['after']!r} ({pair['after_score']:+.0f})")
