#!/usr/bin/env python3
"""Peak memory of one PPO update at batch 64 (peak RSS on CPU, peak allocated GPU memory on CUDA).

    python bench/ppo_memory.py                          # GPT-2 124M (random weights), chunk sizes 32 and 64
    python bench/ppo_memory.py --chunk_sizes 16 32 64 0 # 0: no chunking
    python bench/ppo_memory.py --model test             # tiny: checks that the script runs

Each chunk size runs in a fresh process (peak RSS is per process): build the trainer
(run.precision auto), run one warm-up-free PPO update, report the peak and the time it took.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import common


def child(args) -> None:
    chunk = args.chunk or None
    trainer = common.make_trainer(args.model, args.batch_size, args.query_length, args.response_length,
                                  chunk_size=chunk)
    trainer.policy.model.gradient_checkpointing = args.gradient_checkpointing
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB → GiB
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds, _ = common.timed(trainer.step, 0)
    result = dict(chunk=args.chunk, gradient_checkpointing=args.gradient_checkpointing, seconds=seconds, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                  rss_after_build_gib=rss_before, dtype=str(trainer.policy.compute_dtype))
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(parser)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[32, 64], help="0 means no chunking")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="run.gradient_checkpointing on")
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)  # set in the child process
    common.add_out_arg(parser)
    args = parser.parse_args()
    common.prepare(args)
    if args.chunk is not None:
        child(args)
        return
    results = []
    for chunk in args.chunk_sizes:
        command = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--batch_size",
                   str(args.batch_size), "--query_length", str(args.query_length), "--response_length",
                   str(args.response_length), "--chunk", str(chunk)] + (["--threads", str(args.threads)] if args.threads else []) \
            + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])
        started = time.time()
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"chunk {chunk} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[-1]["process_s"] = time.time() - started
    print(common.describe(args))
    print(f"one PPO update at batch {args.batch_size}, a fresh process per chunk size; precision auto = {results[0]['dtype']}; "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    gpu = "peak_gpu_gib" in results[0]
    rows = [["run.chunk_size", "peak GPU GiB" if gpu else "peak RSS GiB", "RSS after build GiB", "s/update"]]
    for r in results:
        peak = r["peak_gpu_gib"] if gpu else r["peak_rss_gib"]
        rows.append([str(r["chunk"] or "none"), f"{peak:.2f}", f"{r['rss_after_build_gib']:.2f}", f"{r['seconds']:.1f}"])
    print(common.table(rows))
    common.write_results(args.out, "ppo_memory", dict(model=args.model, batch_size=args.batch_size,
                                                     gradient_checkpointing=args.gradient_checkpointing, runs=results))


if __name__ == "__main__":
    main()
