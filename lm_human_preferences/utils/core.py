"""Small numeric helpers shared by reward and policy training."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lm_human_preferences.utils.errors import UserError


def exact_div(a: int, b: int) -> int:
    """a / b for integers that must divide evenly; a clear error when they do not."""
    if b == 0:
        raise UserError(f"cannot divide {a} by zero")
    q, r = divmod(a, b)
    if r != 0:
        raise UserError(f"{a} is not divisible by {b}; choose sizes that divide evenly")
    return q


def ceil_div(a: int, b: int) -> int:
    """Smallest integer q with q * b >= a (b positive)."""
    if b <= 0:
        raise UserError(f"cannot divide {a} into groups of {b}; the divisor must be positive")
    return -(-a // b)


def whiten(values: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalize to mean 0 and variance 1 over ALL elements (biased variance, as tf.nn.moments).

    With shift_mean=False the original mean is added back, so only the scale changes.
    """
    values = values.float()
    mean = values.mean()
    var = ((values - mean) ** 2).mean()
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits)[labels] and the entropy of softmax(logits) along the last axis, from one
    float32 log-softmax. The entropy is only a statistic: computed without gradient (None if not asked)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logprobs = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logprobs, None
    with torch.no_grad():
        return logprobs, -(logp.exp() * logp).sum(-1)


def row_slices(rows: int, chunk_size: int | None) -> list[slice]:
    """Consecutive slices of at most chunk_size rows covering `rows` (one slice when chunk_size is None).

    This is how every batch is split into micro-batches (`run.chunk_size`) to bound peak memory.
    """
    if not chunk_size or chunk_size >= rows:
        return [slice(0, rows)]
    return [slice(i, i + chunk_size) for i in range(0, rows, chunk_size)]


def map_chunks(fn: Callable, chunk_size: int | None, *tensors: torch.Tensor):
    """fn over row-chunks of `tensors` (at most chunk_size rows each), outputs concatenated.

    `fn` returns a tensor, or a dict of tensors (None values stay None).
    """
    parts = row_slices(tensors[0].shape[0], chunk_size)
    if len(parts) == 1:
        return fn(*tensors)
    outputs = [fn(*(t[part] for t in tensors)) for part in parts]
    if isinstance(outputs[0], dict):
        return {k: None if outputs[0][k] is None else torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    return torch.cat(outputs)


def grad_norm(params) -> torch.Tensor:
    """The L2 norm of all gradients together (0 when there are none)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def weight_norm(params) -> torch.Tensor:
    """The L2 norm of all parameters together."""
    return torch.nn.utils.get_total_norm([p.detach() for p in params])


def check_finite(where: str, **quantities: torch.Tensor) -> None:
    """Stop the run with a clear error when a loss, gradient or weight norm is NaN or infinite.

    Raised before the optimizer step (or the save), so nothing non-finite reaches a checkpoint
    and the last good one stays `latest`. One device→host read however many quantities are checked.
    """
    if bool(torch.stack([torch.isfinite(v).all() for v in quantities.values()]).all()):
        return
    for name, value in quantities.items():
        if not torch.isfinite(value).all():
            raise UserError(f"{where}: the {name} became {value.float().sum().item()}; training diverged. The last "
                            "good checkpoint is kept; lower the learning rate and rerun with --run.overwrite on")
