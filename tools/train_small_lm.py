#!/usr/bin/env python3
"""Train the small packaged language model `kjv` (a word-level GPT-2, 1.7M parameters).

Corpus: the King James Version of the Bible (1611; its copyright has expired, so a model
derived from it may be redistributed freely), from Debian's `bible-kjv` package:

    apt-get install bible-kjv          # provides /usr/bin/bible and the KJV text
    python tools/train_small_lm.py     # about 12 minutes on 2 CPU cores

Every 20th verse is held out for the reported perplexity. Every 2nd verse is shipped,
gzipped, as the `kjv` query dataset of the mock experiments (`--verses_only` writes just
that file). The vocabulary (`vocab.json`: every piece, a word or punctuation mark with its
leading space, seen at least 3 times in the training verses) and the model (float16 weights)
are written to lm_human_preferences/data/kjv/ in our save layout, with the `kjv_words` encoding.
"""

import argparse
import collections
import gzip
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lm_human_preferences.language import encodings
from lm_human_preferences.language.model import HParams, Model
from lm_human_preferences.language.sample import sample
from lm_human_preferences.language.trained_models import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "lm_human_preferences" / "data"
MIN_COUNT = 3


def model_hparams(n_vocab: int) -> HParams:
    return HParams(n_vocab=n_vocab, n_ctx=64, n_embd=128, n_head=4, n_layer=4)


def write_vocabulary(train: list[str]) -> None:
    """Newline (id 0), the unknown piece (id 1), then the pieces seen MIN_COUNT times, most frequent first."""
    counts = collections.Counter(p for verse in train for p in encodings.word_pieces(verse))
    pieces = [p for p, n in counts.most_common() if n >= MIN_COUNT]
    encodings.KJV_VOCAB.parent.mkdir(parents=True, exist_ok=True)
    encodings.KJV_VOCAB.write_text(json.dumps(["\n", " ⁇", *pieces], ensure_ascii=False), encoding="utf-8")


def kjv_verses() -> list[str]:
    try:
        text = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise SystemExit("the `bible` command is missing: apt-get install bible-kjv") from None
    verses = [re.sub(r"^\S+?\d+:\d+\s+", "", line).strip() for line in text.splitlines()]
    return [re.sub(r"\s+", " ", v) for v in verses if v]


def batches(tokens: torch.Tensor, batch: int, length: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=generator)
        window = torch.stack([tokens[s:s + length + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def perplexity(model: Model, tokens: torch.Tensor, length: int) -> float:
    losses = []
    for start in range(0, len(tokens) - length - 1, length):
        window = tokens[start:start + length + 1][None]
        logits = model(window[:, :-1]).logits
        losses.append(F.cross_entropy(logits[0].float(), window[0, 1:]).item())
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--verses_only", action="store_true", help="only write the query verses")
    args = parser.parse_args()
    torch.manual_seed(0)
    verses = kjv_verses()
    with gzip.GzipFile(DATA / "kjv_verses.txt.gz", "wb", compresslevel=9, mtime=0) as f:
        f.write(("\n".join(verses[::2]) + "\n").encode("utf-8"))
    if args.verses_only:
        return
    held_out = verses[::20]
    train = [v for i, v in enumerate(verses) if i % 20]
    write_vocabulary(train)
    encoding = encodings.get("kjv_words")
    hparams = model_hparams(encoding.n_vocab)
    train_tokens = torch.tensor(encoding.encode("\n".join(train)))
    held_out_tokens = torch.tensor(encoding.encode("\n".join(held_out)))
    print(f"{len(verses)} verses, {encoding.n_vocab} pieces: {len(train_tokens)} training tokens, "
          f"{len(held_out_tokens)} held out")

    model = Model(hparams)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    data = batches(train_tokens, args.batch_size, hparams.n_ctx, torch.Generator().manual_seed(0))
    started = time.time()
    for step in range(1, args.steps + 1):
        inputs, targets = next(data)
        logits = model(inputs).logits  # float32: bf16 autocast is ~10x slower for matrices this small on CPU
        loss = F.cross_entropy(logits.float().reshape(-1, hparams.n_vocab), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)

    model.eval()
    model.half().float()  # the weights ship as float16: measure what ships
    ppl = perplexity(model, held_out_tokens, hparams.n_ctx)
    print(f"held-out perplexity per token: {ppl:.2f}")
    shutil.rmtree(DATA / "kjv" / "checkpoints", ignore_errors=True)
    save_checkpoint(DATA / "kjv", hparams, "kjv_words", model.state_dict(), step=args.steps, dtype=torch.float16)
    (DATA / "kjv" / "TRAINING.txt").write_text(
        f"Trained by tools/train_small_lm.py --steps {args.steps} --batch_size {args.batch_size} --lr {args.lr}\n"
        f"Corpus: King James Version (public domain), Debian package bible-kjv; every 20th verse held out.\n"
        f"Vocabulary: {encoding.n_vocab} pieces (seen at least {MIN_COUNT} times in the training verses).\n"
        f"Held-out perplexity per token: {ppl:.2f}\n")
    context = torch.tensor([encoding.encode("and god said,")])
    out = sample(model, context, 40, padding_token=encoding.padding_token, temperature=0.8,
                 generator=torch.Generator().manual_seed(1))
    print("sample:", "and god said," + encoding.decode(out.tokens[0].tolist()))


if __name__ == "__main__":
    main()
