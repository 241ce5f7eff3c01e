#!/usr/bin/env python3
"""Peak memory and time of one PPO update and one reward-model step by GPT-2 size, with and
without run.gradient_checkpointing (random weights: nothing is downloaded).

    python bench/model_sizes.py                                # 124M, 355M, 774M; checkpointing off and on
    python bench/model_sizes.py --sizes 774M --checkpointing on
    python bench/model_sizes.py --sizes test                   # tiny: checks that the script runs

Each measurement runs in a fresh process, so its peak RSS (peak allocated GPU memory on CUDA)
is its own, and nothing else runs meanwhile:
  ppo     build a PPO trainer (policy with value head, reference policy, reward model, as
          train_policy holds them), then one update: sampling, reference and reward forwards,
          4 epochs of forward/backward (the books experiments' ppo.noptepochs) and Adam steps;
  reward  build a reward model to train and the frozen initial policy that samples for its
          normalization (as train_reward holds them), then one step: the best-of-4 loss of
          --records records (4 responses each), backward in micro-batches, Adam.
Shapes are the books experiments': queries of 64 and responses of 24 tokens. run.precision
auto and run.chunk_size 32 (the defaults), so the figures are those of a default run.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
from lm_human_preferences.labeling import label_files
from lm_human_preferences.language import model as lm
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.task.rewards import RewardModel
from lm_human_preferences.training import train_policy, train_reward
from lm_human_preferences.training.run import RunHParams

GPT2 = {  # the released GPT-2 sizes (their hparams.json)
    "124M": lm.HParams(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "355M": lm.HParams(n_vocab=50257, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),
    "774M": lm.HParams(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
    "test": common.SIZES["test"],
}


def _gib(kib: float) -> float:
    return kib / 2 ** 20


def peak_rss_gib() -> float:
    return _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # ru_maxrss: KiB on Linux


def cpu_seconds() -> float:
    """CPU time of this process (all threads): on a machine shared with other jobs it grows
    far less with their load than wall time does."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(args, checkpointing: bool) -> RunHParams:
    return RunHParams(chunk_size=args.chunk_size, gradient_checkpointing=checkpointing)


def ppo_trainer(args, checkpointing: bool) -> train_policy.PPOTrainer:
    """As common.make_trainer, for any size and with the run's checkpointing switch."""
    torch.manual_seed(0)
    hparams = GPT2[args.size]
    encoding = common.bench_encoding(hparams.n_vocab)
    task = common.task_hparams(args.size, args.query_length, args.response_length)
    hp = train_policy.HParams(task=task, run=_run(args, checkpointing))
    hp.rewards.trained_model = "random"
    hp.ppo.batch_size, hp.ppo.total_episodes, hp.ppo.noptepochs = args.batch_size, args.batch_size * 10 ** 6, 4
    dev = common.device()
    policy = Policy(lm.Model(hparams, heads=("value",)).to(dev), encoding, task)
    reference = lm.Model(hparams).to(dev)
    reference.load_state_dict(policy.model.state_dict(), strict=False)  # the policy starts as the reference
    ref_policy = Policy(reference.requires_grad_(False), encoding, task)
    reward_model = RewardModel(lm.Model(hparams, heads=("reward",)), encoding).to(dev)
    return train_policy.PPOTrainer(policy, ref_policy, reward_model, hp, seed=0)


def reward_trainer(args, checkpointing: bool) -> tuple[train_reward.RewardModelTrainer, label_files.Labels]:
    torch.manual_seed(0)
    hparams = GPT2[args.size]
    encoding = common.bench_encoding(hparams.n_vocab)
    task = common.task_hparams(args.size, args.query_length, args.response_length)
    hp = train_reward.HParams(task=task, run=_run(args, checkpointing), batch_size=args.records,
                              rollout_batch_size=args.records)
    hp.labels.type, hp.labels.num_train, hp.labels.source = "best_of_4", args.records, "random"
    dev = common.device()
    reward_model = RewardModel(lm.Model(hparams, heads=("reward",)), encoding).to(dev)
    policy = Policy(lm.Model(hparams).to(dev), encoding, task)  # samples for normalization; frozen
    trainer = train_reward.RewardModelTrainer(reward_model, policy, hp, seed=0)
    rng = np.random.default_rng(0)
    columns = {"query": rng.integers(0, 26, (args.records, args.query_length), dtype=np.int32),
               "best": rng.integers(0, 4, args.records, dtype=np.int32)}
    for k in range(4):
        columns[f"sample{k}"] = rng.integers(0, 26, (args.records, args.response_length), dtype=np.int32)
    columns["sample1"][:, args.response_length // 2:] = encoding.padding_token  # some truncated responses
    return trainer, label_files.Labels(columns)


# Bytes per parameter a measurement needs, roughly: the trained model in float32 with its
# gradient and Adam's two moments (16), plus the frozen models (the reference and reward model in
# PPO, the initial policy in reward training; about 2.2 each in bf16, built in float32 first).
BYTES_PER_PARAM = {"ppo": 16 + 2 * 2.2 + 4, "reward": 16 + 4}
MEMORY_WAIT_S = 1800


def available_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) / 2 ** 20
    except (OSError, KeyError, ValueError):
        return None


