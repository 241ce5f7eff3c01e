import json

import pytest
import regex

from lm_human_preferences.language import encodings
from lm_human_preferences.utils.errors import UserError

MIXED = ("Héllo, wörld! It's 2019's best—isn't it?  We've   got 12,345.67 apples\n\n\n"
         "\tand 🍎 emojis... 你好  \n end. They'll say \"naïve café\" costs $3.50 (or €4)!\r\n"
         "   spaces    before and after   ")


def reference_bpe(text: str, encoder: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """A tiny, slow, independent GPT-2 BPE: pre-tokenize, map bytes to symbols, merge by rank."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    symbol, n = {}, 0
    for b in range(256):
        if b in printable:
            symbol[b] = chr(b)
        else:
            symbol[b] = chr(256 + n)
            n += 1
    rank = {pair: i for i, pair in enumerate(merges)}
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    ids = []
    for piece in regex.findall(pattern, text):
        word = [symbol[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(rank.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            best, _ = min(pairs)
            if best == float("inf"):
                break
            a, b = merges[best]
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(encoder[s] for s in word)
    return ids


def test_main_matches_independent_bpe(http_server):
    enc = encodings.get("main")
    encoder, merges = encodings.read_bpe_files()
    expected = reference_bpe(MIXED, encoder, merges)
    assert enc.encode(MIXED) == expected
    assert enc.decode(expected) == MIXED
    assert len(expected) > 60


def test_main_constants_and_known_ids(http_server):
    enc = encodings.get("main")
    assert (enc.n_vocab, enc.eot_token, enc.padding_token) == (50257, 50256, 50259)
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(".") == [13] and enc.encode("\n") == [198]
    assert enc.decode([15496, 50259, 995, 50259]) == "Hello world"
    with pytest.raises(UserError, match="token id 50258 is outside the 'main' vocabulary"):
        enc.decode([50258])


def test_main_files_come_through_storage_cache(http_server, tmp_path):
    encodings.read_bpe_files()
    cached = list((tmp_path / "cache").rglob("*encoder.json"))
    assert len(cached) == 1
    assert json.loads(cached[0].read_text())["<|endoftext|>"] == 50256


def test_mismatched_bpe_files_are_rejected():
    encoder = {"a": 0, "b": 1, "ab": 2}
    with pytest.raises(UserError, match="does not match encoder.json"):
        encodings.mergeable_ranks(encoder, [("a", "b")])


def test_test_encoding():
    enc = encodings.get("test")
    assert (enc.n_vocab, enc.eot_token, enc.padding_token) == (27, 26, 27)
    assert enc.encode("abz.") == [0, 1, 25, 26]
    assert enc.encode("a B!") == [0, 26, 26, 26]
    assert enc.decode([7, 4, 11, 11, 14, 27, 27]) == "hello"
    with pytest.raises(UserError, match="outside the 'test' vocabulary"):
        enc.decode([30])


def test_unknown_encoding():
    with pytest.raises(UserError, match="unknown encoding 'gpt5'; known: kjv_words, main, test"):
        encodings.get("gpt5")


def test_kjv_words_encoding():
    enc = encodings.get("kjv_words")
    pieces = json.loads(encodings.KJV_VOCAB.read_text(encoding="utf-8"))
    assert (enc.n_vocab, enc.padding_token) == (len(pieces), len(pieces)) and enc.decode([enc.eot_token]) == "\n"
    assert pieces[:2] == ["\n", " ⁇"] and {" the", " and", ",", ".", "and", " lord"} <= set(pieces)
    tokens = enc.encode("And GOD said,  Let there be light.\n")
    assert [pieces[t] for t in tokens] == ["and", " god", " said", ",", " let", " there", " be", " light", ".", "\n"]
    assert enc.decode(tokens) == "and god said, let there be light.\n"  # upper case folds, runs of spaces count once
    assert enc.decode(enc.encode("the zyxwv came")) == "the ⁇ came"  # unknown words → ' ⁇'
    assert enc.decode([tokens[0], enc.padding_token, tokens[1]]) == "and god"
