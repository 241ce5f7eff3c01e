#!/usr/bin/env python3
"""Plain against prepacked matrix products (language/packed.py), per matrix of the model and row count.

    python bench/packed_linear.py                 # GPT-2 124M's matrices, float32 (and bf16 where native)
    python bench/packed_linear.py --model test    # tiny: checks that the script runs

For each Linear matrix of the model and the output embedding, and each row count (sampling's
decode step has batch-size rows, a forward pass batch × length): the time of `F.linear` on the
plain matrix against oneDNN's linear on the matrix packed once, alternated, medians of
--repeats; and the time to pack it. language/packed.py's float32 rules (FLOAT32_MAX_ROWS,
FLOAT32_MIN_ELEMENTS) come from this table; `--sizes` adds other matrix shapes (e.g. smaller
models') to find where packing stops paying.
"""

import argparse

import torch
import torch.nn.functional as F

import common
from lm_human_preferences.language import packed


def matrices(hp) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of every distinct matrix a forward pass multiplies by."""
    d = hp.n_embd
    return {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (4 * d, d), "mlp.c_proj": (d, 4 * d),
            "output embedding": (hp.n_vocab, d)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(parser)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64, 128, 704])
    parser.add_argument("--sizes", nargs="*", default=[], metavar="OUTxIN", help="more matrix shapes, e.g. 384x128")
    parser.add_argument("--repeats", type=int, default=5)
    common.add_out_arg(parser)
    args = parser.parse_args()
    common.prepare(args)
    device = common.device()
    shapes = matrices(common.SIZES[args.model])
    shapes.update({size: tuple(int(n) for n in size.split("x")) for size in args.sizes})
    dtypes = [t for t in (torch.float32, torch.bfloat16) if packed.available(device, t)]
    print(common.describe(args))
    if not dtypes:
        print("no packed products on this device or torch: nothing to compare")
        return
    rows_table = [["matrix", "dtype", "elements", "pack ms"] + [f"{m} rows: plain/packed ms" for m in args.rows]]
    measured = []
    for name, (out_features, in_features) in shapes.items():
        for dtype in dtypes:
            generator = torch.Generator().manual_seed(0)
            weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(device, dtype)
            bias = torch.zeros(out_features, device=device, dtype=dtype)
            pack_ms = min(common.timed(torch.ops.mkldnn._reorder_linear_weight, weight, packed.PACK_ROWS)[0]
                          for _ in range(3)) * 1e3
            matrix = torch.ops.mkldnn._reorder_linear_weight(weight, packed.PACK_ROWS)
            cells = []
            for m in args.rows:
                x = torch.randn(m, in_features, generator=generator).to(device, dtype)
                variants = {
                    "plain": lambda x=x: {"s": common.timed(F.linear, x, weight, bias)[0]},
                    "packed": lambda x=x: {"s": common.timed(torch.ops.mkldnn._linear_pointwise, x, matrix, bias,
                                                             "none", [], "")[0]},
                }
                medians = common.alternate(variants, args.repeats)
                plain, fast = medians["plain"]["s"] * 1e3, medians["packed"]["s"] * 1e3
                cells.append(f"{plain:.3f}/{fast:.3f} ({plain / fast:.2f}x)")
                measured.append(dict(matrix=name, dtype=str(dtype).removeprefix("torch."), rows=m, plain_ms=plain,
                                     packed_ms=fast, pack_ms=pack_ms))
            rows_table.append([name, str(dtype).removeprefix("torch."), str(weight.numel()), f"{pack_ms:.2f}"] + cells)
    print(common.table(rows_table))
    common.write_results(args.out, "packed_linear", dict(model=args.model, products=measured))
    print(f"language/packed.py: float32 matrices of at least {packed.FLOAT32_MIN_ELEMENTS} elements are packed; "
          f"trunk matrices take the packed product at most {packed.FLOAT32_MAX_ROWS} rows, the output embedding always")


if __name__ == "__main__":
    main()