def wait_for_memory(phase: str, hparams: lm.HParams) -> None:
    """On a machine shared with other jobs, start only when the memory this needs is available
    (waiting up to MEMORY_WAIT_S), rather than drive the machine into the OOM killer."""
    n_params = 12 * hparams.n_layer * hparams.n_embd ** 2 + (hparams.n_vocab + hparams.n_ctx) * hparams.n_embd
    need = n_params * BYTES_PER_PARAM[phase] / 2 ** 30 + 1.0
    deadline = time.monotonic() + MEMORY_WAIT_S
    while (free := available_gib()) is not None and free < need:
        if time.monotonic() > deadline:
            sys.exit(f"needs about {need:.1f} GiB, but only {free:.1f} GiB are available after waiting "
                     f"{MEMORY_WAIT_S} s; run it when the machine is idler")
        print(f"waiting for memory: needs about {need:.1f} GiB, {free:.1f} GiB available", file=sys.stderr, flush=True)
        time.sleep(10)


def child(args) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    checkpointing = args.child_checkpointing == "on"
    wait_for_memory(args.child, GPT2[args.size])
    started = time.perf_counter()
    if args.child == "ppo":
        trainer = ppo_trainer(args, checkpointing)
        measured = lambda: trainer.step(0)  # noqa: E731
        n_params = sum(p.numel() for p in trainer.policy.model.parameters())
        dtype = trainer.policy.compute_dtype
    else:
        trainer, labels = reward_trainer(args, checkpointing)

        def measured():
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.accumulate_gradients(labels)
            trainer.optimizer.step()

        n_params = sum(p.numel() for p in trainer.reward_model.model.parameters())
        dtype = trainer.reward_model.compute_dtype
    build_s = time.perf_counter() - started
    after_build = peak_rss_gib()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cpu_before = cpu_seconds()
    seconds, _ = common.timed(measured)
    result = dict(size=args.size, phase=args.child, checkpointing=args.child_checkpointing, params=n_params,
                  dtype=str(dtype).replace("torch.", ""), build_s=build_s, seconds=seconds,
                  cpu_s=cpu_seconds() - cpu_before,
                  peak_rss_gib=peak_rss_gib(), rss_after_build_gib=after_build)
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(json.dumps(result), flush=True)


def measure(args, size: str, phase: str, checkpointing: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--size", size,
               "--child_checkpointing", checkpointing, "--batch_size", str(args.batch_size), "--records",
               str(args.records), "--query_length", str(args.query_length), "--response_length",
               str(args.response_length), "--chunk_size", str(args.chunk_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    started = time.time()
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{size} {phase} checkpointing {checkpointing} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.time() - started
    print(f"  {size} {phase} checkpointing {checkpointing}: {result['seconds']:.1f} s ({result['cpu_s']:.1f} s CPU), "
          f"peak {result.get('peak_gpu_gib', result['peak_rss_gib']):.2f} GiB ({result['process_s']:.0f} s in all)",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=GPT2, default=["124M", "355M", "774M"])
    parser.add_argument("--phases", nargs="+", choices=["ppo", "reward"], default=["ppo", "reward"])
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--batch_size", type=int, default=8, help="PPO episodes per update")
    parser.add_argument("--records", type=int, default=8, help="best-of-4 records per reward-model step")
    parser.add_argument("--query_length", type=int, default=64)
    parser.add_argument("--response_length", type=int, default=24)
    parser.add_argument("--chunk_size", type=int, default=RunHParams().chunk_size)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    common.add_out_arg(parser)
    parser.add_argument("--child", choices=["ppo", "reward"], help=argparse.SUPPRESS)
    parser.add_argument("--child_checkpointing", choices=["off", "on"], help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=GPT2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    if args.sizes == ["test"]:
        args.query_length, args.response_length = min(args.query_length, 6), min(args.response_length, 5)
    started = time.time()
    results = [measure(args, size, phase, ckpt) for size in args.sizes for phase in args.phases
               for ckpt in args.checkpointing]
    print_table(args, results, time.time() - started)
    common.write_results(args.out, "model_sizes", dict(
        batch_size=args.batch_size, records=args.records, query_length=args.query_length,
        response_length=args.response_length, chunk_size=args.chunk_size, runs=results))


def print_table(args, results: list[dict], total_s: float) -> None:
    dev = common.device()
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"
    print(f"device {device}, torch {torch.__version__}; tokens {args.query_length}+{args.response_length}, "
          f"run.chunk_size {args.chunk_size}, run.precision auto; a fresh process per row; {total_s / 60:.1f} min in all; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    gpu = "peak_gpu_gib" in results[0]
    peak = "peak GPU GiB" if gpu else "peak RSS GiB"
    rows = [["size", "step", "checkpointing", "compute", peak, "after build GiB", "s/step", "CPU s", "CPU s vs off"]]
    for r in results:
        off = next((o for o in results if (o["size"], o["phase"], o["checkpointing"]) == (r["size"], r["phase"], "off")), None)
        what = f"PPO update, batch {args.batch_size}" if r["phase"] == "ppo" else f"reward step, {args.records}×4"
        value = r["peak_gpu_gib"] if gpu else r["peak_rss_gib"]
        ratio = f"{r['cpu_s'] / off['cpu_s']:.2f}x" if off and off['cpu_s'] > 0 else "-"
        rows.append([r["size"], what, r["checkpointing"], r["dtype"], f"{value:.2f}", f"{r['rss_after_build_gib']:.2f}",
                     f"{r['seconds']:.1f}", f"{r['cpu_s']:.1f}", ratio])
    print(common.table(rows))


if __name__ == "__main__":
    main()
