"""Autoregressive sampling with a preallocated KV cache, all rows at once."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm_human_preferences.language.model import Model, Output, prefix_groups


@dataclass
class Samples:
    tokens: torch.Tensor  # [batch, length] long
    logprobs: torch.Tensor  # [batch, length] float32, log-probs under logits / temperature
    values: dict[str, torch.Tensor]  # head name -> [batch, length]: the head at the position that chose each token


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf. logits [batch, vocab]."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


@torch.no_grad()
def sample(model: Model, context: torch.Tensor, length: int, *, padding_token: int | None,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
           share_context: bool = True) -> Samples:
    """Sample `length` tokens after `context` [batch, context_len] (which may contain padding).

    Each token is drawn by inverting the CDF at a uniform number, one per row and step:
    `noise` [batch, length] if given, else drawn from `generator`. Giving every row its own
    numbers makes the samples of a row independent of how the batch is split into chunks.

    With `share_context`, consecutive rows with the same context (a query repeated for N
    responses) run it once; each row then continues from a copy of that computation's cache.
    """
    batch, context_len = context.shape
    if noise is None:
        noise = torch.rand(batch, length, generator=generator, device=generator.device if generator else "cpu")
    noise = noise.to(context.device)
    groups = prefix_groups(context) if share_context else None
    first, run = groups if groups is not None else (None, None)
    cache = model.new_cache(batch if first is None else len(first), context_len + length)
    out = model(context if first is None else context[first], padding_token, cache=cache, output_slice=slice(-1, None))
    if first is not None:
        cache = cache.select(run)
        out = Output(logits=out.logits[run], heads={name: h[run] for name, h in out.heads.items()}, cache=cache)
    # A sampled token is never padding when the padding id lies outside the vocabulary; saying so
    # spares the model a check (a device sync) per step.
    step_padding = padding_token if padding_token is not None and 0 <= padding_token < model.hparams.n_vocab else None
    tokens, logprobs = [], []
    values: dict[str, list[torch.Tensor]] = {name: [] for name in out.heads}
    for step in range(length):
        logits = out.logits[:, -1].float() / temperature
        cdf = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1).cumsum(dim=-1)
        token = (cdf <= noise[:, step:step + 1] * cdf[:, -1:]).sum(dim=-1, keepdim=True)  # [batch, 1]
        token = token.clamp(max=logits.shape[-1] - 1)
        tokens.append(token)
        logprobs.append(F.log_softmax(logits, dim=-1).gather(-1, token))
        for name, head in out.heads.items():
            values[name].append(head[:, -1:])
        if step + 1 < length:
            out = model(token, step_padding, cache=cache)
    return Samples(
        tokens=torch.cat(tokens, dim=1),
        logprobs=torch.cat(logprobs, dim=1),
        values={name: torch.cat(v, dim=1) for name, v in values.items()},
    )
