"""Named query datasets → fixed-length query token streams (SPEC §4).

A dataset is a function `(mode, seed) -> iterator of texts`. Streams built from them repeat
forever and are sharded across ranks (rank r takes items r, r + world, r + 2·world, ...).
"""

import random
import string
from collections.abc import Callable, Iterator

from lm_human_preferences.language.encodings import Encoding
from lm_human_preferences.utils.errors import UserError

TextSource = Callable[[str, int], Iterator[str]]


def random_letters(mode: str, seed: int) -> Iterator[str]:
    """Endless random 40-character strings over the `test` encoding's alphabet."""
    rng = random.Random(f"{mode}-{seed}")
    alphabet = string.ascii_lowercase + "."
    while True:
        yield "".join(rng.choice(alphabet) for _ in range(40))


_DATASETS: dict[str, TextSource] = {"test": random_letters}


def get(name: str) -> TextSource:
    if name not in _DATASETS:
        raise UserError(f"unknown query dataset {name!r}; known: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name]


def _single_token(encoding: Encoding, text: str, what: str) -> int:
    tokens = encoding.encode(text)
    if len(tokens) != 1:
        raise UserError(f"{what} {text!r} must encode to exactly one token, got {tokens}; choose another text")
    return tokens[0]


def query_tokens(tokens: list[int], length: int, padding_token: int,
                 start_token: int | None = None, end_token: int | None = None) -> list[int] | None:
    """Turn one text's tokens into a query of exactly `length` tokens, or None to skip the text.

    Drop everything up to and including the first start token; cut to `length`; cut after
    the last end token; right-pad with the padding token.
    """
    if start_token is not None:
        if start_token not in tokens:
            return None
        tokens = tokens[tokens.index(start_token) + 1:]
    tokens = tokens[:length]
    if end_token is not None:
        if end_token not in tokens:
            return None
        tokens = tokens[:len(tokens) - tokens[::-1].index(end_token)]
    return tokens + [padding_token] * (length - len(tokens))


def query_stream(dataset: str, encoding: Encoding, length: int, *, start_text: str | None = None,
                 end_text: str | None = None, mode: str = "train", seed: int = 0,
                 rank: int = 0, world: int = 1) -> Iterator[list[int]]:
    """Endless stream of queries (lists of `length` token ids) for this rank."""
    texts = get(dataset)
    start = _single_token(encoding, start_text, "start_text") if start_text else None
    end = _single_token(encoding, end_text, "end_text") if end_text else None
    epoch = 0
    while True:
        produced = False
        for i, text in enumerate(texts(mode, seed + epoch)):
            if i % world != rank:
                continue
            query = query_tokens(encoding.encode(text), length, encoding.padding_token, start, end)
            if query is not None:
                produced = True
                yield query
        if not produced:
            raise UserError(f"dataset {dataset!r} ({mode}) gave no usable query for this rank: every text lacks "
                            f"the start text {start_text!r} or end text {end_text!r}, or the dataset is too small")
        epoch += 1
