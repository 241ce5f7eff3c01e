"""Estimates for a run before it starts: a rank's peak memory, and the run's duration on a known device.

Both come from the model's shape and the batch; neither loads weights. They are estimates, for
the dry run (`launch.py ... --dry_run`) to say whether a run fits and roughly how long it takes.

Memory (bytes of tensors a rank holds at its peak; the process's own runtime — torch's few
hundred MiB of RSS on a CPU, the CUDA context on a GPU — comes on top), the larger of two phases:

  PPO (train_policy):  the policy PPO trains: float32 weights, gradients and Adam's two moments
      (16 bytes a parameter), plus a bf16 working copy of its matrices when it computes in bf16;
      the frozen reference and reward model in their compute dtype (`frozen_bytes`; an online
      run's reward model is trained, as the policy); and the activations the backward pass keeps
      for one micro-batch of min(run.chunk_size, rows of a gradient step) sequences
      (`activation_bytes`), the response's logits included.
  reward model training (train_reward, and train_policy's rewards.train_new_model first): the
      reward model trained (16 bytes a parameter, plus its working copy) and the frozen initial
      policy that samples for its normalization; in train_policy also the policy and reference,
      loaded in float32 before the reward model trains. Activations as above, for min(chunk_size,
      the rank's batch × responses a label) sequences, without logits (the reward model computes none).

Activations a sequence, in float32 (`ACTIVATION_FLOATS` and `LOGIT_COPIES`, from counting what
autograd keeps, checked against measured peaks: docs/estimates.md): per token and layer about
ACTIVATION_FLOATS numbers of width n_embd (the block's input and LayerNorm outputs, q, k, v, the
attention output, the MLP's hidden state before and after GELU and GELU's intermediates) plus one
attention probability per head and earlier token; per response token LOGIT_COPIES copies of the
vocabulary's logits (the logits, their log-softmax, and the gradients of both). Under bf16 the
matrix products' outputs are bf16 (BF16_ACTIVATION_SHARE of the float32 figure). With
run.gradient_checkpointing a block keeps only its input, and one block's activations are live
while it is recomputed.

Time (`duration`): the run's floating-point operations (2 a parameter and token forward, 6 forward
and backward; every sampled, scored and trained token of every phase) at the utilisation the
original reached on V100s (`V100_EPISODES_PER_S`: its 124M runs, 1M episodes in about 4.8 hours
on 8 V100s in float32), applied to the device class's dense peak (`PEAK_TFLOPS`). The original's
utilisation is an assumption on other devices: smaller per-rank batches on faster GPUs usually
reach less (sampling a token at a time is latency-bound), so read it as a lower bound there.
On a CPU, the FLOP rate this project measured for 124M in float32 (`CPU_GFLOPS_PER_THREAD`,
docs/estimates.md), per thread; small models (the packaged `kjv`, `test`) run far below it.
"""

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from lm_human_preferences.language import model as lm, trained_models
from lm_human_preferences.training import train_policy, train_reward

TRAINED_BYTES = 16  # float32 weights, gradients, and Adam's two moments
ACTIVATION_FLOATS = 20
LOGIT_COPIES = 4
BF16_ACTIVATION_SHARE = 0.75
GIB = 2 ** 30

# Dense peak TFLOP/s of the matrix units, by device class and compute dtype (vendor figures, SXM
# parts). The V100 has no bf16 units; float32 on the A100/H100 runs without TF32 here.
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 67.0}, "A100": {"bf16": 312.0, "fp32": 19.5},
               "V100": {"fp32": 15.7}}
V100_EPISODES_PER_S = 57 / 8  # the original's books runs (124M, 64 + 24 tokens), a V100 (docs/original.md)
CPU_GFLOPS_PER_THREAD = 50.0  # 124M PPO, float32, 2 threads (docs/estimates.md)


@dataclass(frozen=True)
class Shape:
    """What the estimates need of a model: its parameter counts and dimensions."""

    params: int  # every parameter (one scalar head included)
    matrices: int  # of them, the Linear layers' weights and the token embedding (a working copy's share)
    linears: int  # the Linear layers' weights: what a token's forward multiplies, stored in bf16 when frozen in bf16
    vocab_matrix: int  # the token embedding (n_vocab × n_embd), also the output embedding
    hparams: lm.HParams


