"""The ceiling: PPO on the labeler's own score, with the label-scaling cells' budget, target and
horizon (run by `paper_findings.py --ceiling-run` in a fresh process, as the other cells are)."""

import json
from pathlib import Path

import torch

from lm_human_preferences.labeling import mock_labelers
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.training import train_policy
from lm_human_preferences.utils import storage

from .cells import HORIZON, TARGET, Cell
from .measurement import initial_policy
from .records import CEILING_FILE


class LabelerReward:
    """A reward function: the mock labeler's score of the decoded response, normalized with the
    mean and std it has on the initial policy's samples (a reward model is normalized so)."""

    def __init__(self, labeler: str, encoding: encodings.Encoding, mean: float, std: float):
        self.judge, self.encoding, self.mean, self.std = mock_labelers.get(labeler), encoding, mean, std

    def raw(self, queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        decode = self.encoding.decode
        return torch.tensor([self.judge(decode(q), decode(r)) for q, r in zip(queries.tolist(), responses.tolist())])

    def __call__(self, queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        return ((self.raw(queries, responses) - self.mean) / self.std).to(responses.device)


@torch.no_grad()
def labeler_moments(labeler: str, task: lm_tasks.TaskHParams, n: int, seed: int) -> tuple[float, float]:
    """Mean and std of the labeler's score of the initial policy's responses to `n` train queries."""
    policy = initial_policy(task)
    queries = next(lm_tasks.query_batches(task, policy.encoding, n, device=policy.device))
    responses = policy.respond(queries, task.response_length, torch.Generator(policy.device).manual_seed(seed))
    postprocessed = lm_tasks.postprocess_responses(task, responses["responses"], policy.encoding.padding_token)
    scores = LabelerReward(labeler, policy.encoding, 0.0, 1.0).raw(queries, postprocessed)
    return scores.mean().item(), scores.std(unbiased=False).item()


def ceiling_run(experiment: str, seed: int, keep: Path, kind: str, extra: list[str]) -> None:
    """PPO against the labeler itself, with the label-scaling cells' budget, target and horizon."""
    from lm_human_preferences import experiments
    from lm_human_preferences.cli import launch, options
    from lm_human_preferences.utils import distributed

    cell = Cell(experiment, seed, kind)
    # Validation wants one reward source; the labeler is named there for the record (never loaded:
    # train() is given the reward function).
    flags = {"save_dir": str(keep), "run.seed": str(seed), "rewards.adaptive_kl.target": str(TARGET),
             "rewards.adaptive_kl.horizon": str(HORIZON), "rewards.train_new_model": "off",
             "rewards.trained_model": f"mock:{cell.labeler} (the labeler's own score)",
             **options.parse(extra, booleans=set())}
    hp = launch.resolve("train_policy", experiment, cell.name, flags)
    samples = experiments.TRAIN_REWARD[experiment]().normalize_samples
    mean, std = labeler_moments(cell.labeler, hp.task, samples, seed)
    print(f"the {cell.labeler!r} labeler on {samples} initial samples: mean {mean:.3f}, std {std:.3f}", flush=True)
    storage.atomic_write_text(Path(hp.run.save_dir) / CEILING_FILE, json.dumps(dict(mean=mean, std=std, samples=samples)))
    reward_fn = LabelerReward(cell.labeler, encodings.get(trained_models.load_initial(hp.task.policy.initial_model)[1]),
                              mean, std)

    def run(h: train_policy.HParams) -> None:
        try:
            train_policy.train(h, reward_fn)
        finally:
            experiments.write_report(h)

    distributed.run(run, (hp,), 1)
