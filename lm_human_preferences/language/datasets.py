"""Query datasets → fixed-length query token streams (docs/original.md, "Query data").

`task.query_dataset` is one of
  - a name: `books`, `cnndm`, `tldr` (the original's corpora), `kjv` (verses shipped with the
    package, for the offline mock experiments) or `test` (random letters);
  - a local path or URL of a `.jsonl` (a JSON string, or an object with a `text` field, per
    line) or `.txt` (one text per line) file of texts;
  - `labels:<label file>`: the distinct queries of a label file, used as they are (they are
    already cut and padded, so start/end texts are not applied again);
  - `books|labels:<label file>` (the books experiments' default): the book passages where they
    are served (at their URL or a mirror), else the distinct queries of the label file — the
    passages its labelers saw, sampled from book_passages — split by their order in the file:
    the 1st, 11th, 21st, ... form the `test` split, the others every other mode's, so test
    queries never are training queries.
A text source is a function `(mode, seed) -> iterator of texts`, shuffled by `seed`. Query
streams repeat forever and are sharded across ranks.
"""

import gzip
import json
import random
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lm_human_preferences.language.corpora import books
from lm_human_preferences.language.corpora.books import books_texts
from lm_human_preferences.language.corpora.cnndm import cnndm_texts
from lm_human_preferences.language.corpora.tldr import tldr_texts
from lm_human_preferences.language.encodings import Encoding
from lm_human_preferences.utils import logging, storage
from lm_human_preferences.utils.errors import UserError
from lm_human_preferences.utils.jsonstream import json_list_items

LABELS_PREFIX = "labels:"
FALLBACK = "|"  # `books|labels:<label file>`: the label file's queries where book_passages is not served
TEST_EVERY = 10  # the fallback's test split: every 10th distinct query of the label file

TextSource = Callable[[str, int], Iterator[str]]


def random_letters(mode: str, seed: int) -> Iterator[str]:
    """Endless random 40-character strings over the `test` encoding's alphabet."""
    rng = random.Random(f"{mode}-{seed}")
    alphabet = string.ascii_lowercase + "."
    while True:
        yield "".join(rng.choice(alphabet) for _ in range(40))


def kjv_verses(mode: str, seed: int) -> Iterator[str]:
    """Verses of the King James Version shipped with the package (every 2nd verse; 1 in 10 of
    them form the test split), the query dataset of the offline mock experiments."""
    path = Path(__file__).resolve().parent.parent / "data" / "kjv_verses.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        verses = [line.strip() for line in f if line.strip()]
    verses = [v for i, v in enumerate(verses) if (i % 10 == 0) == (mode == "test")]
    random.Random(seed).shuffle(verses)
    yield from verses


_DATASETS: dict[str, TextSource] = {"books": books_texts, "cnndm": cnndm_texts, "tldr": tldr_texts,
                                     "kjv": kjv_verses, "test": random_letters}