def shape(hparams: lm.HParams) -> Shape:
    """Count the parameters of a model of `hparams` (with one scalar head) built on the meta device."""
    with torch.device("meta"):
        model = lm.Model(hparams, heads=("value",))
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.weight.shape[0] > 1)
    vocab = model.wte.weight.numel()
    return Shape(sum(p.numel() for p in model.parameters()), linears + vocab, linears, vocab, hparams)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def frozen_bytes(s: Shape, dtype: torch.dtype, cpu: bool, logits: bool) -> float:
    """A frozen model (`Model.freeze`): in bf16 its Linear layers are stored in bf16 and its output
    embedding gets a bf16 copy; on a CPU its matrices are prepacked once (language/packed.py: in
    float32 only the output embedding, and only for a model that computes logits)."""
    if dtype == torch.float32:
        return 4 * s.params + (4 * s.vocab_matrix if cpu and logits else 0)
    low = dtype_bytes(dtype)
    stored = 4 * s.params - (4 - low) * s.linears + low * s.vocab_matrix
    return stored + (low * (s.linears + s.vocab_matrix) if cpu else 0)


def trained_bytes(s: Shape, dtype: torch.dtype) -> float:
    """A trained model: TRAINED_BYTES a parameter, plus its low-precision working copy (tf_adam.WorkingCopy)."""
    return TRAINED_BYTES * s.params + (dtype_bytes(dtype) * s.matrices if dtype != torch.float32 else 0)


def activation_bytes(s: Shape, rows: int, tokens: float, response_tokens: int, dtype: torch.dtype,
                     checkpointing: bool, logits: bool) -> float:
    """What one forward pass of `rows` sequences keeps for its backward pass (see the module doc)."""
    hp = s.hparams
    scale = 1.0 if dtype == torch.float32 else BF16_ACTIVATION_SHARE
    layer = rows * tokens * (ACTIVATION_FLOATS * hp.n_embd + hp.n_head * tokens) * 4 * scale
    blocks = rows * tokens * hp.n_embd * 4 * hp.n_layer + layer if checkpointing else layer * hp.n_layer
    return blocks + (rows * response_tokens * hp.n_vocab * 4 * LOGIT_COPIES if logits else 0)


@dataclass
class Memory:
    """A phase's estimated peak, in bytes, by what holds it."""

    phase: str
    models: float
    activations: float
    rows: int  # sequences a forward pass with gradients

    @property
    def total(self) -> float:
        return self.models + self.activations


def ppo_memory(hp: train_policy.HParams, s: Shape, world: int, dtype: torch.dtype, cpu: bool) -> Memory:
    minibatch = hp.ppo.batch_size // (world * hp.ppo.nminibatches)
    rows = min(hp.run.chunk_size or minibatch, minibatch)
    tokens = hp.task.query_length + hp.task.response_length
    models = trained_bytes(s, dtype) + frozen_bytes(s, dtype, cpu, logits=True)
    # the reward model: frozen, or trained in label rounds between the updates (rewards.online)
    models += trained_bytes(s, dtype) if hp.rewards.online is not None else frozen_bytes(s, dtype, cpu, logits=False)
    activations = activation_bytes(s, rows, tokens, hp.task.response_length, dtype, hp.run.gradient_checkpointing,
                                   logits=True)
    return Memory("PPO", models, activations, rows)


