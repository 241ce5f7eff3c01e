"""The task: which queries, how they are formatted, and how responses are truncated (docs/original.md)."""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch

from lm_human_preferences.language import datasets, encodings, trained_models
from lm_human_preferences.language.encodings import Encoding
from lm_human_preferences.utils import hyperparams
from lm_human_preferences.utils.errors import UserError


@dataclass
class PolicyHParams(hyperparams.HParams):
    temperature: float = 1.0
    initial_model: Optional[str] = None


@dataclass
class TaskHParams(hyperparams.HParams):
    # Query params
    query_length: Optional[int] = None
    query_dataset: Optional[str] = None
    query_prefix: str = ""
    query_suffix: str = ""
    start_text: Optional[str] = "."
    end_text: Optional[str] = None
    # Response params
    response_length: Optional[int] = None
    # Truncate a response after the first truncate_token at index >= truncate_after.
    truncate_token: Optional[int] = None
    truncate_after: int = 0
    penalty_reward_value: float = -1.0
    policy: PolicyHParams = field(default_factory=PolicyHParams)

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        for name in ("query_length", "query_dataset", "response_length"):
            if getattr(self, name) is None:
                raise UserError(f"hparam {_prefix}{name} must be set")
        if self.policy.initial_model is None:
            raise UserError(f"hparam {_prefix}policy.initial_model must be set (e.g. 124M)")
        if self.query_length <= 0 or self.response_length <= 0:
            raise UserError(f"{_prefix}query_length and {_prefix}response_length must be positive")
        if not 0 < self.policy.temperature < float("inf"):
            raise UserError(f"hparam {_prefix}policy.temperature must be positive, got {self.policy.temperature}")
        self._check_context(_prefix)

    def _check_context(self, _prefix: str) -> None:
        """Query (with its prefix and suffix) and response must fit the initial model's context."""
        model = self.policy.initial_model
        n_ctx, encoding_name = trained_models.context_and_encoding(model)
        texts = [text for text in (self.query_prefix, self.query_suffix) if text]  # `main` downloads its BPE files
        extra = sum(len(encodings.get(encoding_name).encode(text)) for text in texts)
        total = extra + self.query_length + self.response_length
        if total <= n_ctx:
            return
        parts = f"{_prefix}query_length ({self.query_length}) + {_prefix}response_length ({self.response_length})"
        if extra:
            parts += f" + {extra} tokens of {_prefix}query_prefix/query_suffix"
        budget = n_ctx - extra  # for query_length + response_length
        if budget - self.query_length >= 1:
            fix = f"lower --{_prefix}response_length to at most {budget - self.query_length}"
        elif budget >= 2:
            fix = f"lower --{_prefix}query_length and --{_prefix}response_length to at most {budget} together"
        else:
            fix = f"shorten --{_prefix}query_prefix and --{_prefix}query_suffix"
        raise UserError(f"{parts} = {total} tokens exceed the context of model {model!r} ({n_ctx} tokens); "
                        f"{fix}, or choose a model with a longer context")


def query_formatter(task: TaskHParams, encoding: Encoding):
    """queries [batch, query_length] → model context [batch, prefix + query_length + suffix]."""
    prefix = encoding.encode(task.query_prefix)
    suffix = encoding.encode(task.query_suffix)

    def format_queries(queries: torch.Tensor) -> torch.Tensor:
        batch = queries.shape[0]
        parts = [torch.tensor(p, dtype=queries.dtype, device=queries.device).expand(batch, -1) for p in (prefix, suffix)]
        return torch.cat([parts[0], queries, parts[1]], dim=1)

    return format_queries


def postprocess_responses(task: TaskHParams, responses: torch.Tensor, padding_token: int) -> torch.Tensor:
    """Every token after the first truncate_token at index ≥ truncate_after becomes padding."""
    if task.truncate_token is None:
        return responses
    index = torch.arange(responses.shape[1], device=responses.device)
    hit = (responses == task.truncate_token) & (index >= task.truncate_after)
    after_first_hit = (torch.cumsum(hit, dim=1) - hit.long()) > 0
    return torch.where(after_first_hit, padding_token, responses)


def has_truncate_token(task: TaskHParams, responses: torch.Tensor) -> torch.Tensor:
    """[batch] bool: whether a response holds truncate_token at some index ≥ truncate_after.

    Responses without it are scored `penalty_reward_value` instead of by the reward model.
    """
    if task.truncate_token is None:
        return torch.ones(responses.shape[0], dtype=torch.bool, device=responses.device)
    return (responses[:, task.truncate_after:] == task.truncate_token).any(dim=1)


def query_batches(task: TaskHParams, encoding: Encoding, batch_size: int, *, mode: str = "train",
                  seed: int = 0, rank: int = 0, world: int = 1,
                  device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Endless batches [batch_size, query_length] of this rank's queries.

    The dataset's shuffle seed is fixed (0 by default) and independent of the run's seed, as
    in the original.
    """
    stream = datasets.query_stream(task.query_dataset, encoding, task.query_length, start_text=task.start_text,
                                   end_text=task.end_text, mode=mode, seed=seed, rank=rank, world=world)
    while True:
        batch = [next(stream) for _ in range(batch_size)]
        yield torch.tensor(batch, dtype=torch.long, device=device)
