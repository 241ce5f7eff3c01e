"""Label files: reading them into numpy arrays (validating every record) and writing them.

A label file is a JSON list of records. The released tldr files are 200-300 MB, so records
are decoded one at a time and turned into compact int32 arrays at once, instead of holding
the whole file as Python objects.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm_human_preferences.labeling.label_types import LabelType
from lm_human_preferences.utils import logging, storage
from lm_human_preferences.utils.jsonstream import json_list_items
from lm_human_preferences.utils.errors import UserError

TEST_SOURCE = "test"
TEST_RECORDS = 50


@dataclass
class Labels:
    """Columns of a label file: 'query', the response keys ([n, length] int32) and the label ([n])."""

    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["query"])

    def __getitem__(self, index) -> "Labels":
        return Labels({k: v[index] for k, v in self.columns.items()})


@dataclass(frozen=True)
class Vocabulary:
    n_vocab: int
    padding_token: int


def _tokens(record: dict, key: str, length: int, vocab: Vocabulary, index: int, source: str) -> np.ndarray:
    value = record[key]
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise UserError(f"{source}: record {index}: {key!r} must be a list of integer token ids")
    if len(value) != length:
        raise UserError(f"{source}: record {index}: {key!r} has {len(value)} tokens, the task expects {length}; "
                        "set task.query_length / task.response_length to match the file")
    try:
        tokens = np.asarray(value, dtype=np.int64)
        bad = tokens[(tokens < 0) | ((tokens >= vocab.n_vocab) & (tokens != vocab.padding_token))].tolist()
    except OverflowError:  # an id beyond int64 is outside every vocabulary
        bad = [t for t in value if not (0 <= t < vocab.n_vocab or t == vocab.padding_token)]
    if bad:
        raise UserError(f"{source}: record {index}: {key!r} holds token id {bad[0]}, outside the vocabulary "
                        f"(0..{vocab.n_vocab - 1}) and not the padding token {vocab.padding_token}; "
                        "was the file made with another encoding?")
    return tokens.astype(np.int32)


def load(source: str, label_type: LabelType, query_length: int, response_length: int,
         vocab: Vocabulary) -> Labels:
    """Every record of a label file (path, https:// or gs:// URL), or the `test` source."""
    schemas = label_type.question_schemas(query_length, response_length)
    label_key = label_type.label_key
    if source == TEST_SOURCE:
        columns = {key: np.zeros((TEST_RECORDS, *s.shape), dtype=np.int32) for key, s in schemas.items()}
        columns[label_key] = np.zeros(TEST_RECORDS, dtype=label_type.label_dtype)
        return Labels(columns)

    path = storage.fetch(source)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: not a UTF-8 JSON file ({e})") from None
    rows: dict[str, list] = {key: [] for key in [*schemas, label_key]}
    for index, record in enumerate(json_list_items(text, source)):
        if not isinstance(record, dict):
            raise UserError(f"{source}: record {index} is a {type(record).__name__}, not an object")
        for key in rows:
            if key not in record:
                raise UserError(f"{source}: record {index} lacks {key!r} (a {label_type.name} label needs "
                                f"{', '.join(rows)}); is this a label file of another type?")
        for key, schema in schemas.items():
            rows[key].append(_tokens(record, key, schema.shape[0], vocab, index, source))
        problem = label_type.label_problem(record[label_key])
        if problem:
            raise UserError(f"{source}: record {index}: {label_key!r} is {record[label_key]!r}; it {problem}")
        rows[label_key].append(record[label_key])
    del text
    if not rows["query"]:
        raise UserError(f"{source}: the label file holds no records")
    columns = {key: np.stack(rows[key]) for key in schemas}
    columns[label_key] = np.asarray(rows[label_key], dtype=label_type.label_dtype)
    return Labels(columns)


def split(labels: Labels, num_train: int, source: str) -> tuple[Labels, Labels]:
    """(the first num_train records, the later records whose query is not among them)."""
    if len(labels) < num_train:
        raise UserError(f"{source} holds {len(labels)} labels but labels.num_train is {num_train}; "
                        f"lower labels.num_train to at most {len(labels)}")
    train = labels[:num_train]
    rest = labels[num_train:]
    seen = {q.tobytes() for q in train.columns["query"]}
    unseen = np.array([q.tobytes() not in seen for q in rest.columns["query"]], dtype=bool)
    if len(rest) and not unseen.any():
        logging.print_main(f"warning: {source}: all {len(rest)} labels after the first {num_train} (labels.num_train) "
                           "share a query with a training label, so nothing is held out and no held-out accuracy "
                           "is measured; lower labels.num_train or add labels of other queries")
    return train, rest[unseen]


def write(records: list[dict], path: Path) -> None:
    """Write records as one JSON list, atomically (a reader never sees half a file)."""
    storage.atomic_write_text(path, json.dumps(records, separators=(",", ":")))
