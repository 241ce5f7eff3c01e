import hashlib
import json
import random

import pytest

from lm_human_preferences.language.corpora import cnndm
from lm_human_preferences.language import datasets, encodings
from lm_human_preferences.utils.errors import UserError

BASE = "lm-human-preferences"


def test_books_reads_jsonl_and_shuffles_with_the_seed(http_server):
    passages = [f"Passage number {i}. It was dark." for i in range(20)]
    http_server.add_file(f"{BASE}/datasets/book_passages/train.jsonl",
                         "\n".join(json.dumps(p) for p in passages).encode())
    texts = list(datasets.get("books")("train", 0))
    expected = list(passages)
    random.Random(0).shuffle(expected)
    assert texts == expected


def test_books_404_names_the_substitutes(http_server):
    with pytest.raises(UserError, match="book_passages is no longer served .*labels:gs://lm-human-preferences/labels"):
        next(datasets.get("books")("test", 0))


def test_tldr_modes_and_cleanup(http_server):
    posts = [{"content": "First post\n\n\n\nwith gaps   ", "id": 1}, {"content": "Second â€™ post"}]
    http_server.add_file(f"{BASE}/tldr/valid-subset.json", json.dumps(posts).encode())
    texts = sorted(datasets.get("tldr")("test", 0))  # test reads the valid subset
    assert texts == ["First post\n\nwith gaps", "Second ' post"]  # ftfy repairs the mojibake (and uncurls)
    with pytest.raises(UserError, match="tldr/train-subset.json: not found"):
        next(datasets.get("tldr")("train", 0))


def test_cnndm_reads_stories_by_url_hash(http_server):
    urls = ["http://www.cnn.com/2014/story-a.html", "http://www.dailymail.co.uk/news/article-b.html"]
    http_server.add_file(f"{BASE}/datasets/cnndm/url_lists/all_val.txt", "\n".join(urls).encode())
    stories = {
        urls[0]: "By Jane Doe\nCNN\nWASHINGTON (CNN) -- The story\n\n\n\nbegins here.\n\n@highlight\n\nsummary",
        urls[1]: "Daily text ‘quoted’.\n@highlight\nmore",
    }
    for url, story in stories.items():
        site = "cnn" if "cnn" in url else "dailymail"
        digest = hashlib.sha1(url.encode()).hexdigest()
        assert cnndm.story_path(url) == f"{site}/stories/{digest}.story"
        http_server.add_file(f"{BASE}/datasets/cnndm/cache_val/{site}/stories/{digest}.story", story.encode())
    texts = sorted(datasets.get("cnndm")("valid", 0))
    assert texts == ["Daily text 'quoted'.", "The story\n\nbegins here."]


def test_file_substitutes(http_server, tmp_path):
    (tmp_path / "texts.jsonl").write_text('"one. two"\n{"text": "three. four"}\n\n')
    (tmp_path / "texts.txt").write_text("alpha. beta\n\ngamma. delta\n")
    assert sorted(datasets.get(str(tmp_path / "texts.jsonl"))("train", 0)) == ["one. two", "three. four"]
    assert sorted(datasets.get(str(tmp_path / "texts.txt"))("test", 0)) == ["alpha. beta", "gamma. delta"]
    http_server.add_file("lm-human-preferences/mine/texts.txt", b"remote. text\n")
    assert list(datasets.get("gs://lm-human-preferences/mine/texts.txt")("train", 0)) == ["remote. text"]
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    with pytest.raises(UserError, match="line 1 must be a JSON string"):
        list(datasets.get(str(tmp_path / "bad.jsonl"))("train", 0))
    with pytest.raises(UserError, match="unknown query dataset 'book'"):
        datasets.get("book")


def test_query_stream_over_a_file_with_start_and_end_text(tmp_path):
    (tmp_path / "t.txt").write_text("xx.abc.de.fgh\nnostarthere\n")
    stream = datasets.query_stream(str(tmp_path / "t.txt"), encodings.get("test"), 6, start_text=".", end_text=".")
    # after the first '.': "abc.de.fgh"; cut to 6: "abc.de"; cut after the last '.': "abc."; pad
    assert next(stream) == [0, 1, 2, 26, 27, 27]
    assert next(stream) == [0, 1, 2, 26, 27, 27]  # the other text has no '.', so the stream repeats


def test_label_file_queries_as_a_dataset(tmp_path):
    records = [{"query": q, "sample0": [0], "best": 0} for q in ([1, 2, 27], [3, 4, 5], [1, 2, 27])]
    (tmp_path / "labels.json").write_text(json.dumps(records))
    stream = datasets.query_stream(f"labels:{tmp_path / 'labels.json'}", encodings.get("test"), 3, start_text=".")
    first_pass = [next(stream) for _ in range(2)]
    assert sorted(first_pass) == [[1, 2, 27], [3, 4, 5]]  # deduplicated, used as they are
    with pytest.raises(UserError, match="needs a 'query' of 4 token ids"):
        next(datasets.query_stream(f"labels:{tmp_path / 'labels.json'}", encodings.get("test"), 4))
