"""label.py export / import: label files to and from text preference pairs."""

import importlib.util
import json

import numpy as np
import pytest

from lm_human_preferences import experiments
from lm_human_preferences.cli import main as cli
from lm_human_preferences.labeling import interchange, label_files, label_types
from lm_human_preferences.language import encodings
from lm_human_preferences.utils.errors import UserError

MOCK = "mock_descriptiveness"  # the packaged kjv model and its word encoding: no network


def kjv():
    return experiments.get("train_reward", MOCK).task, encodings.get("kjv_words")


def read_jsonl(path) -> list[dict]:
    """The records as `datasets` reads them when it is installed (it is not a dependency), else as JSON Lines."""
    if importlib.util.find_spec("datasets") is None:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    import datasets

    return list(datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(path.parent / "hf")))


def label(args: list[str]) -> int:
    return cli.main("label", [str(a) for a in args])


def best_pairs(records: list[dict], n: int) -> list[tuple]:
    """(query, chosen, rejected) of every best_of_N record's N − 1 pairs, in file order."""
    return [(r["query"], r[f"sample{r['best']}"], r[f"sample{j}"]) for r in records for j in range(n) if j != r["best"]]


def test_round_trip_of_a_label_file_this_port_wrote(tmp_path, capsys):
    labels = tmp_path / "labels.json"
    assert label([MOCK, "--out", labels, "--n", "12"]) == 0
    records = json.loads(labels.read_text())
    task, enc = kjv()

    def as_text_reads(tokens: list[int]) -> list[int]:
        """The tokens of their own text: a sampled word glued to the one before ('a' 'his') reads as one."""
        ids = enc.encode(enc.decode(tokens))
        return ids + [enc.padding_token] * (len(tokens) - len(ids))

    for keep_ids in (False, True):
        pairs, back = tmp_path / f"pairs{keep_ids}.jsonl", tmp_path / f"back{keep_ids}.json"
        assert label(["export", labels, "--experiment", MOCK, "--out", pairs, *(["--keep-ids"] if keep_ids else [])]) == 0
        assert f"wrote 36 pairs from 12 best_of_4 records to {pairs}" in capsys.readouterr().out
        assert label(["import", pairs, "--experiment", MOCK, "--out", back]) == 0
        imported = json.loads(back.read_text())
        expected = best_pairs(records, 4)  # by their ids: the same token ids, padding included
        if not keep_ids:  # by their texts
            expected = [tuple(as_text_reads(tokens) for tokens in pair) for pair in expected]
        assert best_pairs(imported, 2) == expected
        assert {r["best"] for r in imported} == {0, 1}
        # the result is a valid label file of the task
        loaded = label_files.load(str(back), label_types.get("best_of_2"), task.query_length, task.response_length,
                                  label_files.Vocabulary(enc.n_vocab, enc.padding_token))
        assert len(loaded) == 36


def test_export_texts_have_no_padding_and_load_as_a_dataset(tmp_path):
    task, enc = kjv()
    pad = enc.padding_token
    query = enc.encode("in the beginning god created") + [pad] * 7
    samples = [enc.encode(" the heaven and the earth") + [pad] * 11, enc.encode(" and the great light") + [pad] * 12,
               enc.encode(" holy") + [pad] * 15]
    labels = label_files.Labels({"query": np.array([query]), **{f"sample{i}": np.array([s]) for i, s in enumerate(samples)},
                                 "best": np.array([2])})
    exported = interchange.export_records(labels, label_types.get("best_of_3"), task, enc, keep_ids=True)
    path = tmp_path / "pairs.jsonl"
    path.write_text(interchange.jsonl(exported.records), encoding="utf-8")
    rows = read_jsonl(path)
    assert [set(r) for r in rows] == [{"prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids"}] * 2
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("in the beginning god created", " holy", " the heaven and the earth"),
        ("in the beginning god created", " holy", " and the great light")]
    assert rows[0]["prompt_ids"] == query[:5] and rows[1]["rejected_ids"] == samples[1][:4]
    assert all(pad not in r["prompt_ids"] + r["chosen_ids"] + r["rejected_ids"] for r in rows)


