#!/usr/bin/env python3
"""PPO updates per second, phase by phase, with the speed options on and off, in one run.

    python bench/ppo_speed.py                  # GPT-2 124M (random weights), batch 8, 64+24 tokens, 4 epochs
    python bench/ppo_speed.py --model test     # tiny: checks that the script runs

Variants, alternated after a warm-up update each, medians of --repeats updates:
  on   run.precision auto, run.share_queries on, the fused TF-convention Adam
  off  run.precision fp32, run.share_queries off, the TF-convention Adam as it was (a Python loop)
Phases: sampling (policy.respond), reference forward, reward forward (trainer.score), training
forward/backward (train_minibatch less its optimizer step), optimizer; `other` is the rest.
Then each phase of the `on` variant timed alone, in a loop of its own: their sum against the
whole update shows what running them together costs (allocator, caches, Python).
"""

import argparse
import functools
from collections import defaultdict

import torch

import common
from lm_human_preferences.utils import core

PHASES = [("sampling", "sampling"), ("reference", "reference forward"), ("reward", "reward forward"),
          ("train", "train forward/backward"), ("optimizer", "optimizer")]


def instrument(trainer) -> dict[str, float]:
    """Wrap the trainer's phases with timers; returns the dict they add their seconds to."""
    phases: dict[str, float] = defaultdict(float)

    def wrap(obj, name: str, phase: str) -> None:
        real = getattr(obj, name)

        def timed_call(*args, **kwargs):
            seconds, result = common.timed(real, *args, **kwargs)
            phases[phase] += seconds
            return result

        setattr(obj, name, timed_call)

    wrap(trainer.policy, "respond", "sampling")
    wrap(trainer.ref_policy, "analyze_responses", "reference")
    wrap(trainer, "score", "reward")
    wrap(trainer, "train_minibatch", "train")
    wrap(trainer.optimizer, "step", "optimizer")
    return phases


def update_timer(trainer):
    phases = instrument(trainer)
    counter = iter(range(10 ** 9))

    def run() -> dict[str, float]:
        phases.clear()
        total, _ = common.timed(trainer.step, next(counter))
        result = dict(phases)
        result["train"] -= result["optimizer"]  # train_minibatch includes the optimizer step
        result["other"] = total - sum(result.values())
        result["total"] = total
        return result

    return run


def parts_timer(trainer):
    """Each phase of an update on its own (same shapes, same code), one after the other."""
    hp = trainer.hp
    chunk = hp.run.chunk_size
    queries = next(trainer.queries)
    rollouts = trainer.rollouts()
    real_step = trainer.optimizer.step

    def train_without_step():
        trainer.optimizer.step = lambda: None
        try:
            for _ in range(hp.ppo.noptepochs):
                trainer.train_minibatch(rollouts)
        finally:
            trainer.optimizer.step = real_step

    def optimizer_steps():
        for _ in range(hp.ppo.noptepochs):
            real_step()

    def reference():
        with torch.no_grad():
            core.map_chunks(functools.partial(trainer.ref_policy.analyze_responses, entropies=False), chunk,
                            queries, rollouts.responses)

    parts = {
        "sampling": lambda: trainer.policy.respond(queries, hp.task.response_length, trainer.generator, chunk),
        "reference": reference,
        "reward": lambda: trainer.score(queries, rollouts.responses),
        "train": train_without_step,
        "optimizer": optimizer_steps,
    }

    def run() -> dict[str, float]:
        return {name: common.timed(fn)[0] for name, fn in parts.items()}

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--noptepochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="measured updates per variant, after one warm-up")
    common.add_out_arg(parser)
    args = parser.parse_args()
    common.prepare(args)
    shape = (args.model, args.batch_size, args.query_length, args.response_length)
    on = common.make_trainer(*shape, noptepochs=args.noptepochs)
    off = common.make_trainer(*shape, noptepochs=args.noptepochs, precision="fp32", share_queries=False,
                              legacy_adam=True)
    medians = common.alternate({"on": update_timer(on), "off": update_timer(off)}, args.repeats)
    alone = common.alternate({"alone": parts_timer(on)}, args.repeats)["alone"]

    print(common.describe(args))
    print(f"batch {args.batch_size}, {args.noptepochs} epochs, 1 minibatch; on: precision auto "
          f"(= {on.policy.compute_dtype}), shared queries, fused Adam; off: fp32, unshared, loop Adam; "
          f"medians of {args.repeats} updates after a warm-up, variants alternated")
    rows = [["phase (s/update)", "on", "off", "off/on", "on, alone"]]
    for key, label in PHASES + [("other", "other"), ("total", "total")]:
        a, b = medians["on"][key], medians["off"][key]
        alone_s = sum(alone.values()) if key == "total" else alone.get(key)
        rows.append([label, f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}x" if a > 0 else "-",
                     "-" if alone_s is None else f"{alone_s:.3f}"])
    eps_on, eps_off = args.batch_size / medians["on"]["total"], args.batch_size / medians["off"]["total"]
    rows.append(["episodes/s", f"{eps_on:.2f}", f"{eps_off:.2f}", f"{eps_on / eps_off:.2f}x (on/off)", ""])
    print(common.table(rows))
    print(f"PPO update / sum of its parts alone: {medians['on']['total'] / sum(alone.values()):.2f}")
    common.write_results(args.out, "ppo_speed", dict(
        model=args.model, batch_size=args.batch_size, noptepochs=args.noptepochs, repeats=args.repeats,
        seconds=medians, alone=alone, episodes_per_s=dict(on=eps_on, off=eps_off)))


if __name__ == "__main__":
    main()
