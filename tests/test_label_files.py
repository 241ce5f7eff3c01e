import json

import numpy as np
import pytest

from lm_human_preferences.labeling import label_files, label_types
from lm_human_preferences.utils.errors import UserError

VOCAB = label_files.Vocabulary(n_vocab=50257, padding_token=50259)
BO4 = label_types.get("best_of_4")


def record(query=None, best=0, **samples):
    rec = {"query": query or [1] * 4}
    for i in range(4):
        rec[f"sample{i}"] = samples.get(f"sample{i}", [i + 2, 50259])
    rec["best"] = best
    return rec


def write(tmp_path, records, name="labels.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def test_load_released_schema_with_extra_keys(tmp_path):
    recs = [record(query=[5, 6, 7, 50259], best=3), {**record(best=1), "extra": "ignored"}]
    got = label_files.load(write(tmp_path, recs), BO4, 4, 2, VOCAB)
    assert len(got) == 2
    np.testing.assert_array_equal(got.columns["query"][0], [5, 6, 7, 50259])
    np.testing.assert_array_equal(got.columns["sample2"][1], [4, 50259])
    np.testing.assert_array_equal(got.columns["best"], [3, 1])


def test_load_through_gs_url(http_server, tmp_path):
    http_server.add_file("lm-human-preferences/labels/sentiment/tiny.json", json.dumps([record()] * 3).encode())
    got = label_files.load("gs://lm-human-preferences/labels/sentiment/tiny.json", BO4, 4, 2, VOCAB)
    assert len(got) == 3


@pytest.mark.parametrize("content, message", [
    ('{"query": []}', "must be a JSON list of records"),
    ('[{"query": [1, 1, 1, 1]', "invalid JSON in record 0"),
    (json.dumps([record(), record()])[:-5], "invalid JSON in record 1"),
    (json.dumps([record(), 7]), "record 1 is a int, not an object"),
    (json.dumps([record(), {k: v for k, v in record().items() if k != "sample2"}]), "record 1 lacks 'sample2'"),
    (json.dumps([record(query=[1, 2, 3])]), "record 0: 'query' has 3 tokens, the task expects 4"),
    (json.dumps([record(sample1=[1, 2, 3])]), "record 0: 'sample1' has 3 tokens, the task expects 2"),
    (json.dumps([record(sample0=[60000, 1])]), "record 0: 'sample0' holds token id 60000, outside the vocabulary"),
    (json.dumps([record(sample0=[50258, 1])]), "token id 50258, outside the vocabulary .* not the padding token 50259"),
    (json.dumps([record(query=[1, 2, -3, 4])]), "token id -3"),
    (json.dumps([record(query=[1, 2, 3.5, 4])]), "'query' must be a list of integer token ids"),
    (json.dumps([record(best=4)]), r"record 0: 'best' is 4; it must be an integer in 0..3"),
    (json.dumps([record(best="1")]), r"'best' is '1'; it must be an integer"),
    ("[]", "holds no records"),
    (json.dumps([record()]) + json.dumps([record()]), "unexpected data after the JSON list .*two files joined"),
    (json.dumps([record()]) + "\n  garbage", r"unexpected data after the JSON list \(line 2, column 3: 'garbage'\)"),
    ("[] x", "unexpected data after the JSON list"),
    ("[" + "1" * 5000 + "]", "record 0 cannot be read"),
    ("[" + "[" * 100000 + "]", "record 0 cannot be read"),
])
def test_defects_give_specific_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        label_files.load(str(path), BO4, 4, 2, VOCAB)


def test_scalar_labels_must_be_finite(tmp_path):
    recs = [{"query": [1, 1, 1, 1], "sample": [1, 1], "score": 2.5}, {"query": [1, 1, 1, 1], "sample": [1, 1], "score": None}]
    with pytest.raises(UserError, match="record 1: 'score' is None; it must be a finite number"):
        label_files.load(write(tmp_path, recs), label_types.get("scalar_rating"), 4, 2, VOCAB)
    path = tmp_path / "nan.json"
    path.write_text('[{"query": [1, 1, 1, 1], "sample": [1, 1], "score": NaN}]')
    with pytest.raises(UserError, match="'score' is nan; it must be a finite number"):
        label_files.load(str(path), label_types.get("scalar_rating"), 4, 2, VOCAB)


def test_missing_file_and_404(http_server):
    with pytest.raises(UserError, match="no such file"):
        label_files.load("/nonexistent/labels.json", BO4, 4, 2, VOCAB)
    with pytest.raises(UserError, match="not found \\(HTTP 404\\)"):
        label_files.load("gs://lm-human-preferences/labels/none.json", BO4, 4, 2, VOCAB)


def test_split_num_train_and_heldout_by_unique_query(tmp_path):
    recs = [record(query=[q, 0, 0, 0]) for q in [1, 2, 3, 1, 4, 2, 5]]
    everything = label_files.load(write(tmp_path, recs), BO4, 4, 2, VOCAB)
    train, heldout = label_files.split(everything, 3, "f.json")
    assert len(train) == 3
    assert heldout.columns["query"][:, 0].tolist() == [4, 5]  # 1 and 2 were seen in training
    with pytest.raises(UserError, match="f.json holds 7 labels but labels.num_train is 8; lower labels.num_train to at most 7"):
        label_files.split(everything, 8, "f.json")


def test_trailing_whitespace_is_fine(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps([record(best=2)]) + "\n\n  \t")
    assert label_files.load(str(path), BO4, 4, 2, VOCAB).columns["best"].tolist() == [2]


def test_no_heldout_set_is_said(tmp_path, capsys):
    """Later records that all share training queries leave nothing held out: one warning line."""
    recs = [record(query=[q, 0, 0, 0]) for q in [1, 2, 3, 1, 2, 3, 3]]
    everything = label_files.load(write(tmp_path, recs), BO4, 4, 2, VOCAB)
    train, heldout = label_files.split(everything, 3, "f.json")
    assert len(train) == 3 and len(heldout) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("warning: f.json: all 4 labels after the first 3") \
        and "nothing is held out" in out, out
    label_files.split(label_files.load(write(tmp_path, recs[:3] + [record(query=[9, 0, 0, 0])]), BO4, 4, 2, VOCAB),
                      3, "g.json")
    label_files.split(everything, 7, "h.json")  # nothing after the training labels: nothing to warn about
    assert capsys.readouterr().out == ""


def test_test_source():
    got = label_files.load("test", label_types.get("scalar_compare"), 3, 2, VOCAB)
    assert len(got) == 50
    assert set(got.columns) == {"query", "sample0", "sample1", "difference"}
    assert not got.columns["sample1"].any() and got.columns["query"].shape == (50, 3)
