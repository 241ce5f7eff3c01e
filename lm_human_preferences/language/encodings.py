"""Tokenizers by name: `main` (GPT-2 byte-level BPE), `test` (27 characters) and `kjv_words`
(the word vocabulary of the packaged `kjv` model).

Every encoding has a padding token just outside its vocabulary that decodes to ''.
"""

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable

from lm_human_preferences.utils import storage
from lm_human_preferences.utils.errors import UserError

MAIN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
MAIN_FILES = ("encoder.json", "vocab.bpe")

# GPT-2's pre-tokenization pattern (contractions, letters, numbers, other, whitespace).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass
class Encoding:
    name: str
    n_vocab: int
    eot_token: int
    padding_token: int
    _encode: Callable[[str], list[int]] = field(repr=False)
    _decode: Callable[[list[int]], str] = field(repr=False)

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of `tokens`; padding decodes to '', any other id outside the vocabulary is an error."""
        ids = [int(t) for t in tokens if int(t) != self.padding_token]
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the {self.name!r} vocabulary "
                            f"(0..{self.n_vocab - 1}, padding {self.padding_token}); "
                            "were these tokens made with another encoding?")
        return self._decode(ids)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters used in its files.

    Printable latin-1 bytes map to themselves; the other 68 bytes map, in byte order,
    to chr(256), chr(257), ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def mergeable_ranks(encoder: dict[str, int], merges: list[tuple[str, str]]) -> dict[bytes, int]:
    """tiktoken's rank table from GPT-2's `encoder.json` and `vocab.bpe`, checking they agree.

    In GPT-2, a token's id is its BPE rank: ids 0..255 are single bytes and id 256 + i is
    the i-th merge, so tiktoken's rank-ordered merging reproduces the original BPE.
    """
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(byte_of[c] for c in token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    except KeyError as e:
        raise UserError(f"encoder.json holds a character {e} outside GPT-2's byte alphabet; the file is corrupt") from None
    for i, (first, second) in enumerate(merges):
        if encoder.get(first + second) != 256 + i:
            raise UserError(f"vocab.bpe merge {i} ({first!r} {second!r}) does not match encoder.json; "
                            "the two files are from different vocabularies")
    return ranks


def read_bpe_files(base_url: str = MAIN_URL) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Download (once, through the cache) and parse `encoder.json` and `vocab.bpe`."""
    encoder_path, bpe_path = (storage.fetch(storage.join(base_url, name)) for name in MAIN_FILES)
    try:
        encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
        lines = bpe_path.read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse GPT-2 encoding files in {encoder_path.parent} ({e}); "
                        "delete them from the cache and run again") from None
    if any(len(m) != 2 for m in merges):
        raise UserError(f"{bpe_path}: every merge line must hold two symbols; delete the file from the cache")
    return encoder, merges


@cache
def _main() -> Encoding:
    import tiktoken

    encoder, merges = read_bpe_files()
    eot = encoder["<|endoftext|>"]
    bpe = tiktoken.Encoding(
        name="gpt2-lm-human-preferences",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=mergeable_ranks(encoder, merges),
        special_tokens={"<|endoftext|>": eot},
    )
    return Encoding(
        name="main",
        n_vocab=len(encoder),
        eot_token=eot,
        padding_token=len(encoder) + 2,
        _encode=lambda text: bpe.encode_ordinary(text),
        _decode=lambda ids: bpe.decode(ids, errors="replace"),
    )


TEST_CHARS = "abcdefghijklmnopqrstuvwxyz."


def _test() -> Encoding:
    index = {c: i for i, c in enumerate(TEST_CHARS)}
    unknown = len(TEST_CHARS) - 1
    return Encoding(
        name="test",
        n_vocab=len(TEST_CHARS),
        eot_token=unknown,
        padding_token=len(TEST_CHARS),
        _encode=lambda text: [index.get(c, unknown) for c in text],
        _decode=lambda ids: "".join(TEST_CHARS[i] for i in ids),
    )


KJV_VOCAB = Path(__file__).resolve().parent.parent / "data" / "kjv" / "vocab.json"
# A piece is a newline, or one word or punctuation mark with the space before it, if any.
WORD_PIECES = re.compile(r"\n| ?[a-z]+| ?[^a-z\s]")
UNKNOWN_WORD = 1  # the id of any piece outside the vocabulary


def word_pieces(text: str) -> list[str]:
    """Lower-cased pieces of `text`; runs of spaces count as one, other whitespace but newlines is dropped."""
    return WORD_PIECES.findall(text.lower())


@cache
def _kjv_words() -> Encoding:
    """The packaged model's word vocabulary: each KJV word or punctuation mark (with its leading
    space) is one token, so the mock labelers' words are single tokens. Id 0 is the newline that
    ends a verse; id 1 stands for any piece outside the vocabulary and decodes to ' ⁇'."""
    pieces = json.loads(KJV_VOCAB.read_text(encoding="utf-8"))
    index = {piece: i for i, piece in enumerate(pieces)}
    return Encoding(
        name="kjv_words",
        n_vocab=len(pieces),
        eot_token=index["\n"],
        padding_token=len(pieces),
        _encode=lambda text: [index.get(piece, UNKNOWN_WORD) for piece in word_pieces(text)],
        _decode=lambda ids: "".join(pieces[i] for i in ids),
    )


_ENCODINGS: dict[str, Callable[[], Encoding]] = {"main": _main, "test": _test, "kjv_words": _kjv_words}


def fetch_files(name: str) -> None:
    """Download the files encoding `name` reads into the cache, checking they parse and agree,
    even where `get` already built it in memory. Encodings other than `main` ship in the package."""
    _check_name(name)
    if name == "main":
        mergeable_ranks(*read_bpe_files())


def get(name: str) -> Encoding:
    """The encoding called `name`; `main` downloads its two files on first use."""
    _check_name(name)
    return _ENCODINGS[name]()


def _check_name(name: str) -> None:
    if name not in _ENCODINGS:
        raise UserError(f"unknown encoding {name!r}; known: {', '.join(sorted(_ENCODINGS))}")