def reward_memory(hp: train_reward.HParams, s: Shape, world: int, dtype: torch.dtype, cpu: bool,
                  responses: int, policies_loaded: bool) -> Memory:
    """`responses`: sequences a label record (its label type's); `policies_loaded`: in train_policy,
    whose policy and reference are held meanwhile."""
    sequences = hp.batch_size // world * responses
    rows = min(max(1, (hp.run.chunk_size or sequences) // responses) * responses, sequences)
    q, r = hp.task.query_length, hp.task.response_length
    tokens = q / responses + r if hp.run.share_queries else q + r  # a record's query runs once for its responses
    models = trained_bytes(s, dtype) + frozen_bytes(s, dtype, cpu, logits=True)
    models += 8 * s.params if policies_loaded else 0
    activations = activation_bytes(s, rows, tokens, r, dtype, hp.run.gradient_checkpointing, logits=False)
    return Memory("reward model training", models, activations, rows)


def forward_flops(s: Shape, tokens: float, logit_tokens: float) -> float:
    """Multiply-adds × 2 of a forward pass over `tokens` tokens, logits at `logit_tokens` of them."""
    hp = s.hparams
    attention = 2 * hp.n_layer * tokens * tokens * hp.n_embd  # q·k and the weighted sum of v
    return 2 * s.linears * tokens + 2 * s.vocab_matrix * logit_tokens + attention


def ppo_flops(hp: train_policy.HParams, s: Shape) -> float:
    """Per episode: sample (query forward, then a token at a time), the reference's and the reward
    model's forwards, and noptepochs of training forward and backward (3 × a forward)."""
    q, r = hp.task.query_length, hp.task.response_length
    forward = forward_flops(s, q + r, r)
    decode_attention = 2 * s.hparams.n_layer * r * (q + r) * s.hparams.n_embd  # each new token against the context
    sample = forward_flops(s, q, 1) + r * forward_flops(s, 1, 1) + decode_attention
    return sample + forward + forward_flops(s, q + r, 0) + 3 * hp.ppo.noptepochs * forward


def reward_flops(hp: train_reward.HParams, s: Shape, responses: int) -> float:
    """Sampling and scoring for the normalizations, then training on every label's responses."""
    q, r = hp.task.query_length, hp.task.response_length
    per_sample = forward_flops(s, q, 1) + r * forward_flops(s, 1, 1) + forward_flops(s, q + r, 0)
    samples = hp.normalize_samples * (hp.normalize_before + hp.normalize_after) + hp.debug_normalize
    return samples * per_sample + hp.epochs * hp.labels.num_train * responses * 3 * forward_flops(s, q + r, 0)


def device_class(name: str) -> str | None:
    """H100, A100 or V100 for a CUDA device name (e.g. "NVIDIA H100 80GB HBM3"), else None."""
    return next((known for known in PEAK_TFLOPS if known in name.upper()), None)


@functools.lru_cache(maxsize=None)
def _v100_utilisation() -> float:
    """The share of a V100's float32 peak the original's books runs reached (its 124M, 64 + 24 tokens)."""
    hp = train_policy.HParams()
    hp.task.query_length, hp.task.response_length = 64, 24
    flops = ppo_flops(hp, shape(trained_models.GPT2_HPARAMS["124M"]))
    return V100_EPISODES_PER_S * flops / (PEAK_TFLOPS["V100"]["fp32"] * 1e12)


def flop_rate(device_name: str, dtype: torch.dtype, threads: int) -> tuple[float, str] | None:
    """(FLOP/s a rank, the basis in words) on `device_name` ("cpu" or a CUDA name), or None when unknown."""
    if device_name == "cpu":
        return (CPU_GFLOPS_PER_THREAD * 1e9 * threads,
                f"{CPU_GFLOPS_PER_THREAD:g} GFLOP/s a thread × {threads} threads, the rate measured for 124M in "
                "float32 on this project's CPU (docs/estimates.md); small models run far slower")
    known = device_class(device_name)
    precision = "fp32" if dtype == torch.float32 else "bf16"
    if known is None or precision not in PEAK_TFLOPS[known]:
        return None
    peak = PEAK_TFLOPS[known][precision]
    utilisation = _v100_utilisation()
    return (peak * 1e12 * utilisation,
            f"{utilisation:.0%} of the {known}'s {peak:g} TFLOP/s {precision} peak, the share the original reached "
            "on V100s (57 episodes/s on 8)" + ("" if known == "V100" else "; a lower bound: sampling a token at a "
                                                "time gains less than the peak (bench/gpu_check.py measures it)"))


def duration(total_flops: float, rate: float, ranks: int) -> float:
    """Seconds for `total_flops` split evenly over `ranks` ranks of `rate` FLOP/s each."""
    return total_flops / (rate * ranks)


def format_bytes(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 2 else f"{n / 2 ** 20:.0f} MiB"


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{max(1, math.ceil(seconds))} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
