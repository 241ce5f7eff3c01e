#!/usr/bin/env python3
"""Reward-model training sequences per second: shared vs unshared queries, bf16 vs fp32, in one run.

    python bench/reward_speed.py                 # GPT-2 124M (random weights), 4 best-of-4 records a step
    python bench/reward_speed.py --model test    # tiny: checks that the script runs

One training step = the best-of-4 loss of `--records` records (4 responses each, laid out with
repeat_interleave as train_reward does), backward, optimizer step. Variants, alternated after a
warm-up step each, medians of --repeats steps:
  before   unshared queries, the TF-convention Adam as it was (a Python loop)
  unshared unshared queries, the fused TF-convention Adam
  shared   run.share_queries: each query runs once, its keys/values serve its 4 responses
each in fp32 and bf16. One model serves every variant (its weights drift; speed does not care).
"""

import argparse

import torch
import torch.nn.functional as F

import common
from lm_human_preferences.language import model as lm
from lm_human_preferences.task.rewards import RewardModel
from lm_human_preferences.utils.tf_adam import TFAdam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(parser)
    parser.add_argument("--records", type=int, default=4, help="best-of-4 records per step (4 sequences each)")
    parser.add_argument("--repeats", type=int, default=3)
    common.add_out_arg(parser)
    args = parser.parse_args()
    common.prepare(args)
    torch.manual_seed(0)
    hparams = common.SIZES[args.model]
    device = common.device()
    encoding = common.bench_encoding(hparams.n_vocab)
    reward_model = RewardModel(lm.Model(hparams, heads=("reward",)), encoding).to(device)
    params = list(reward_model.parameters())
    optimizers = {"loop": common.LegacyTFAdam(params, lr=1e-9), "fused": TFAdam(params, lr=1e-9)}
    n, letters = args.records, 26
    queries = torch.randint(0, letters, (n, args.query_length), device=device)
    responses = torch.randint(0, letters, (n * 4, args.response_length), device=device)
    responses[1::4, args.response_length // 2:] = encoding.padding_token  # some truncated responses
    labels = torch.randint(0, 4, (n,), device=device)

    def step(precision: str, shared: bool, adam: str):
        def run() -> dict[str, float]:
            reward_model.precision, reward_model.share_queries = precision, shared
            optimizer = optimizers[adam]

            def train_step():
                optimizer.zero_grad(set_to_none=True)
                rewards = reward_model(queries.repeat_interleave(4, dim=0), responses).view(n, 4)
                F.cross_entropy(rewards, labels).backward()
                optimizer.step()

            return {"s": common.timed(train_step)[0]}
        return run

    variants = {}
    precisions = common.precisions()
    for precision in precisions:
        variants[f"{precision} before"] = step(precision, False, "loop")
        variants[f"{precision} unshared"] = step(precision, False, "fused")
        variants[f"{precision} shared"] = step(precision, True, "fused")
    medians = common.alternate(variants, args.repeats)

    print(common.describe(args))
    print(f"{n} best-of-4 records = {4 * n} sequences a step (forward, backward, Adam); "
          f"medians of {args.repeats} steps after a warm-up, variants alternated")
    rows = [["variant", "s/step", "sequences/s", "vs fp32 before"]]
    base = medians["fp32 before"]["s"]
    for name, m in medians.items():
        rows.append([name, f"{m['s']:.3f}", f"{4 * n / m['s']:.1f}", f"{base / m['s']:.2f}x"])
    print(common.table(rows))
    for precision in precisions:
        before, unshared, shared = (medians[f"{precision} {v}"]["s"] for v in ("before", "unshared", "shared"))
        print(f"{precision}: shared/before {before / shared:.2f}x, shared/unshared {unshared / shared:.2f}x")
    if "bf16" in precisions:
        print(f"shared: bf16/fp32 {medians['fp32 shared']['s'] / medians['bf16 shared']['s']:.2f}x")
    common.write_results(args.out, "reward_speed", dict(
        model=args.model, sequences_a_step=4 * n, repeats=args.repeats,
        seconds_a_step={name: m["s"] for name, m in medians.items()}))


if __name__ == "__main__":
    main()
