"""The policy: a language model (plus a `value` head when trained) that answers queries."""

import contextlib

import torch

from lm_human_preferences.task import lm_tasks
from lm_human_preferences.language import encodings, packed, sample, trained_models
from lm_human_preferences.language.model import Model
from lm_human_preferences.utils import core, distributed, tf_adam


class Policy:
    def __init__(self, model: Model, encoding: encodings.Encoding, task: lm_tasks.TaskHParams, precision: str = "auto",
                 share_queries: bool = True):
        self.model = model
        self.encoding = encoding
        self.temperature = task.policy.temperature
        self.format_queries = lm_tasks.query_formatter(task, encoding)
        self.precision = precision  # run.precision: auto / fp32 / bf16
        self.share_queries = share_queries  # run.share_queries: one computation of a query repeated in a batch
        self._n_params = sum(p.numel() for p in model.parameters())
        self.working_copy: tf_adam.WorkingCopy | None = None  # bf16 weights kept in step with the trained ones

    def configure(self, run, frozen: bool = False) -> "Policy":
        """Take `run.precision`, `run.share_queries` and `run.gradient_checkpointing`; a `frozen` policy
        (never trained, e.g. the reference) stores its model in the compute precision once."""
        self.precision, self.share_queries = run.precision, run.share_queries
        self.model.gradient_checkpointing = run.gradient_checkpointing and not frozen
        if frozen:
            self.model.freeze(self.compute_dtype)
        elif self.compute_dtype != torch.float32 and self.model.frozen_dtype is None:
            # Trained in low precision: compute with a working copy of the weights (the autocast
            # results, without casting every weight on every forward call; tf_adam.WorkingCopy).
            self.working_copy = tf_adam.working_copy(self.model, self.compute_dtype)
        return self

    @contextlib.contextmanager
    def _weights(self, pack: bool, sampling: bool = False):
        """The context of forward calls: the working copy when there is one; with `pack`, the
        matrices prepacked (language/packed.py; in float32 the trunk's only when `sampling`)."""
        with contextlib.ExitStack() as stack:
            if self.working_copy is not None:
                stack.enter_context(self.working_copy.active())
            if pack:
                stack.enter_context(packed.packed(self.model, self.compute_dtype, trunk=sampling))
            yield

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """What matrix products run in: float32, or bf16 under per-forward autocast."""
        return distributed.compute_dtype(self.device, self.precision, self._n_params)

    def respond(self, queries: torch.Tensor, length: int, generator: torch.Generator | None = None,
                chunk_size: int | None = None) -> dict:
        """Sample `length` response tokens for queries [batch, query_length].

        Returns responses [batch, length], their log-probs under logits / temperature, and
        (with a value head) the value at the position that chose each token. Rows are sampled
        `chunk_size` at a time; the random numbers are drawn for the whole batch first, so
        the result does not depend on the chunking.
        """
        noise = torch.rand(queries.shape[0], length, generator=generator, device=self.device)
        dtype = self.compute_dtype

        def respond_chunk(queries: torch.Tensor, noise: torch.Tensor) -> dict:
            with distributed.autocast(self.device, dtype), self._weights(pack=True, sampling=True):
                samples = sample.sample(self.model, self.format_queries(queries), length, noise=noise,
                                        padding_token=self.encoding.padding_token, temperature=self.temperature,
                                        share_context=self.share_queries)
            return dict(responses=samples.tokens, logprobs=samples.logprobs, values=samples.values.get("value"))

        return core.map_chunks(respond_chunk, chunk_size, queries, noise)

    def analyze_responses(self, queries: torch.Tensor, responses: torch.Tensor, entropies: bool = True) -> dict:
        """Log-probs, entropies and values of given responses, as when they were sampled.

        The model runs on context + responses; the outputs at positions context_len−1 … end−1
        are the ones that predict the response tokens. Entropies are only a statistic: they are
        computed without gradient, and not at all with `entropies=False` (then None).
        """
        context = self.format_queries(queries)
        tokens = torch.cat([context, responses], dim=1)
        # A frozen model (the reference) computes from matrices packed once (language/packed.py;
        # in float32 only the output embedding).
        pack = self.model.frozen and not torch.is_grad_enabled()
        with distributed.autocast(self.device, self.compute_dtype), self._weights(pack=pack):
            out = self.model(tokens, self.encoding.padding_token, output_slice=slice(context.shape[1] - 1, -1),
                             shared_prefix=context.shape[1] if self.share_queries else 0)
        logits = out.logits.float()
        if self.temperature != 1.0:  # x / 1.0 == x: skip a copy of the largest tensor here
            logits = logits / self.temperature
        logprobs, entropy = core.logprobs_and_entropy(logits, responses, entropies)
        return dict(logprobs=logprobs, entropies=entropy, values=out.heads.get("value"))


def load_policy(model: str, task: lm_tasks.TaskHParams, device: torch.device | str = "cpu",
                heads: tuple[str, ...] = ()) -> Policy:
    """A model (a name, save folder or URL: `trained_models.load_initial`) as the policy of `task`.
    Without heads it only answers (eval mode); with a `value` head it is the one PPO trains."""
    loaded, encoding_name = trained_models.load_initial(model, heads=heads, device=device)
    return Policy(loaded if heads else loaded.eval(), encodings.get(encoding_name), task)