def test_export_of_scalar_labels():
    task, enc = kjv()
    pad = enc.padding_token
    query = np.array([enc.encode(" god") + [pad] * 11] * 3)
    first, second = (np.array([enc.encode(text) + [pad] * 15] * 3) for text in (" light", " darkness"))
    compare = label_files.Labels({"query": query, "sample0": first, "sample1": second,
                                  "difference": np.array([1.5, -2.0, 0.0], dtype=np.float32)})
    exported = interchange.export_records(compare, label_types.get("scalar_compare"), task, enc)
    assert exported.ties == 1
    assert exported.records == [{"prompt": " god", "chosen": " darkness", "rejected": " light"},
                                {"prompt": " god", "chosen": " light", "rejected": " darkness"}]
    rating = label_files.Labels({"query": query[:2], "sample": first[:2], "score": np.array([6.0, 2.5], dtype=np.float32)})
    exported = interchange.export_records(rating, label_types.get("scalar_rating"), task, enc, keep_ids=True)
    assert exported.records[1] == {"prompt": " god", "completion": " light", "score": 2.5,
                                   "prompt_ids": enc.encode(" god"), "completion_ids": enc.encode(" light")}


def test_the_label_type_comes_from_the_first_record():
    assert interchange.detect_type({"query": [], "sample0": [], "sample1": [], "sample2": [], "best": 0}, "f") == "best_of_3"
    assert interchange.detect_type({"query": [], "sample0": [], "sample1": [], "difference": 1.0}, "f") == "scalar_compare"
    assert interchange.detect_type({"query": [], "sample": [], "score": 1.0}, "f") == "scalar_rating"
    with pytest.raises(UserError, match="not those of a best_of_N"):
        interchange.detect_type({"text": "x"}, "f")


def import_lines(lines: list[dict], task=None, seed: int = 0) -> interchange.Imported:
    default_task, enc = kjv()
    task = task or default_task
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    return interchange.import_records(interchange.read_pairs(text, "pairs.jsonl", task, enc), task, enc, seed)


def test_import_formats_as_the_task_does():
    task, enc = kjv()
    imported = import_lines([{"prompt": "And God said, Let there be light", "chosen": " and there was light.",
                              "rejected": " and it was so"}])
    [record] = imported.records
    chosen, rejected = record[f"sample{record['best']}"], record[f"sample{1 - record['best']}"]
    query = enc.encode("and god said, let there be light")
    assert len(query) == 8 and record["query"] == query + [enc.padding_token] * 4
    assert chosen == enc.encode(" and there was light.") + [enc.padding_token] * 11
    assert rejected == enc.encode(" and it was so") + [enc.padding_token] * 12
    assert not imported.skipped


def test_import_counts_what_does_not_fit_and_cuts_nothing():
    task, _ = kjv()
    [dot] = encodings.get("kjv_words").encode(".")
    task.truncate_token, task.truncate_after = dot, 2
    long_prompt = " ".join(["god"] * 13)
    fits = {"prompt": "god said", "chosen": " let there be light.", "rejected": " no"}
    lines = [fits, {**fits, "prompt": long_prompt}, {**fits, "prompt": ""}, {**fits, "chosen": ""},
             {**fits, "rejected": " light" * 17}, {**fits, "chosen": " and light. and darkness"},
             {**fits, "rejected": fits["chosen"]}, {**fits, "prompt": " ".join(["god"] * 12)}]
    imported = import_lines(lines, task)
    assert len(imported.records) == 2
    assert imported.skipped == {
        "prompt longer than task.query_length (12 tokens)": [2], "empty prompt": [3], "empty response": [4],
        "response longer than task.response_length (16 tokens)": [5],
        f"response goes on after its truncate token {dot} (the task would cut it there)": [6],
        "chosen and rejected are the same tokens": [7]}
    assert list(interchange.skipped_summary({"empty prompt": [1, 2, 3, 4, 5, 6]})) == ["6 empty prompt (line 1, 2, 3, 4, 5, …)"]


@pytest.mark.parametrize("chosen, rejected, split", [
    ("\n\nHuman: hi\n\nAssistant: Yes it is", "\n\nHuman: hi\n\nAssistant: Yesterday", "\n\nHuman: hi\n\nAssistant:"),
    ("the lord said unto him", "the lord spake", "the lord"),
    ("the lord said ", "the lord said  again", "the lord said"),
    ("same words", "same words", "same"),
    ("alpha", "beta", ""),
])
def test_dialogue_pairs_split_at_a_word_boundary(chosen, rejected, split):
    prompt, chosen_response, rejected_response = interchange.split_dialogue(chosen, rejected)
    assert prompt == split
    assert prompt + chosen_response == chosen and prompt + rejected_response == rejected


