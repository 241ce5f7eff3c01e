"""What the benchmarks share: models with random weights, PPO trainers with the speed options on
or off, the optimizer as it was before the fused one, timers, a table printer, and the results
file every bench writes with `--out FILE` — its figures beside the machine, torch version,
commit, date and thread count that produced them (`provenance()`), the records the docs' tables
are generated from (`python bench/docs_tables.py`).

Every benchmark alternates its variants (A B A B …) after one warm-up round of each and reports
medians, so a machine shared with other jobs slows every variant alike and the ratios hold.
"""

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm_human_preferences.training import train_policy  # noqa: E402
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.language import encodings, model as lm  # noqa: E402
from lm_human_preferences.task.policy import Policy  # noqa: E402
from lm_human_preferences.task.rewards import RewardModel  # noqa: E402
from lm_human_preferences.utils import distributed  # noqa: E402
from lm_human_preferences.utils.storage import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    "124M": lm.HParams(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "774M": lm.HParams(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
    "test": lm.HParams(n_vocab=27, n_ctx=16, n_embd=8, n_head=2, n_layer=2),
}


def add_size_args(parser, query_length: int = 64, response_length: int = 24) -> None:
    parser.add_argument("--model", choices=SIZES, default="124M",
                        help="124M, 774M: GPT-2's shapes with random weights; test: tiny, to check that the script runs")
    parser.add_argument("--query_length", type=int, default=query_length)
    parser.add_argument("--response_length", type=int, default=response_length)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds, which a machine crowded with "
                             "other jobs inflates much less (use with --threads 1, where no thread waits spinning)")


def prepare(args) -> None:
    """Apply --threads; shrink the lengths for the tiny model."""
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.model == "test":
        args.query_length, args.response_length = min(args.query_length, 6), min(args.response_length, 5)


def device() -> torch.device:
    return distributed.device()


def native_bf16() -> bool:
    """Whether bf16 products run natively here: a GPU, or a CPU with native bf16 (emulated, e.g. on
    an AVX2-only CPU, they run at ~1 GFLOP/s: 124M's bf16 variants would take hours)."""
    return device().type == "cuda" or distributed.cpu_has_native_bf16()


def precisions() -> tuple[str, ...]:
    """The precisions worth timing here: bf16 only where it is native."""
    if not native_bf16():
        print("bf16 is emulated on this CPU: its variants are skipped", flush=True)
        return ("fp32",)
    return ("fp32", "bf16")


def describe(args) -> str:
    dev = device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, " \
        f"native bf16: {distributed.cpu_has_native_bf16()})"
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (f"model {args.model}, tokens {args.query_length}+{args.response_length}, device {name}, "
            f"torch {torch.__version__}, {args.clock} clock{load}")


def bench_encoding(n_vocab: int) -> encodings.Encoding:
    """Letters as token ids 0..26 inside a vocabulary of n_vocab, padding just outside it."""
    letters = encodings.get("test")
    return encodings.Encoding(name="bench", n_vocab=n_vocab, eot_token=n_vocab - 1, padding_token=n_vocab + 2,
                              _encode=letters.encode, _decode=lambda ids: letters.decode([i % 27 for i in ids]))


def task_hparams(size: str, query_length: int, response_length: int) -> lm_tasks.TaskHParams:
    task = lm_tasks.TaskHParams(query_length=query_length, query_dataset="test", response_length=response_length,
                                start_text=None)
    task.policy.initial_model = size
    return task


class LegacyTFAdam(torch.optim.Optimizer):
    """The TF-convention Adam as it was before the fused one (a Python loop over parameters):
    the baseline of the optimizer phase with the optimisations off."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-5):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                lr_t = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.add_(state["m"] / (state["v"].sqrt() + group["eps"]), alpha=-lr_t)

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr


def make_trainer(size: str, batch_size: int, query_length: int, response_length: int, *, precision: str = "auto",
                 share_queries: bool = True, legacy_adam: bool = False, chunk_size: int | None = 64,
                 noptepochs: int = 4) -> train_policy.PPOTrainer:
    """A PPO trainer on a random-weight policy, reference (= the initial policy) and reward model."""
    torch.manual_seed(0)
    hparams = SIZES[size]
    encoding = bench_encoding(hparams.n_vocab)
    task = task_hparams(size, query_length, response_length)
    hp = train_policy.HParams(task=task)
    hp.rewards.trained_model = "random"
    hp.ppo.batch_size, hp.ppo.total_episodes, hp.ppo.noptepochs = batch_size, batch_size * 10 ** 6, noptepochs
    hp.run.chunk_size, hp.run.precision, hp.run.share_queries = chunk_size, precision, share_queries
    dev = device()
    policy = Policy(lm.Model(hparams, heads=("value",)).to(dev), encoding, task)
    reference = lm.Model(hparams).to(dev)
    reference.load_state_dict(policy.model.state_dict(), strict=False)  # the policy starts as the reference
    ref_policy = Policy(reference.eval().requires_grad_(False), encoding, task)
    reward_model = RewardModel(lm.Model(hparams, heads=("reward",)), encoding).to(dev).eval().requires_grad_(False)
    trainer = train_policy.PPOTrainer(policy, ref_policy, reward_model, hp, seed=0)
    if legacy_adam:
        trainer.optimizer = LegacyTFAdam(trainer.params, lr=hp.ppo.lr, eps=1e-5)
    return trainer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


CLOCK: Callable[[], float] = time.perf_counter  # --clock


def timed(fn: Callable, *args, **kwargs) -> tuple[float, object]:
    sync()
    started = CLOCK()
    result = fn(*args, **kwargs)
    sync()
    return CLOCK() - started, result


def alternate(variants: dict[str, Callable[[], dict[str, float]]], repeats: int) -> dict[str, dict[str, float]]:
    """Run each variant (a function returning named seconds) once to warm up, then `repeats`
    rounds A B A B …; the median of each name per variant."""
    for run in variants.values():
        run()
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            for key, value in run().items():
                samples[name].setdefault(key, []).append(value)
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


def table(rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (e.g. "AMD EPYC 7B13"), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        if name:
            return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict:
    """What ran the figures: the GPU(s) when CUDA is available, else the CPU with its vector
    capability and whether it multiplies bf16 natively (which decides `run.precision auto`)."""
    cpu = dict(cpu=cpu_model(), cores=os.cpu_count(), capability=torch.backends.cpu.get_cpu_capability(),
               native_bf16=distributed.cpu_has_native_bf16())
    if torch.cuda.is_available():
        return dict(kind="cuda", gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    cuda=torch.version.cuda, **cpu)
    return dict(kind="cpu", **cpu)


def commit() -> str:
    """The tree's commit (12 hex digits), "+changes" when tracked files differ from it; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance() -> dict:
    """Where a measurement comes from: machine, torch version, commit, UTC date and torch's CPU threads."""
    return dict(machine=machine(), torch=torch.__version__, python=platform.python_version(), commit=commit(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                threads=torch.get_num_threads())


def add_out_arg(parser) -> None:
    parser.add_argument("--out", type=Path, help="also write the results with their provenance (machine, torch, "
                                                 "commit, date, threads) to this JSON file; the docs' tables are "
                                                 "made from bench/results/*.json by bench/docs_tables.py")


def write_results(out: Path | None, bench: str, results: dict) -> None:
    """Write `results` as one record {bench, command, provenance, results} to `out` (atomically), if given."""
    if out is None:
        return
    command = "python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    record = dict(bench=bench, command=command, provenance=provenance(), results=results)
    atomic_write_text(Path(out), json.dumps(record, indent=1) + "\n")
    print(f"results written to {out}", flush=True)
