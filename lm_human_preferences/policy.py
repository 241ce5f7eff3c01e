"""The policy: a language model (plus a `value` head when trained) that answers queries."""

import torch

from lm_human_preferences import lm_tasks
from lm_human_preferences.language import sample
from lm_human_preferences.language.encodings import Encoding
from lm_human_preferences.language.model import Model
from lm_human_preferences.utils import core, distributed


class Policy:
    def __init__(self, model: Model, encoding: Encoding, task: lm_tasks.TaskHParams):
        self.model = model
        self.encoding = encoding
        self.temperature = task.policy.temperature
        self.format_queries = lm_tasks.query_formatter(task, encoding)

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    def respond(self, queries: torch.Tensor, length: int, generator: torch.Generator | None = None,
                chunk_size: int | None = None) -> dict:
        """Sample `length` response tokens for queries [batch, query_length].

        Returns responses [batch, length], their log-probs under logits / temperature, and
        (with a value head) the value at the position that chose each token. Rows are sampled
        `chunk_size` at a time; the random numbers are drawn for the whole batch first, so
        the result does not depend on the chunking.
        """
        noise = torch.rand(queries.shape[0], length, generator=generator, device=self.device)

        def respond_chunk(queries: torch.Tensor, noise: torch.Tensor) -> dict:
            with distributed.autocast(self.device):
                samples = sample.sample(self.model, self.format_queries(queries), length, noise=noise,
                                        padding_token=self.encoding.padding_token, temperature=self.temperature)
            return dict(responses=samples.tokens, logprobs=samples.logprobs, values=samples.values.get("value"))

        return core.map_chunks(respond_chunk, chunk_size, queries, noise)

    def analyze_responses(self, queries: torch.Tensor, responses: torch.Tensor) -> dict:
        """Log-probs, entropies and values of given responses, as when they were sampled.

        The model runs on context + responses; the outputs at positions context_len−1 … end−1
        are the ones that predict the response tokens.
        """
        context = self.format_queries(queries)
        tokens = torch.cat([context, responses], dim=1)
        with distributed.autocast(self.device):
            out = self.model(tokens, self.encoding.padding_token, output_slice=slice(context.shape[1] - 1, -1))
        logits = out.logits.float() / self.temperature
        return dict(
            logprobs=core.logprobs_from_logits(logits, responses),
            entropies=core.entropy_from_logits(logits),
            values=out.heads.get("value"),
        )