def test_dialogue_pairs_import_with_their_common_prompt():
    imported = import_lines([{"chosen": "god said let there be light", "rejected": "god said let it be dark"}])
    _, enc = kjv()
    [record] = imported.records
    assert record["query"][:4] == enc.encode("god said let") + [enc.padding_token]
    assert record[f"sample{record['best']}"][:4] == enc.encode(" there be light") + [enc.padding_token]


def test_prefix_and_suffix_are_in_the_exported_prompt_and_not_doubled_on_import(http_server):
    """tldr: the GPT-2 encoding (from the fixture server) and a query_suffix the task adds itself."""
    task = experiments.get("train_reward", "tldr").task
    enc = encodings.get("main")
    pad = enc.padding_token
    query, response = enc.encode("I lost my keys again."), enc.encode(" Keys lost.")
    other = enc.encode(" I like cats.")
    labels = label_files.Labels({
        "query": np.array([query + [pad] * (500 - len(query))]),
        **{key: np.array([r + [pad] * (75 - len(r))]) for key, r in (("sample0", other), ("sample1", response))},
        "best": np.array([1])})
    [pair] = interchange.export_records(labels, label_types.get("best_of_2"), task, enc).records
    assert pair == {"prompt": "I lost my keys again.\n\nTL;DR:", "chosen": " Keys lost.", "rejected": " I like cats."}
    [record] = interchange.import_records(interchange.read_pairs(json.dumps(pair), "p", task, enc), task, enc).records
    assert record["query"] == labels.columns["query"][0].tolist()
    assert record[f"sample{record['best']}"] == labels.columns["sample1"][0].tolist()


@pytest.mark.parametrize("line, message", [
    ("not json", "pairs.jsonl: line 2 is not JSON"),
    ('["a", "b"]', "pairs.jsonl: line 2 is a JSON list, not an object"),
    ('{"prompt": "god", "chosen": " light"}', "pairs.jsonl: line 2 lacks 'rejected'"),
    ('{"prompt": "god", "chosen": [{"role": "assistant", "content": "x"}], "rejected": " x"}',
     "pairs.jsonl: line 2: 'chosen' is a JSON list, not a string"),
    ('{"prompt": 3, "chosen": " a", "rejected": " b"}', "pairs.jsonl: line 2: 'prompt' is a JSON int"),
    ('{"prompt": "god", "chosen": " a", "rejected": " b", "chosen_ids": [4]}', "needs 'prompt' and all of"),
    ('{"prompt": " god", "chosen": " a", "rejected": " b", "prompt_ids": [33], "chosen_ids": [4], "rejected_ids": [5]}',
     "'chosen_ids' do not decode to the text beside them"),
    ('{"prompt": " god", "chosen": " a", "rejected": " b", "prompt_ids": [33], "chosen_ids": [99999], "rejected_ids": [5]}',
     "'chosen_ids' holds token id 99999, outside the 'kjv_words' vocabulary"),
])
def test_bad_pairs_files_are_one_line_errors_naming_the_line(tmp_path, capsys, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "god", "chosen": " light", "rejected": " darkness"}) + "\n" + line + "\n")
    out = tmp_path / "labels.json"
    assert label(["import", path, "--experiment", MOCK, "--out", out]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_import_of_nothing_that_fits_writes_nothing(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "god", "chosen": " light", "rejected": " light"}) + "\n")
    assert label(["import", path, "--experiment", MOCK, "--out", tmp_path / "labels.json"]) == 1
    assert "none of its 1 pairs fits the task: 1 chosen and rejected are the same tokens (line 1)" in capsys.readouterr().err
    assert not (tmp_path / "labels.json").exists()


def test_help_and_usage(capsys):
    assert label(["--help"]) == 0 and "label.py export LABELS" in capsys.readouterr().out
    assert label(["export", "--help"]) == 0 and "--keep-ids" in capsys.readouterr().out
    assert label(["import", "--help"]) == 0 and "longest" in capsys.readouterr().out
    assert label(["import", "pairs.jsonl", "--out", "x.json"]) == 1
    assert "--experiment is missing" in capsys.readouterr().err
    assert label(["export", "labels.json", "--experiment", MOCK, "--out", "x", "--colour", "red"]) == 1
    assert "unknown option --colour" in capsys.readouterr().err


