#!/usr/bin/env python3
"""One command for the day a GPU is there: what CPU CI cannot check, then PPO speed at the paper's shapes.

    python bench/gpu_check.py                     # on CUDA: GPT-2 124M (random weights); under 10 minutes on one H100
    python bench/gpu_check.py --model test        # tiny, on any machine: the CPU smoke test of this script

Checks, each isolated (one that fails or crashes is reported and the others still run):
  bf16        policy log-probs, values and gradients under bf16 autocast against float32
              (tolerances in BF16_TOLERANCE, below)
  mask_free   the mask-free attention path (is_causal / no mask, language/model.py
              MASK_FREE_DEVICES) against the dense-mask path, for a batch without padding, float32;
              on a CPU it runs too, by listing the CPU as mask-free for the check
  kv_cache    log-probs of KV-cache sampling against a full forward over context + samples, float32
  nccl        all-reduce, all-gather and broadcast (the helpers of utils/distributed.py) across
              the visible GPUs; skipped with fewer than 2
  gloo        the same over gloo between 2 CPU processes (CPU ranks; and the NCCL check's machinery)
  ppo         PPO updates at the descriptiveness shapes (batch 512 split over the visible GPUs,
              64 + 24 tokens, 4 epochs, run.chunk_size --chunk_size): episodes/s, sampling time per
              batch, peak GPU memory and MFU, on one rank (the per-rank share of the batch)
Prints one line per check (pass / FAIL / skipped, with its numbers), then `gpu_check: pass` when
nothing failed (exit 0), else `gpu_check: FAIL` (exit 1).
"""

import argparse
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

import common
from lm_human_preferences.language import model as lm
from lm_human_preferences.language import trained_models
from lm_human_preferences.task.policy import Policy, load_policy
from lm_human_preferences.training import train_policy, train_reward
from lm_human_preferences.utils import distributed

SIZES = {"124M": common.SIZES["124M"], "test": lm.HParams(n_vocab=27, n_ctx=32, n_embd=16, n_head=2, n_layer=2)}
# bf16 against float32 on the same weights and tokens: bf16 keeps 8 bits of mantissa (relative
# rounding 2^-9 ≈ 0.002 per operation), accumulated over the layers; a wrong path (a missed cast,
# a mask dropped, an overflow) is off by far more. Log-probs in nats; values relative to their
# largest magnitude; gradients as a whole (cosine of the flattened gradients, in float64).
BF16_TOLERANCE = dict(logprob_mean=0.05, logprob_max=0.5, value_rel_max=0.05, grad_cosine=0.99)
FP32_TOLERANCE = 1e-4  # the same computation by another path, float32: |Δ| ≤ this × max |value|
# Dense bf16 peak of the GPUs this is likely to meet (TFLOP/s); others: --peak_tflops.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


class Skip(Exception):
    """A check that does not apply here (the message says why)."""


def write_random_model(size: str, folder: Path) -> str:
    """A model folder of `size` with random weights (the original's initializers): what the commands
    load as `task.policy.initial_model`, with no weights to download. GPT-2's encoding (from the
    cache or LMHP_MIRROR), or for `test` the tiny one's."""
    if not (folder / "checkpoints" / "latest").exists():
        torch.manual_seed(0)
        encoding = "test" if size == "test" else "main"
        trained_models.save_checkpoint(folder, SIZES[size], encoding, lm.Model(SIZES[size]).state_dict(), step=0)
    return str(folder)


def model_name(args) -> str:
    """The random-weight folder of --model that the checks load through the commands' constructors."""
    return write_random_model(args.model, Path(args.model_dir or tempfile.mkdtemp()) / f"random-{args.model}")


def _task(args):
    task = common.task_hparams(args.model, args.query_length, args.response_length)
    task.policy.initial_model = args.initial_model
    return task


def _policy(args, device: torch.device, precision: str) -> Policy:
    """The policy PPO trains, as train_policy loads it (task/policy.load_policy), with its value head
    given weights (it starts at zero) so that the checks compare something."""
    torch.manual_seed(0)
    policy = load_policy(args.initial_model, _task(args), device, heads=("value",))
    policy.precision = precision
    with torch.no_grad():
        policy.model.heads["value"].weight.normal_(std=0.1)
    return policy


def _tokens(args, device: torch.device, batch: int, padded: bool, pad: int,
            padded_responses: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random queries and responses over the first 26 token ids; with `padded`, some queries start
    with padding `pad` (and with `padded_responses` some responses are truncated)."""
    gen = torch.Generator().manual_seed(1)
    queries = torch.randint(0, 26, (batch, args.query_length), generator=gen)
    responses = torch.randint(0, 26, (batch, args.response_length), generator=gen)
    if padded:
        queries[::3, :args.query_length // 4] = pad
    if padded_responses:
        responses[1::2, args.response_length // 2:] = pad
    return queries.to(device), responses.to(device)


def _close(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got − expected| relative to max |expected|."""
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1e-30)).item()


