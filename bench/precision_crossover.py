#!/usr/bin/env python3
"""Where bf16 autocast starts to pay on this machine: forward + backward, fp32 vs bf16, by model size.

    python bench/precision_crossover.py               # 8 sequences × 88 tokens, GPT-2-shaped models 1.7M … 124M
    python bench/precision_crossover.py --model test  # tiny sizes only: checks that the script runs

For each size, fp32 and bf16 alternate after a warm-up, medians of --repeats. The ratio fp32/bf16
above 1 means bf16 is faster; `run.precision auto` uses bf16 on a CPU from
distributed.CPU_BF16_MIN_PARAMS parameters on (if the CPU has native bf16). On a CPU without
native bf16 (emulated, ~1 GFLOP/s) bf16 stops being timed after the first size where it takes
over EMULATED_GIVE_UP × fp32's time: larger sizes would take hours, and auto never picks it there.
"""

import argparse

import torch

import common
from lm_human_preferences.language import model as lm
from lm_human_preferences.utils import distributed

SIZES = [  # (n_vocab, n_embd, n_head, n_layer)
    (7025, 128, 4, 4), (50257, 128, 4, 4), (50257, 256, 4, 4), (50257, 384, 6, 6), (50257, 512, 8, 8),
    (50257, 768, 12, 12),
]
TEST_SIZES = [(27, 8, 2, 2), (50, 16, 2, 2)]
EMULATED_GIVE_UP = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(parser, query_length=64, response_length=24)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    common.add_out_arg(parser)
    args = parser.parse_args()
    common.prepare(args)
    device = common.device()
    length = args.query_length + args.response_length
    rows = [["n_vocab/n_embd/n_layer", "params", "fp32 s", "bf16 s", "fp32/bf16", "auto picks"]]
    sizes = []
    native = common.native_bf16()
    time_bf16 = True
    for n_vocab, n_embd, n_head, n_layer in TEST_SIZES if args.model == "test" else SIZES:
        torch.manual_seed(0)
        model = lm.Model(lm.HParams(n_vocab=n_vocab, n_ctx=max(length, 16), n_embd=n_embd, n_head=n_head,
                                    n_layer=n_layer), heads=("value",)).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        tokens = torch.randint(0, n_vocab, (args.batch_size, length), device=device)

        def step(dtype: torch.dtype):
            def run() -> dict[str, float]:
                def forward_backward():
                    with distributed.autocast(device, dtype):
                        out = model(tokens)
                    (out.logits.float().logsumexp(-1).mean() + out.heads["value"].mean()).backward()
                    model.zero_grad(set_to_none=True)
                return {"s": common.timed(forward_backward)[0]}
            return run

        variants = {"fp32": step(torch.float32), "bf16": step(torch.bfloat16)} if time_bf16 else \
            {"fp32": step(torch.float32)}
        medians = common.alternate(variants, args.repeats)
        f = medians["fp32"]["s"]
        b = medians["bf16"]["s"] if time_bf16 else None
        auto = str(distributed.compute_dtype(device, "auto", n_params)).replace("torch.", "")
        rows.append([f"{n_vocab}/{n_embd}/{n_layer}", f"{n_params / 1e6:.1f}M", f"{f:.3f}",
                     "emulated: not timed" if b is None else f"{b:.3f}", "-" if b is None else f"{f / b:.2f}", auto])
        sizes.append(dict(n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, params=n_params, fp32_s=f, bf16_s=b,
                          auto=auto))
        time_bf16 = time_bf16 and (native or b < EMULATED_GIVE_UP * f)
        del model
    print(common.describe(args))
    print(f"forward + backward of {args.batch_size}×{length} tokens, medians of {args.repeats} after a warm-up")
    print(common.table(rows))
    common.write_results(args.out, "precision_crossover", dict(batch_size=args.batch_size, tokens=length, sizes=sizes))


if __name__ == "__main__":
    main()