PROMPTS = ["in the beginning god created the heaven", "and the spirit of god moved upon the waters",
           "and god saw the light", "and the evening and the morning were the first day",
           "and god called the firmament heaven", "the lord is my shepherd",
           "he leadeth me beside the still waters", "blessed are the meek"]
BETTER = [" a great and holy light", " and the mighty and glorious king", " and exceedingly beautiful waters",
          " a wonderful and holy day"]
WORSE = [" and it was so", " and he went unto them", " and they said unto him", " and the man came"]


def test_imported_pairs_train_a_best_of_2_reward_model(tmp_path, capsys):
    """A made-up pair set: the first 6 prompts' 24 pairs train, the last 2 prompts' are held out."""
    lines = [{"prompt": p, "chosen": BETTER[i], "rejected": WORSE[(i + k) % 4]} for k, p in enumerate(PROMPTS)
             for i in range(4)]
    lines[-1] = {"chosen": PROMPTS[-1] + BETTER[3], "rejected": PROMPTS[-1] + WORSE[0]}  # the dialogue form
    lines.insert(3, {"prompt": " ".join(["god"] * 20), "chosen": " light", "rejected": " dark"})  # too long: skipped
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    labels = tmp_path / "labels.json"
    assert label(["import", pairs, "--experiment", MOCK, "--out", labels]) == 0
    out = capsys.readouterr().out
    assert f"wrote 32 best_of_2 records from 33 pairs to {labels}" in out
    assert "skipped 1: 1 prompt longer than task.query_length (12 tokens) (line 4)" in out
    args = ["train_reward", MOCK, "pairs", "--save_dir", tmp_path, "--labels.source", labels, "--labels.type",
            "best_of_2", "--labels.num_train", "24", "--batch_size", "8", "--normalize_before", "off",
            "--normalize_after", "off"]  # normalizing samples the policy: seconds, and not what this checks
    assert cli.main("launch", [str(a) for a in args]) == 0
    summary = json.loads((tmp_path / "pairs" / "train_reward_summary.json").read_text())
    assert summary["heldout"]["count"] == 8 and 0 <= summary["heldout"]["accuracy"] <= 1
    assert summary["heldout"]["chance"] == 0.5
    assert np.isfinite(summary["train"]["train/loss"])
    assert (tmp_path / "pairs" / "reward_model" / "checkpoints" / "latest").exists()


def test_released_labels_export_and_import_through_their_url(http_server, tmp_path, capsys):
    """The released schema (GPT-2 tokens, books task: 64-token queries, 24-token responses cut after
    a '.' from index 16 on) from its gs:// URL, served by the fixture server."""
    enc = encodings.get("main")
    pad = enc.padding_token
    query = enc.encode("She opened the door and looked outside. The garden was quiet.")
    responses = [enc.encode(" The roses were red and the grass was wet with dew, and the old stone wall glowed in the sun."),
                 enc.encode(" Nothing moved, and she closed the door again."),
                 enc.encode(" A bird sang somewhere in the tall trees beyond the wall, and the wind blew softly through"),
                 enc.encode(" It was night.")]
    assert all(len(r) <= 24 for r in responses) and responses[0].index(13) >= 16
    record = {"query": query + [pad] * (64 - len(query)), "best": 0,
              **{f"sample{i}": r + [pad] * (24 - len(r)) for i, r in enumerate(responses)}}
    http_server.add_file("lm-human-preferences/labels/descriptiveness/offline_5k.json", json.dumps([record]).encode())
    source = "gs://lm-human-preferences/labels/descriptiveness/offline_5k.json"
    pairs, back = tmp_path / "descriptiveness.jsonl", tmp_path / "back.json"
    assert label(["export", source, "--experiment", "descriptiveness", "--out", pairs]) == 0
    rows = read_jsonl(pairs)
    assert [r["rejected"] for r in rows] == [enc.decode(r) for r in responses[1:]]
    assert rows[0]["prompt"] == "She opened the door and looked outside. The garden was quiet."
    assert label(["import", pairs, "--experiment", "descriptiveness", "--out", back]) == 0
    assert "wrote 3 best_of_2 records from 3 pairs" in capsys.readouterr().out
    assert best_pairs(json.loads(back.read_text()), 2) == best_pairs([record], 4)