def check_bf16(args, device: torch.device) -> str:
    results = {}
    for precision in ("fp32", "bf16"):
        policy = _policy(args, device, precision)
        # responses as sampled: no padding
        queries, responses = _tokens(args, device, args.check_batch, True, policy.encoding.padding_token)
        out = policy.analyze_responses(queries, responses)
        (out["logprobs"].mean() + out["values"].pow(2).mean()).backward()
        grad = torch.cat([p.grad.reshape(-1).double() for p in policy.model.parameters() if p.grad is not None])
        results[precision] = out["logprobs"].detach(), out["values"].detach(), grad
    (lp32, v32, g32), (lp16, v16, g16) = results["fp32"], results["bf16"]
    lp_diff = (lp16 - lp32).abs()
    found = dict(logprob_mean=lp_diff.mean().item(), logprob_max=lp_diff.max().item(),
                 value_rel_max=_close(v16, v32),
                 grad_cosine=torch.nn.functional.cosine_similarity(g16, g32, dim=0).item())
    detail = ", ".join(f"{k} {v:.6g}" for k, v in found.items())
    bad = [k for k, v in found.items() if (v < BF16_TOLERANCE[k] if k == "grad_cosine" else v > BF16_TOLERANCE[k])]
    if bad:
        raise AssertionError(f"{detail}; out of tolerance {', '.join(f'{k} {BF16_TOLERANCE[k]}' for k in bad)}")
    return f"{detail} (tolerance {BF16_TOLERANCE})"


@contextlib.contextmanager
def _mask_free_on(device: torch.device, on: bool):
    saved = lm.MASK_FREE_DEVICES
    lm.MASK_FREE_DEVICES = tuple(d for d in saved if d != device.type) + ((device.type,) if on else ())
    try:
        yield
    finally:
        lm.MASK_FREE_DEVICES = saved


def check_mask_free(args, device: torch.device) -> str:
    model = _policy(args, device, "fp32").model
    queries, responses = _tokens(args, device, args.check_batch, False, pad=0)
    tokens = torch.cat([queries, responses], dim=1)
    outputs = {}
    for on in (False, True):
        with _mask_free_on(device, on), torch.no_grad():
            full = model(tokens, padding_token=None)
            cache = model.new_cache(tokens.shape[0], tokens.shape[1])  # then token by token after a cache:
            model(tokens[:, :-1], padding_token=None, cache=cache)       # the no-mask path for one new token
            last = model(tokens[:, -1:], padding_token=None, cache=cache)
        outputs[on] = full.logits, full.heads["value"], last.logits[:, -1]
    names = ("logits, one pass", "value head", "logits, one token after a cache")
    errors = {name: _close(outputs[True][i], outputs[False][i]) for i, name in enumerate(names)}
    detail = ", ".join(f"{k} {v:.2g}" for k, v in errors.items()) + f" (relative; tolerance {FP32_TOLERANCE})"
    if max(errors.values()) > FP32_TOLERANCE:
        raise AssertionError(detail)
    note = "" if device.type in lm.MASK_FREE_DEVICES else f" ({device.type} listed as mask-free for the check)"
    return detail + note


def check_kv_cache(args, device: torch.device) -> str:
    policy = _policy(args, device, "fp32")
    queries, _ = _tokens(args, device, args.check_batch, True, policy.encoding.padding_token)
    sampled = policy.respond(queries, args.response_length, torch.Generator(device).manual_seed(2))
    with torch.no_grad():
        full = policy.analyze_responses(queries, sampled["responses"])
    errors = {"logprobs": _close(sampled["logprobs"], full["logprobs"]),
              "values": _close(sampled["values"], full["values"])}
    detail = ", ".join(f"{k} {v:.2g}" for k, v in errors.items()) + \
        f" (relative, {args.check_batch} rows with padded queries; tolerance {FP32_TOLERANCE})"
    if max(errors.values()) > FP32_TOLERANCE:
        raise AssertionError(detail)
    return detail


