#!/usr/bin/env python3
"""The decode steps of sampling, eager against torch.compile (default, and reduce-overhead: CUDA graphs).

    python bench/decode_compile.py                      # GPT-2 124M (random weights), batch 64, 64 + 24 tokens
    python bench/decode_compile.py --model test         # tiny: checks that the script runs

Each variant samples the same batch (language/sample.py with the KV cache) from the same model,
`--repeats` times after one warm-up call that includes compiling; it reports the compile time, the
seconds a `sample` call and a decode step, and whether the tokens equal eager's. A variant that
fails (a graph break torch cannot compile, a recompile limit) is reported and the others still run.
A measurement for deciding whether sampling should compile; nothing in the package compiles.
"""

import argparse
import traceback

import torch

import common
from lm_human_preferences.language import model as lm
from lm_human_preferences.language import sample as sampling

VARIANTS = {"eager": None, "compile": "default", "compile + CUDA graphs": "reduce-overhead"}


def run_variant(model: lm.Model, mode: str | None, queries: torch.Tensor, noise: torch.Tensor, length: int,
                repeats: int) -> dict:
    step = model if mode is None else torch.compile(model, mode=mode, dynamic=True)
    call = lambda: sampling.sample(step, queries, length, padding_token=None, noise=noise)  # noqa: E731
    with torch.no_grad():
        first, out = common.timed(call)
        times = [common.timed(call)[0] for _ in range(repeats)]
    seconds = sorted(times)[len(times) // 2]
    return dict(warmup_s=first, sample_s=seconds, step_ms=1000 * seconds / length, tokens=out.tokens.cpu())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(parser)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    common.add_out_arg(parser)
    args = parser.parse_args()
    common.prepare(args)
    device = common.device()
    torch.manual_seed(0)
    model = lm.Model(common.SIZES[args.model]).to(device).freeze(torch.bfloat16 if common.native_bf16() or
                                                                 device.type == "cuda" else torch.float32)
    queries = torch.randint(0, 26, (args.batch_size, args.query_length), generator=torch.Generator().manual_seed(1))
    noise = torch.rand(args.batch_size, args.response_length, generator=torch.Generator().manual_seed(2))
    queries, noise = queries.to(device), noise.to(device)
    print(common.describe(args))
    print(f"sampling {args.batch_size} × ({args.query_length} + {args.response_length}) tokens, "
          f"{str(model.frozen_dtype or torch.float32).replace('torch.', '')}, median of {args.repeats}")
    rows = [["variant", "warm-up s", "s a sample call", "ms a step", "tokens as eager"]]
    results, eager_tokens = {}, None
    for name, mode in VARIANTS.items():
        try:
            r = run_variant(model, mode, queries, noise, args.response_length, args.repeats)
        except Exception as e:  # noqa: BLE001 - one variant that cannot compile must not hide the others
            print(f"{name}: failed: {type(e).__name__}: {traceback.format_exception_only(e)[-1].strip()[:500]}")
            results[name] = dict(error=f"{type(e).__name__}: {e}"[:2000])
            continue
        eager_tokens = r["tokens"] if eager_tokens is None else eager_tokens
        same = bool(torch.equal(r.pop("tokens"), eager_tokens))
        results[name] = dict(r, tokens_equal_eager=same)
        rows.append([name, f"{r['warmup_s']:.1f}", f"{r['sample_s']:.3f}", f"{r['step_ms']:.2f}", str(same)])
    print(common.table(rows))
    common.write_results(args.out, "decode_compile", dict(model=args.model, batch_size=args.batch_size,
                                                          query_length=args.query_length,
                                                          response_length=args.response_length, variants=results))


if __name__ == "__main__":
    main()