def file_texts(path: str) -> TextSource:
    """Texts of a .jsonl or .txt file (path or URL); the same file serves every mode."""
    def texts(mode: str, seed: int) -> Iterator[str]:
        lines = [line for line in storage.fetch(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.endswith(".jsonl"):
            lines = [_jsonl_text(line, path, i) for i, line in enumerate(lines)]
        random.Random(seed).shuffle(lines)
        yield from lines

    return texts


def _jsonl_text(line: str, path: str, index: int) -> str:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {index + 1} is not JSON ({e.msg})") from None
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    if not isinstance(item, str):
        raise UserError(f"{path}: line {index + 1} must be a JSON string or an object with a 'text' field")
    return item


def get(name: str) -> TextSource:
    if name in _DATASETS:
        return _DATASETS[name]
    if name.endswith((".jsonl", ".txt")):
        return file_texts(name)
    raise UserError(f"unknown query dataset {name!r}; use one of {', '.join(sorted(_DATASETS))}, a .jsonl or .txt "
                    "file (path or URL), or labels:<label file>")


def label_queries(source: str, length: int, padding_token: int, n_vocab: int) -> list[list[int]]:
    """The distinct `query` token lists of a label file, in file order."""
    text = storage.fetch(source).read_text(encoding="utf-8")
    seen: dict[bytes, list[int]] = {}
    for index, record in enumerate(json_list_items(text, source)):
        query = record.get("query") if isinstance(record, dict) else None
        if not isinstance(query, list) or len(query) != length or not all(type(t) is int for t in query):
            raise UserError(f"{source}: record {index} needs a 'query' of {length} token ids (task.query_length)")
        tokens = np.asarray(query)
        if ((tokens < 0) | ((tokens >= n_vocab) & (tokens != padding_token))).any():
            raise UserError(f"{source}: record {index}: a query token is outside the vocabulary; "
                            "was the file made with another encoding?")
        seen.setdefault(tokens.tobytes(), query)
    return list(seen.values())


def books_or_labels(dataset: str, mode: str) -> tuple[str, bool]:
    """`books|labels:<file>` → ("books", False) where book_passages' `mode` split is served, else
    ("labels:<file>", True): the label file's queries, split into test and training queries."""
    primary, _, fallback = dataset.partition(FALLBACK)
    if primary != "books" or not fallback.startswith(LABELS_PREFIX) or FALLBACK in fallback:
        raise UserError(f"query dataset {dataset!r}: a fallback must read books{FALLBACK}{LABELS_PREFIX}<label file>")
    if books.served(mode):
        return primary, False
    part = "every 10th of them" if mode == "test" else "all but every 10th, which are the test queries"
    logging.print_main(f"queries ({mode}): book_passages is not served, so they are the distinct queries of "
                       f"{fallback[len(LABELS_PREFIX):]} ({part})")
    return fallback, True


def split_queries(queries: list[list[int]], mode: str) -> list[list[int]]:
    """The fallback's split of a label file's distinct queries (in file order): the 1st, 11th, 21st, ...
    are the test queries, the others the training queries."""
    chosen = [q for i, q in enumerate(queries) if (i % TEST_EVERY == 0) == (mode == "test")]
    if not chosen:
        raise UserError(f"the label file has {len(queries)} distinct queries: too few for a {mode} split "
                        f"(every {TEST_EVERY}th is a test query); give --task.query_dataset")
    return chosen


def _single_token(encoding: Encoding, text: str, what: str) -> int:
    tokens = encoding.encode(text)
    if len(tokens) != 1:
        raise UserError(f"{what} {text!r} must encode to exactly one token, got {tokens}; choose another text")
    return tokens[0]


def query_tokens(tokens: list[int], length: int, padding_token: int,
                 start_token: int | None = None, end_token: int | None = None) -> list[int] | None:
    """Turn one text's tokens into a query of exactly `length` tokens, or None to skip the text.

    Drop everything up to and including the first start token (as the original, a text whose
    only start token is its last token is kept whole); cut to `length`; cut after the last
    end token; right-pad with the padding token. Texts lacking a start or end token are skipped.
    """
    if start_token is not None:
        if start_token not in tokens:
            return None
        first = tokens.index(start_token) + 1
        if first < len(tokens):
            tokens = tokens[first:]
    tokens = tokens[:length]
    if end_token is not None:
        if end_token not in tokens:
            return None
        tokens = tokens[:len(tokens) - tokens[::-1].index(end_token)]
    return tokens + [padding_token] * (length - len(tokens))


def _one_pass(dataset: str, encoding: Encoding, length: int, start_text: str | None, end_text: str | None,
              mode: str, seed: int) -> Callable[[], Iterator[list[int] | None]]:
    """A function giving one shuffled pass over the dataset's queries (None for skipped texts)."""
    split = False
    if FALLBACK in dataset:
        dataset, split = books_or_labels(dataset, mode)
    if dataset.startswith(LABELS_PREFIX):
        queries = label_queries(dataset[len(LABELS_PREFIX):], length, encoding.padding_token, encoding.n_vocab)
        if split:
            queries = split_queries(queries, mode)
        random.Random(seed).shuffle(queries)
        return lambda: iter(queries)
    texts = get(dataset)
    start = _single_token(encoding, start_text, "start_text") if start_text else None
    end = _single_token(encoding, end_text, "end_text") if end_text else None

    def one_pass() -> Iterator[list[int] | None]:
        for text in texts(mode, seed):
            yield query_tokens(encoding.encode(text), length, encoding.padding_token, start, end)

    return one_pass


def query_stream(dataset: str, encoding: Encoding, length: int, *, start_text: str | None = None,
                 end_text: str | None = None, mode: str = "train", seed: int = 0,
                 rank: int = 0, world: int = 1) -> Iterator[list[int]]:
    """Endless stream of queries (lists of `length` token ids) for this rank.

    Every pass over the dataset uses the same shuffle (`seed`), and rank r takes the usable
    queries r, r + world, r + 2·world, ... of that stream, as the original's tf.data pipeline.
    """
    one_pass = _one_pass(dataset, encoding, length, start_text, end_text, mode, seed)
    index = 0
    while True:
        produced = False
        for query in one_pass():
            if query is None:
                continue
            produced = True
            if index % world == rank:
                yield query
            index += 1
        if not produced:
            raise UserError(f"dataset {dataset!r} ({mode}) gave no usable query: every text lacks "
                            f"the start text {start_text!r} or the end text {end_text!r}")
