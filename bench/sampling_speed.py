#!/usr/bin/env python3
"""Sampling speed: new tokens per second at batch 8, fp32 vs bf16, in one run.

    python bench/sampling_speed.py                # GPT-2 124M (random weights), 64-token queries, 24 new tokens
    python bench/sampling_speed.py --model test   # tiny: checks that the script runs

Policy.respond on `--batch_size` distinct queries (the query forward included), and on the same
batch made of 2 queries × 4 (as when labeling best-of-4 questions: the query runs once per query,
run.share_queries); in float32 also without the packed matrices of language/packed.py
("unpacked"). Variants alternated after a warm-up call each, medians of --repeats calls.
"""

import argparse
import contextlib
import unittest.mock

import torch

import common
from lm_human_preferences.language import model as lm, packed
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.utils import distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    common.add_out_arg(parser)
    args = parser.parse_args()
    common.prepare(args)
    torch.manual_seed(0)
    hparams = common.SIZES[args.model]
    device = common.device()
    task = common.task_hparams(args.model, args.query_length, args.response_length)
    policy = Policy(lm.Model(hparams, heads=("value",)).to(device), common.bench_encoding(hparams.n_vocab), task)
    batch = args.batch_size
    distinct = torch.randint(0, 26, (batch, args.query_length), device=device)
    repeated = distinct[:max(1, batch // 4)].repeat_interleave(4, dim=0)[:batch]

    def respond(precision: str, queries: torch.Tensor, pack: bool = True):
        def run() -> dict[str, float]:
            policy.precision = precision
            generator = torch.Generator(device).manual_seed(0)
            unpacked = unittest.mock.patch.object(packed, "available", lambda device, dtype: False)
            with contextlib.nullcontext() if pack else unpacked:
                return {"s": common.timed(policy.respond, queries, args.response_length, generator)[0]}
        return run

    variants = {}
    for precision in common.precisions():
        variants[precision] = respond(precision, distinct)
        variants[f"{precision}, 4 per query"] = respond(precision, repeated)
    if packed.available(device, torch.float32):
        variants["fp32 unpacked"] = respond("fp32", distinct, pack=False)
    medians = common.alternate(variants, args.repeats)

    print(common.describe(args))
    print(f"batch {batch}, {args.response_length} new tokens a row after a {args.query_length}-token query; "
          f"medians of {args.repeats} calls after a warm-up, variants alternated; precision auto here = "
          f"{distributed.compute_dtype(device, 'auto', sum(p.numel() for p in policy.model.parameters()))}")
    rows = [["variant", "s/call", "new tokens/s", "vs fp32"]]
    for name, m in medians.items():
        rows.append([name, f"{m['s']:.3f}", f"{batch * args.response_length / m['s']:.0f}",
                     f"{medians['fp32']['s'] / m['s']:.2f}x"])
    print(common.table(rows))
    common.write_results(args.out, "sampling_speed", dict(
        model=args.model, batch_size=batch, new_tokens=args.response_length, repeats=args.repeats,
        seconds_a_call={name: m["s"] for name, m in medians.items()}))


if __name__ == "__main__":
    main()
