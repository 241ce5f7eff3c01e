import json
import random
from collections import Counter

import pytest

from lm_human_preferences.cli import main as cli
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.labeling import collect, label_files, label_types, mock_labelers
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.utils.errors import UserError


def test_sentiment_lexicon():
    assert mock_labelers.sentiment("", "and they rejoiced with great joy") == 2.0
    assert mock_labelers.sentiment("", "the wicked shall perish in darkness") == -3.0
    assert mock_labelers.sentiment("", "Love, and hate; LOVE.") == 1.0
    assert mock_labelers.sentiment("", "the river went out of eden") == 0.0


def test_descriptiveness():
    # great, holy, white (lexicon), swiftly (-ly), wonderful (lexicon); 'only' and 'family' do not count
    assert mock_labelers.descriptiveness("", "a great holy white horse ran swiftly, wonderful") == 5.0
    assert mock_labelers.descriptiveness("", "only the family came") == 0.0
    assert mock_labelers.descriptiveness("", "the joyous and fearless") == 2.0


def test_choose_best():
    rng = random.Random(0)
    assert mock_labelers.choose_best([0.0, 3.0, 1.0, -1.0], 0.0, rng) == 1
    ties = Counter(mock_labelers.choose_best([1.0, 0.0, 1.0, 1.0], 0.0, rng) for _ in range(3000))
    assert set(ties) == {0, 2, 3} and min(ties.values()) > 850
    # Boltzmann noise: P ∝ exp(score / noise); with noise 1 and scores [0, ln 3]: 1/4 vs 3/4
    noisy = Counter(mock_labelers.choose_best([0.0, 1.0986123], 1.0, rng) for _ in range(4000))
    assert abs(noisy[1] / 4000 - 0.75) < 0.03
    with pytest.raises(UserError, match="unknown mock labeler 'happy'"):
        mock_labelers.get("happy")


def test_parse_mock_source():
    assert mock_labelers.parse_source("mock:sentiment") == ("sentiment", 0.0)
    assert mock_labelers.parse_source("mock:descriptiveness:0.5") == ("descriptiveness", 0.5)
    with pytest.raises(UserError, match="must be a number"):
        mock_labelers.parse_source("mock:sentiment:lots")
    with pytest.raises(UserError, match="unknown mock labeler"):
        mock_labelers.parse_source("mock:happy")


@pytest.fixture()
def count_a(monkeypatch):
    """A labeler for the test model's letters: more 'a's is better."""
    monkeypatch.setitem(mock_labelers.LABELERS, "count_a", lambda query, response: float(response.count("a")))


def test_generated_labels_follow_the_released_schema(count_a, tmp_path):
    model, _ = trained_models.load_initial("test")
    task = lm_tasks.TaskHParams(query_length=3, query_dataset="test", response_length=4, start_text=None,
                                truncate_token=26, truncate_after=2)
    task.policy.initial_model = "test"
    policy = Policy(model.eval(), encodings.get("test"), task)
    records = collect.collect(policy, task, collect.MockLabeler("count_a", seed=3), 40, seed=3)
    label_files.write(records, tmp_path / "labels.json")
    loaded = json.loads((tmp_path / "labels.json").read_text())
    assert loaded == records and len(loaded) == 40
    for record in loaded:
        assert set(record) == {"query", "sample0", "sample1", "sample2", "sample3", "best"}
        assert len(record["query"]) == 3 and all(len(record[f"sample{i}"]) == 4 for i in range(4))
        counts = [record[f"sample{i}"].count(0) for i in range(4)]
        assert counts[record["best"]] > sorted(counts)[-2]  # a clear best: ties at the top are skipped
        for i in range(4):  # truncated after a '.' at index >= 2, as the released samples
            sample = record[f"sample{i}"]
            dots = [j for j, t in enumerate(sample) if t == 26 and j >= 2]
            if dots:
                assert all(t == 27 for t in sample[dots[0] + 1:])
    read = label_files.load(str(tmp_path / "labels.json"), label_types.get("best_of_4"), 3, 4, label_files.Vocabulary(27, 27))
    assert len(read) == 40


def test_label_command(count_a, tmp_path, capsys):
    out = tmp_path / "labels.json"
    assert cli.main("label", ["test", "--out", str(out), "--n", "12", "--labeler", "count_a", "--noise", "0.5",
                              "--task.response_length", "5"]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 12 and len(records[0]["sample3"]) == 5
    assert cli.main("label", ["test", "--out", str(out)]) == 1
    assert "has no mock labeler; choose one with --labeler" in capsys.readouterr().err