def _collectives(index: int, world: int, init_method: str, errors: str, backend: str) -> None:
    """One rank of the collectives check: the repository's collective helpers, over NCCL on this
    rank's GPU or over gloo on the CPU."""
    try:
        if backend == "nccl":
            torch.cuda.set_device(index)
        torch.distributed.init_process_group(backend, init_method=init_method, rank=index, world_size=world)
        device = torch.device("cuda", index) if backend == "nccl" else torch.device("cpu")
        summed = distributed.all_reduce_sum(torch.full((1000,), float(index + 1), device=device))
        assert torch.all(summed == world * (world + 1) / 2), f"all_reduce_sum gave {summed[0].item()}"
        gathered = distributed.all_gather_cat(torch.full((2,), float(index), device=device))
        assert gathered.tolist() == [float(r) for r in range(world) for _ in range(2)], f"all_gather gave {gathered}"
        param = torch.nn.Parameter(torch.zeros(3, device=device))
        param.grad = torch.full((3,), float(index), device=device)
        distributed.average_gradients([param])
        assert torch.allclose(param.grad, torch.full((3,), (world - 1) / 2, device=device)), "average_gradients"
        module = torch.nn.Linear(4, 4).to(device)
        with torch.no_grad():
            module.weight.fill_(index)
        distributed.broadcast_module(module)
        assert torch.all(module.weight == 0), "broadcast_module"
        torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(errors, str(index)), "w") as f:
            f.write(traceback.format_exc())
        raise


def check_nccl(args, device: torch.device) -> str:
    if device.type != "cuda":
        raise Skip("no CUDA")
    world = torch.cuda.device_count()
    if world < 2:
        raise Skip(f"{world} GPU visible; NCCL collectives need at least 2")
    return _check_collectives("nccl", world)


def check_gloo(args, device: torch.device) -> str:
    """The same collectives over gloo between 2 CPU processes (what CPU ranks use; and the
    machinery of the NCCL check, exercised where there is no GPU)."""
    return _check_collectives("gloo", 2)


