"""Matrices prepacked for oneDNN, for forward passes without gradients on a CPU.

A `F.linear` on a CPU hands its library a plain row-major matrix: in bf16 oneDNN reorders it
into its blocked layout inside every call, and in float32 MKL's product is slow at few rows. At
the small row counts of sampling (one new token per row) that costs as much as the product
itself, or more. Packing once (`_reorder_linear_weight`) and calling oneDNN's linear on the
packed matrix gives the same numbers, faster (GPT-2 124M at batch 8, this project's CPUs):
  - bf16 (native bf16 CPUs): a decode step's Linear layers and logits 13 ms against 23.5 ms, one thread;
  - float32 (an AVX2 CPU, 2 threads): each trunk matrix 1.7–2.2× faster at 8 rows, 1.0–1.3× at 32,
    1.1× at 64, about even at 128 and 1.1–1.2× slower at 704; the output embedding (50,257 × 768)
    3.1× faster at 8 rows, still 1.6× at 128 and 1.2× at 704.
So float32 trunk matrices take the packed product only for calls of at most FLOAT32_MAX_ROWS
rows (sampling's decode steps), the output embedding always; and only matrices of at least
FLOAT32_MIN_ELEMENTS elements are packed (smaller ones multiply faster plain: the packaged `kjv`
model's 128-wide trunk matrices, 49k–66k elements, 12–22% slower packed at 8 and 64 rows; from
197k elements packed was faster). `bench/packed_linear.py` measures all of this on the machine
at hand.

Only matrices in the dtype the forward computes in are packed (a frozen bf16 model's, a working
copy's while it is active, a float32 model's), only on CPUs where oneDNN multiplies that dtype
natively, and only for calls that record no gradient: everything else computes as before. A
packed bf16 matrix, and any matrix of a frozen model, is kept (as much memory again as the
matrix) and reused until its source changes (a version counter says so), so a trained policy
repacks once per optimizer step's worth of sampling and a frozen model once. A trained model's
float32 matrices are packed for the block only (`trunk` ones only where asked: sampling), so
that they add no memory outside it — twice the bf16 matrices' size, kept, they would crowd the
largest models out of memory — at the cost of a repack per block (~0.14 s for GPT-2 124M by
bench/packed_linear.py's pack times, which PPO pays anyway: its weights change every update).
A frozen float32 model's forward packs only its output embedding (Policy.analyze_responses),
once: repacked on every call (62 ms at 124M) it would cost about what it saves at the reference
forward's 192 rows.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from lm_human_preferences.language.model import Model
from lm_human_preferences.utils import distributed


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch and CPU can run prepacked products in `dtype` (float32, or native bf16)."""
    if not (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and distributed.cpu_has_native_bf16())


# The row count oneDNN tunes a packed matrix for. One value for every call, so that a matrix is
# packed once: measured (one thread), a matrix packed for 8 rows multiplies 8 rows and 704 rows
# as fast as one packed for those counts.
PACK_ROWS = 8
# Float32 calls with more rows than this take the plain product (faster there), except the
# output embedding's; float32 matrices with fewer elements than this are not packed (see the
# module docstring: the crossover lies between 66k and 197k elements; 2^18 leaves a margin).
FLOAT32_MAX_ROWS = 64
FLOAT32_MIN_ELEMENTS = 2 ** 18


def _pack(owner: nn.Module, weight: torch.Tensor, keep: bool) -> torch.Tensor:
    """`weight` packed; with `keep`, kept on `owner` until the weight changes (its version counter says so)."""
    cached = owner.__dict__.get("_packed_weight")
    if cached is not None and cached[0] is weight and cached[1] == weight._version:
        return cached[2]
    matrix = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
    if keep:
        owner.__dict__["_packed_weight"] = (weight, weight._version, matrix)
    return matrix


def _packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, plain, max_rows: int | None,
                   x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return plain(x)  # oneDNN's packed linear has no backward
    if max_rows is not None and x.numel() > max_rows * x.shape[-1]:
        return plain(x)
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "")


@contextlib.contextmanager
def packed(model: Model, dtype: torch.dtype, trunk: bool = True):
    """Within the block, the model's `dtype` Linear layers and output embedding compute from
    prepacked matrices, where this CPU packs `dtype` (`available`). In float32 the Linear layers
    only with `trunk` (they pay only at few rows: sampling)."""
    if not available(model.wte.weight.device, dtype):
        yield
        return
    if dtype == torch.float32:  # the rules of the module docstring
        keep, max_rows, min_elements, pack_trunk = model.frozen, FLOAT32_MAX_ROWS, FLOAT32_MIN_ELEMENTS, trunk
    else:  # bf16 pays at every row count and size
        keep, max_rows, min_elements, pack_trunk = True, None, 0, True
    linears = [m for m in model.modules() if pack_trunk and isinstance(m, nn.Linear) and m.weight.dtype == dtype
               and (m.bias is None or m.bias.dtype == dtype) and m.weight.numel() >= min_elements]
    try:
        for module in linears:
            bias = None if module.bias is None else module.bias.detach()
            module.forward = functools.partial(_packed_linear, _pack(module, module.weight, keep), bias,
                                               functools.partial(F.linear, weight=module.weight, bias=module.bias),
                                               max_rows)
        output = model.wte_lowp if model.wte_lowp is not None else model.wte.weight
        if output.dtype == dtype and output.numel() >= min_elements:
            model.output_projection = functools.partial(_packed_linear, _pack(model, output, keep), None,
                                                        functools.partial(F.linear, weight=output), None)
        yield
    finally:
        for module in linears:
            module.__dict__.pop("forward", None)
        model.output_projection = None
