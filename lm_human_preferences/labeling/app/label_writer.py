"""The label files, written from the labeling app's database in a thread of their own.

FILE and FILE.overlap.json are JSON lists in the released schema, in labelling order: FILE holds
the *first* label of each question (a question everybody skipped is not written), the overlap
file the second. FILE.questions.json holds the questions (`questions.py`). `LabelWriter` writes
them at most every `write_interval_s` seconds after a change (longer when writing takes more than
a tenth of that time), and at `close` (fsynced); a reader never sees half a file. The answers are
safe in the database meanwhile: a file that cannot be written (a full disk) is tried again.
"""

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lm_human_preferences.labeling import collect, label_types
from lm_human_preferences.labeling.app import questions
from lm_human_preferences.labeling.app.store import Store
from lm_human_preferences.utils import storage
from lm_human_preferences.utils.errors import UserError

RATINGS = range(1, 8)  # scalar_rating: 1 (worst) … 7 (best)
WRITE_INTERVAL_S = 2.0
WRITE_DUTY = 0.1  # the label files take at most this share of the time: a file that takes 1 s waits 10 s
WHEN_FULL = "free space (the answers are in the database)"


def valid_labels(label_type: label_types.LabelType) -> range:
    if isinstance(label_type, label_types.ScalarRating):
        return RATINGS
    return range(questions.count_responses(label_type))


def record(label_type: label_types.LabelType, question: collect.Question, label: int) -> dict:
    """The label record in the released schema of `label_type`."""
    if isinstance(label_type, label_types.ScalarRating):
        return {"query": question.query, "sample": question.responses[0], "score": float(label)}
    return collect.record(question, label)


def record_prefix(label_type: label_types.LabelType, question: collect.Question) -> str:
    """`record`'s JSON up to its label (the label is its last key): prefix + label_json + "}" is the record."""
    rec = record(label_type, question, valid_labels(label_type)[0])
    del rec[label_type.label_key]
    return json.dumps(rec, separators=(",", ":"))[:-1] + f',"{label_type.label_key}":'


def label_json(label_type: label_types.LabelType, label: int) -> str:
    return json.dumps(float(label) if isinstance(label_type, label_types.ScalarRating) else label)


@dataclass
class Snapshot:
    """What the files are to hold: (question, (event seq, label)) of the first and second labels."""

    first: list[tuple[int, tuple[int, int]]]
    second: list[tuple[int, tuple[int, int]]]
    stamp: str  # what the files hold once written, kept in the database's meta ("written")


class LabelWriter:
    """Writes the label files from the database `store`, with the labels `snapshot()` gives, after
    each `stale()`. `snapshot` is called holding none of the writer's locks (it takes the queue's).
    `stale` (when opened): the files on disk are not those of the database as it is."""

    def __init__(self, out: Path, paths: dict[str, Path], label_type: label_types.LabelType, with_overlap: bool,
                 write_interval_s: float, store: Store, snapshot: Callable[[], Snapshot], stale: bool):
        self.out, self.paths, self.label_type, self.write_interval_s = out, paths, label_type, write_interval_s
        self.with_overlap = with_overlap or paths["overlap.json"].exists()
        self.store, self.snapshot = store, snapshot
        self._changes = threading.Condition()  # guards the versions and `_closing`
        self._wanted = (int(stale), int(stale))  # versions of (the label files, the questions) there are
        self._written = (0, 0)  # the versions on disk
        self._next_write_at = 0.0
        self._error = ""
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="label-files", daemon=True)
        self._thread.start()

    def stale(self, questions: bool = False) -> None:
        """The answers changed (and `questions`: questions were added): the files are to be written again."""
        with self._changes:
            self._wanted = (self._wanted[0] + 1, self._wanted[1] + questions)
            self._changes.notify_all()

    def _loop(self) -> None:
        reader = self.store.reader()
        try:
            while True:
                with self._changes:
                    self._changes.wait_for(lambda: self._closing or self._written[0] != self._wanted[0])
                    if self._closing:
                        return
                    delay = self._next_write_at - time.monotonic()
                if delay > 0:
                    time.sleep(min(delay, 0.2))  # short naps: `close` does not wait for a long one
                    continue
                try:
                    self._write(reader)
                    self._error = ""
                except UserError as e:  # e.g. a full disk: the answers are safe in the database
                    if str(e) != self._error:
                        print(f"labeling app: {e}; the answers are kept in {self.store.path}", file=sys.stderr,
                              flush=True)
                    self._error = str(e)
                    self._next_write_at = time.monotonic() + self.write_interval_s
        finally:
            reader.close()

    def _write(self, store: Store, durable: bool = False) -> None:
        """Write FILE, FILE.overlap.json and (when questions were added) FILE.questions.json as the
        database is now; `durable`: fsynced. Every answer confirmed before the call is in them."""
        with self._changes:
            versions = self._wanted
        snapshot = self.snapshot()  # after the versions: a change between them is written again
        started = time.monotonic()
        self._write_records(store, self.out, snapshot.first, durable)
        if self.with_overlap:
            self._write_records(store, self.paths["overlap.json"], snapshot.second, durable)
        if versions[1] != self._written[1] or not self.paths["questions.json"].exists():
            head = json.dumps(self.label_type.name)
            parts = [f'{{"label_type": {head}, "questions": [', ", ".join(store.items_json()), "]}"]
            storage.atomic_write_parts(self.paths["questions.json"], (p.encode() for p in parts), durable, WHEN_FULL)
        took = time.monotonic() - started
        with self._changes:
            self._written = versions
            self._next_write_at = time.monotonic() + max(self.write_interval_s, took / WRITE_DUTY)
        if durable:
            store.set_meta(written=snapshot.stamp)

    def _write_records(self, store: Store, path: Path, labels: list[tuple[int, tuple[int, int]]],
                       durable: bool) -> None:
        labels.sort(key=lambda entry: entry[1][0])  # labelling order

        def parts() -> Iterator[bytes]:
            yield b"["
            for start in range(0, len(labels), 500):
                chunk = labels[start:start + 500]
                prefixes = store.records([qid for qid, _ in chunk])
                text = ",".join(prefixes[qid] + label_json(self.label_type, label) + "}" for qid, (_, label) in chunk)
                yield (("," if start else "") + text).encode()
            yield b"]"

        storage.atomic_write_parts(path, parts(), durable, WHEN_FULL)

    def close(self) -> None:
        """Stop the thread and leave the files on disk for good, as the database is now."""
        with self._changes:
            self._closing = True
            self._changes.notify_all()
        self._thread.join()
        reader = self.store.reader()  # the main connection may still serve a question to a request
        try:
            files = [self.out, self.paths["questions.json"]] + [self.paths["overlap.json"]] * self.with_overlap
            if self._written == self._wanted and all(f.exists() for f in files):
                for f in files:  # the thread wrote what there is: on disk for good is enough
                    _fsync(f)
                reader.set_meta(written=self.snapshot().stamp)
            else:
                self._write(reader, durable=True)
        finally:
            reader.close()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
