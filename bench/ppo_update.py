#!/usr/bin/env python3
"""Peak memory and speed of PPO updates at real shapes, with randomly initialised weights.

    python bench/ppo_update.py --model 124M --batch_size 64 --updates 1
    python bench/ppo_update.py --model test --batch_size 64 --updates 20

Builds a policy, reference policy and reward model of the given size (random weights, so
nothing is downloaded), runs PPO updates on random-letter queries (64 + 24 tokens by
default, as the books experiments) and prints episodes/s, seconds per update and the
process's peak resident memory.
"""

import argparse
import resource
import sys
import time

import torch

from lm_human_preferences.task import lm_tasks
from lm_human_preferences.training import train_policy
from lm_human_preferences.language import encodings, model as lm
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.task.rewards import RewardModel
from lm_human_preferences.training.run import RunHParams
from lm_human_preferences.utils import distributed

import common

SIZES = {
    "124M": lm.HParams(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "test": lm.HParams(n_vocab=27, n_ctx=8, n_embd=7, n_head=1, n_layer=2),
}


def bench_encoding(n_vocab: int) -> encodings.Encoding:
    """Letters as token ids 0..26 inside a vocabulary of n_vocab, padding just outside it."""
    letters = encodings.get("test")
    return encodings.Encoding(name="bench", n_vocab=n_vocab, eot_token=n_vocab - 1, padding_token=n_vocab + 2,
                              _encode=letters.encode, _decode=lambda ids: letters.decode([i % 27 for i in ids]))


def run(size: str, batch_size: int, updates: int, chunk_size: int | None, query_length: int,
        response_length: int, precision: str = "auto") -> dict[str, float]:
    torch.manual_seed(0)
    hparams = SIZES[size]
    encoding = bench_encoding(hparams.n_vocab)
    task = lm_tasks.TaskHParams(query_length=query_length, query_dataset="test", response_length=response_length,
                                start_text=None)
    task.policy.initial_model = size
    hp = train_policy.HParams(task=task)
    hp.rewards.trained_model = "random"
    hp.ppo.batch_size, hp.ppo.total_episodes = batch_size, batch_size * updates
    hp.run.chunk_size, hp.run.precision = chunk_size, precision
    device = distributed.device()
    policy = Policy(lm.Model(hparams, heads=("value",)).to(device), encoding, task)
    reference = lm.Model(hparams).to(device)
    reference.load_state_dict(policy.model.state_dict(), strict=False)  # the policy starts as the reference
    ref_policy = Policy(reference.eval().requires_grad_(False), encoding, task)
    reward_model = RewardModel(lm.Model(hparams, heads=("reward",)), encoding).to(device).eval().requires_grad_(False)
    trainer = train_policy.PPOTrainer(policy, ref_policy, reward_model, hp, seed=0)
    started = time.time()
    for update in range(updates):
        stats, _ = trainer.step(update)
    elapsed = time.time() - started
    return dict(episodes_per_s=batch_size * updates / elapsed, s_per_update=elapsed / updates,
                kl=stats["objective/kl"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=SIZES, default="124M")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--updates", type=int, default=1)
    parser.add_argument("--chunk_size", type=int, default=RunHParams().chunk_size, help="0 means no chunking")
    parser.add_argument("--precision", choices=distributed.PRECISIONS, default="auto")
    parser.add_argument("--query_length", type=int, default=64)
    parser.add_argument("--response_length", type=int, default=24)
    common.add_out_arg(parser)
    args = parser.parse_args()
    if args.model == "test":
        args.query_length, args.response_length = min(args.query_length, 3), min(args.response_length, 5)
    result = run(args.model, args.batch_size, args.updates, args.chunk_size or None, args.query_length,
                 args.response_length, args.precision)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux
    print(f"model {args.model}  batch {args.batch_size}  tokens {args.query_length}+{args.response_length}  "
          f"chunk {args.chunk_size or 'none'}  precision {args.precision}  device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"episodes/s {result['episodes_per_s']:.2f}  s/update {result['s_per_update']:.2f}  "
          f"peak RSS {peak_gib:.2f} GiB  final kl {result['kl']:.4f}")
    sys.stdout.flush()
    common.write_results(args.out, "ppo_update", dict(
        model=args.model, batch_size=args.batch_size, updates=args.updates, chunk_size=args.chunk_size,
        precision=args.precision, query_length=args.query_length, response_length=args.response_length,
        peak_rss_gib=peak_gib, **result))


if __name__ == "__main__":
    main()
