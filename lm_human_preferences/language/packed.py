"""bf16 matrices prepacked for oneDNN, for forward passes without gradients on a CPU.

A bf16 `F.linear` on a CPU hands oneDNN a plain row-major matrix, which it reorders into its
blocked layout inside every call; at the small row counts of sampling (one new token per row)
that reorder costs as much as the product itself. Packing once (`_reorder_linear_weight`) and
calling oneDNN's linear on the packed matrix gives the same numbers, in measured bf16 products
of GPT-2 124M at batch 8 on this project's CPU about 1.8× faster (a decode step's Linear layers
and logits: 13 ms against 23.5 ms, one thread).

Only matrices already in bf16 are packed (a frozen bf16 model's, or a working copy's while it
is active), only on CPUs where oneDNN multiplies bf16 natively, and only for calls that record
no gradient: everything else computes as before. A packed matrix is kept (as much memory again
as the bf16 matrix) and reused until its source changes (a version counter says so), so a
trained policy repacks once per optimizer step's worth of sampling and a frozen model once.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from lm_human_preferences.language.model import Model
from lm_human_preferences.utils import distributed


def available(device: torch.device) -> bool:
    """Whether this torch and CPU can run prepacked bf16 products."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available() and distributed.cpu_has_native_bf16()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# The row count oneDNN tunes a packed matrix for. One value for every call, so that a matrix is
# packed once: measured (one thread), a matrix packed for 8 rows multiplies 8 rows and 704 rows
# as fast as one packed for those counts.
PACK_ROWS = 8


def _pack(owner: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` packed, kept on `owner` until the weight changes (its version counter says so)."""
    cached = owner.__dict__.get("_packed_weight")
    if cached is not None and cached[0] is weight and cached[1] == weight._version:
        return cached[2]
    matrix = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
    owner.__dict__["_packed_weight"] = (weight, weight._version, matrix)
    return matrix


def _packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, plain, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return plain(x)  # oneDNN's packed linear has no backward
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, bias, "none", [], "")


@contextlib.contextmanager
def packed(model: Model):
    """Within the block, the model's bf16 Linear layers and bf16 output embedding compute from
    prepacked matrices."""
    if not available(model.wte.weight.device):
        yield
        return
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16
               and (m.bias is None or m.bias.dtype == torch.bfloat16)]
    try:
        for module in linears:
            bias = None if module.bias is None else module.bias.detach()
            module.forward = functools.partial(_packed_linear, _pack(module, module.weight), bias,
                                               functools.partial(F.linear, weight=module.weight, bias=module.bias))
        if model.wte_lowp is not None and model.wte_lowp.dtype == torch.bfloat16:
            output = model.wte_lowp
            model.output_projection = functools.partial(_packed_linear, _pack(model, output), None,
                                                        functools.partial(F.linear, weight=output))
        yield
    finally:
        for module in linears:
            module.__dict__.pop("forward", None)
        model.output_projection = None
