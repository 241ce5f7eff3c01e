"""The books experiments without book_passages: their queries come from the released label file.

Everything is served by the fixture server in the real URL layout (LMHP_MIRROR points at it).
"""

import json

import pytest

from lm_human_preferences import experiments
from lm_human_preferences.cli import launch, main as cli
from lm_human_preferences.language import datasets, encodings
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.utils.errors import UserError

BOOKS = "lm-human-preferences/datasets/book_passages/{mode}.jsonl"
LABELS = "lm-human-preferences/labels/{experiment}/offline_5k.json"
N_QUERIES = 25  # distinct queries in the served label file


def _query(encoding: encodings.Encoding, text: str) -> list[int]:
    tokens = encoding.encode(text)[:64]
    return tokens + [encoding.padding_token] * (64 - len(tokens))


def _books_gone(server) -> None:
    """No book_passages, whatever an earlier test served."""
    for mode in ("train", "test"):
        (server.root / BOOKS.format(mode=mode)).unlink(missing_ok=True)


@pytest.fixture()
def label_queries(http_server) -> dict[str, list[list[int]]]:
    """Serve a best-of-4 label file per books experiment (each query labelled twice, as repeats
    do occur) and no book passages; returns each experiment's distinct queries in file order."""
    encoding = encodings.get("main")
    served = {}
    for experiment in ("descriptiveness", "sentiment"):
        queries = [_query(encoding, f"{experiment} passage {i}, in which something happened") for i in range(N_QUERIES)]
        response = encoding.encode(" and then it ended.")
        records = [{"query": q, **{f"sample{k}": response for k in range(4)}, "best": i % 4}
                   for i, q in enumerate(queries + queries[:5])]
        http_server.add_file(LABELS.format(experiment=experiment), json.dumps(records).encode())
        served[experiment] = queries
    _books_gone(http_server)
    yield served
    _books_gone(http_server)


def _draw(task: lm_tasks.TaskHParams, mode: str, n: int) -> list[list[int]]:
    batches = lm_tasks.query_batches(task, encodings.get("main"), n, mode=mode)
    return next(batches).tolist()


def test_books_404_takes_the_label_file_queries_split_for_test(label_queries, capsys):
    task = experiments.get("train_reward", "descriptiveness").task
    queries = label_queries["descriptiveness"]
    test = _draw(task, "test", 3)
    train = _draw(task, "train", 22)  # one pass: 25 distinct queries, of which 3 are the test split
    out = capsys.readouterr().out
    assert "queries (test): book_passages is not served, so they are the distinct queries of " \
           "gs://lm-human-preferences/labels/descriptiveness/offline_5k.json (every 10th of them)" in out
    assert "queries (train): book_passages is not served" in out and out.count("book_passages is not served") == 2
    assert sorted(test) == sorted(queries[i] for i in (0, 10, 20))  # the 1st, 11th, 21st
    assert sorted(train) == sorted(q for i, q in enumerate(queries) if i % 10)  # the others, each once
    assert not set(map(tuple, test)) & set(map(tuple, train))
    # the stream repeats its shuffled pass, as for any dataset
    assert _draw(task, "train", 44)[22:] == train


def test_each_books_experiment_reads_its_own_label_file(label_queries):
    for experiment in ("sentiment", "descriptiveness"):
        task = experiments.get("train_policy", experiment).task
        assert sorted(_draw(task, "train", 22)) == sorted(q for i, q in enumerate(label_queries[experiment]) if i % 10)


def test_served_books_are_used_as_before(label_queries, http_server, capsys):
    encoding = encodings.get("main")
    for mode in ("train", "test"):
        passages = [f"Intro {mode} {i}. The {mode} passage {i} goes on. More" for i in range(6)]
        http_server.add_file(BOOKS.format(mode=mode), "\n".join(json.dumps(p) for p in passages).encode())
    task = experiments.get("train_reward", "descriptiveness").task
    for mode in ("train", "test"):
        expected = sorted(_query(encoding, f" The {mode} passage {i} goes on.") for i in range(6))
        assert sorted(_draw(task, mode, 6)) == expected  # cut after the start text, up to the end text
    assert "book_passages is not served" not in capsys.readouterr().out


def test_only_the_test_split_served(label_queries, http_server):
    """Each split decides alone: served training passages, label queries for test."""
    http_server.add_file(BOOKS.format(mode="train"), json.dumps("Intro. Some passage. More").encode())
    task = experiments.get("train_reward", "sentiment").task
    assert _draw(task, "train", 1) == [_query(encodings.get("main"), " Some passage.")]
    assert sorted(_draw(task, "test", 3)) == sorted(label_queries["sentiment"][i] for i in (0, 10, 20))


def test_query_dataset_flag_still_overrides(label_queries, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("Start. My own passage. Rest\n")
    flags = {"task.query_dataset": str(tmp_path / "mine.txt")}
    hp = launch.resolve("train_policy", "descriptiveness", "x", dict(flags))
    for task in (hp.task, hp.rewards.train_new_model.task):
        assert _draw(task, "train", 1) == [_query(encodings.get("main"), " My own passage.")]
    labels = f"labels:{experiments.LABELS}/sentiment/offline_5k.json"  # labels: takes every query, as before
    hp = launch.resolve("train_reward", "descriptiveness", "x", {"task.query_dataset": labels})
    assert sorted(_draw(hp.task, "test", N_QUERIES)) == sorted(label_queries["sentiment"])
    assert "book_passages is not served" not in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["train_reward", "train_policy"])
def test_the_seed_readme_commands_start_without_a_flag(label_queries, mode, capsys):
    """`./launch.py train_reward descriptiveness NAME` (and train_policy) as the seed README wrote
    them: hparams resolve, and the run's queries come from the label file. (A real run needs
    GPT-2 124M's weights, which tests do not download.)"""
    assert cli.main("launch", [mode, "descriptiveness", "testdesc", "--dry_run"]) == 0
    printed = capsys.readouterr().out
    dataset = "books|labels:gs://lm-human-preferences/labels/descriptiveness/offline_5k.json"
    assert f'"query_dataset": "{dataset}"' in printed
    hp = launch.resolve(mode, "descriptiveness", "testdesc", {})
    tasks = [hp.task] + ([hp.rewards.train_new_model.task] if mode == "train_policy" else [])
    for task in tasks:
        assert task.query_dataset == dataset
        assert sorted(_draw(task, "test", 3)) == sorted(label_queries["descriptiveness"][i] for i in (0, 10, 20))
    assert "so they are the distinct queries of gs://lm-human-preferences/labels/descriptiveness" in capsys.readouterr().out


def test_bad_fallbacks_and_tiny_label_files(tmp_path, http_server):
    _books_gone(http_server)
    encoding = encodings.get("test")
    with pytest.raises(UserError, match="a fallback must read books|labels:<label file>"):
        next(datasets.query_stream("cnndm|labels:x.json", encoding, 3))
    (tmp_path / "one.json").write_text(json.dumps([{"query": [1, 2, 3], "sample0": [0], "best": 0}]))
    assert next(datasets.query_stream(f"books|labels:{tmp_path / 'one.json'}", encoding, 3, mode="test")) == [1, 2, 3]
    with pytest.raises(UserError, match="1 distinct queries: too few for a train split"):
        next(datasets.query_stream(f"books|labels:{tmp_path / 'one.json'}", encoding, 3))