def _check_collectives(backend: str, world: int) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with tempfile.TemporaryDirectory() as errors:
        context = mp.start_processes(_collectives, args=(world, init_method, errors, backend), nprocs=world,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + 120
        try:  # join returns False whenever one rank exits before the others: wait on
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    for process in context.processes:
                        process.kill()
                    raise AssertionError(f"the {backend} ranks did not finish within 120 s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            pass  # a rank failed: its report below says how
        reports = []
        for name in sorted(os.listdir(errors)):
            with open(os.path.join(errors, name)) as f:
                reports.append(f"rank {name}: {f.read().strip().splitlines()[-1]}")
        if reports:
            raise AssertionError("; ".join(reports))
    where = f"{world} GPUs" if backend == "nccl" else f"{world} CPU processes"
    return f"all_reduce_sum, all_gather_cat, average_gradients, broadcast_module over {backend} across {where}"


def forward_flops(hp: lm.HParams, batch: int, tokens: int, outputs: int) -> float:
    """Matrix-product FLOPs of one forward pass: 2 per weight per token through the blocks,
    attention scores and mixing (causal, so half the square), and the vocabulary projection at
    the `outputs` positions that compute logits."""
    d, L = hp.n_embd, hp.n_layer
    blocks = 2 * 12 * d * d * L * tokens
    attention = 2 * 2 * L * d * tokens * tokens / 2
    return batch * (blocks + attention + 2 * d * hp.n_vocab * outputs)


def update_flops(hp: lm.HParams, batch: int, q: int, r: int, epochs: int) -> float:
    """FLOPs of one PPO update (recomputation by checkpointing not counted, as MFU conventionally):
    sampling (a context pass, then one token at a time attending to the cache), the reference
    and reward forwards, and `epochs` forward + backward (backward = 2 × forward) passes."""
    sampling = forward_flops(hp, batch, q, 1) + r * forward_flops(hp, batch, 1, 1)  # attention to the cache: small
    scoring = forward_flops(hp, batch, q + r, r) + forward_flops(hp, batch, q + r, 1)
    training = epochs * 3 * forward_flops(hp, batch, q + r, r)
    return sampling + scoring + training


def _peak_tflops(args, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak_tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU; give --peak_tflops"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value, f"{key} dense bf16"
    return None, f"no peak known for {name}; give --peak_tflops"


def _trainer(args, device: torch.device, per_rank: int) -> train_policy.PPOTrainer:
    """The PPO trainer as the commands build it: policy and reference by train_policy.load_policies,
    a new reward model by train_reward.new_reward_model."""
    torch.manual_seed(0)
    task = _task(args)
    hp = train_policy.HParams(task=task)
    hp.rewards.trained_model = "random"
    hp.ppo.batch_size, hp.ppo.total_episodes, hp.ppo.noptepochs = per_rank, per_rank * 10 ** 6, 4
    hp.run.chunk_size = args.chunk_size or None
    policy, reference = train_policy.load_policies(task, device)
    reward_model, _ = train_reward.new_reward_model(task, device)
    return train_policy.PPOTrainer(policy, reference, reward_model, hp, seed=0)


def _ppo_run(args, device: torch.device, per_rank: int) -> dict[str, float]:
    trainer = _trainer(args, device, per_rank)
    sampling: list[float] = []
    real_respond = trainer.policy.respond

    def timed_respond(*a, **k):
        seconds, result = common.timed(real_respond, *a, **k)
        sampling.append(seconds)
        return result

    trainer.policy.respond = timed_respond
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [common.timed(trainer.step, update)[0] for update in range(args.updates)]
    measured = times[1:] or times  # the first update warms up (kernels, allocator, compilation)
    result = dict(s_per_update=statistics.median(measured), sampling_s=statistics.median(sampling[1:] or sampling),
                  first_update_s=times[0], dtype=str(trainer.policy.compute_dtype).replace("torch.", ""))
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return result


def check_ppo(args, device: torch.device) -> str:
    ranks = max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
    if args.batch_size % ranks:
        raise AssertionError(f"batch {args.batch_size} does not split over {ranks} GPUs")
    per_rank = args.batch_size // ranks
    r = _ppo_run(args, device, per_rank)
    hp = SIZES[args.model]
    flops = update_flops(hp, per_rank, args.query_length, args.response_length, 4)
    peak, source = _peak_tflops(args, device)
    mfu = f"MFU {flops / r['s_per_update'] / (peak * 1e12):.1%} of {peak:g} TFLOP/s ({source})" if peak else f"MFU: {source}"
    memory = f"peak GPU memory {r['peak_gib']:.2f} GiB" if "peak_gib" in r else "peak GPU memory: no CUDA"
    return (f"{args.model}, {per_rank} episodes per rank × {ranks} rank(s), {args.query_length}+{args.response_length} "
            f"tokens, 4 epochs, chunk {args.chunk_size or 'none'}, {r['dtype']}: {per_rank / r['s_per_update']:.1f} "
            f"episodes/s per rank ({args.batch_size / r['s_per_update']:.1f} if every rank runs alike; the gradient "
            f"all-reduce not included), {r['s_per_update']:.2f} s/update (median after a warm-up of "
            f"{r['first_update_s']:.1f} s), sampling {r['sampling_s']:.2f} s per batch, {memory}, {mfu}")


def run_check(name: str, fn: Callable[[], str]) -> str:
    """Run one check in isolation; print its line; returns pass / FAIL / skipped."""
    started = time.perf_counter()
    try:
        detail = fn()
        status = "pass"
    except Skip as e:
        status, detail = "skipped", str(e)
    except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
        status = "FAIL"
        detail = f"{type(e).__name__}: {e}" if isinstance(e, AssertionError) else traceback.format_exc().strip()
    print(f"[{status}] {name} ({time.perf_counter() - started:.1f} s): {detail}", flush=True)
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=SIZES, default="124M",
                        help="124M: GPT-2 small, random weights; test: tiny, for CPU smoke tests")
    parser.add_argument("--batch_size", type=int, default=512, help="PPO episodes per update, over all ranks")
    parser.add_argument("--updates", type=int, default=3, help="PPO updates (the first one warms up)")
    parser.add_argument("--chunk_size", type=int, default=128, help="run.chunk_size of the PPO runs (0: none)")
    parser.add_argument("--check_batch", type=int, default=8, help="rows of the correctness checks")
    parser.add_argument("--query_length", type=int, default=64)
    parser.add_argument("--response_length", type=int, default=24)
    parser.add_argument("--peak_tflops", type=float, help="the device's peak TFLOP/s, for MFU")
    parser.add_argument("--skip", nargs="*", default=[], choices=["bf16", "mask_free", "kv_cache", "nccl", "gloo", "ppo"])
    parser.add_argument("--model_dir", help="where the random-weight model folder is written (default: a temporary one)")
    args = parser.parse_args()
    if args.model == "test":  # its context is 32 tokens
        args.query_length, args.response_length = min(args.query_length, 12), min(args.response_length, 8)
    args.initial_model = model_name(args)
    device = distributed.device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}; no CUDA: the GPU-only parts are skipped)"
    print(f"gpu_check: model {args.model} (random weights), device {name}, torch {torch.__version__}", flush=True)
    checks = {"bf16": lambda: check_bf16(args, device), "mask_free": lambda: check_mask_free(args, device),
              "kv_cache": lambda: check_kv_cache(args, device), "nccl": lambda: check_nccl(args, device),
              "gloo": lambda: check_gloo(args, device),
              "ppo": lambda: check_ppo(args, device)}
    statuses = {}
    for check, fn in checks.items():
        if check.split(",")[0] in args.skip:
            print(f"[skipped] {check}: --skip", flush=True)
            statuses[check] = "skipped"
            continue
        statuses[check] = run_check(check, fn)
    failed = [c for c, s in statuses.items() if s == "FAIL"]
    skipped = [c for c, s in statuses.items() if s == "skipped"]
    passed = len(statuses) - len(failed) - len(skipped)
    verdict = "FAIL" if failed else "pass"
    print(f"gpu_check: {verdict} ({passed} passed, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}, "
          f"{len(skipped)} skipped{': ' + ', '.join(skipped) if skipped else ''})", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
