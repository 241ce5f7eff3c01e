"""Questions waiting for people, handed out one at a time, with every answer on disk at once.

A `LabelQueue` belongs to one label file FILE and keeps these files beside it:
    FILE.sqlite          the durable record (store.py): the questions and every answer, skip and
                         undo, each committed (fsynced) before it is confirmed; the answers that
                         arrive while one commit is being fsynced share the next one
    FILE.questions.json  the questions (`questions.py`); a question's id is its index
    FILE.overlap.json    second labels of questions that two people answered (with overlap > 0)
FILE holds the first label of each question, FILE.overlap.json the second, in the released
schema (label_writer.py writes them from the database within seconds, and at `close`). A
restart replays the database, so nothing confirmed is lost and no answered question is shown
again; FILE.journal.jsonl, the journal of an earlier version of the app, is migrated into the
database once (journal.py).

The queue puts together, under one lock:
    assignment.py    who answered what and who is shown which question (no threads, no I/O)
    agreement.py     agreement and kappa on the questions two people labelled
    store.py         the database, and the thread that commits its writes in groups
    label_writer.py  the thread that writes the label files
The lock guards the assignment and the database's connection together: the assignment takes an
event once it is in the open transaction, so every request sees it, and the request returns once
it is committed; a commit that fails rolls both back (the assignment is rebuilt from the database).

`people.PeopleLabeler` puts this queue behind collect's `Labeler` protocol.
"""

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from lm_human_preferences.labeling import label_types
from lm_human_preferences.labeling.app import journal, label_writer, questions
from lm_human_preferences.labeling.app.assignment import Answer, Assignment, BadAnswer, Conflict
from lm_human_preferences.labeling.app.store import GroupCommit, Store
from lm_human_preferences.utils.errors import UserError

LEASE_S = 600.0
ITEM_CACHE = 512  # questions kept decoded (each labeler's current one, and then some)


class Closed(Exception):
    """The queue was closed: the app is stopping."""


def side_paths(out: Path) -> dict[str, Path]:
    out = Path(out)
    names = ("questions.json", "journal.jsonl", "overlap.json", "sqlite")
    return {name: out.with_name(f"{out.name}.{name}") for name in names}


class Items(Sequence):
    """The queue's questions, read from its database as they are asked for (a list of them would
    hold every token as a Python int: gigabytes at the paper's scale)."""

    def __init__(self, queue: "LabelQueue"):
        self._queue = queue

    def __len__(self) -> int:
        return self._queue.assignment.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._queue._item(i) for i in range(*index.indices(len(self)))]
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise IndexError(f"no question {index!r}")
        return self._queue._item(index % n)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None


class LabelQueue:
    def __init__(self, out: Path, label_type: label_types.LabelType, overlap: float = 0.0, seed: int = 0,
                 lease_s: float = LEASE_S, write_interval_s: float = label_writer.WRITE_INTERVAL_S):
        if not 0.0 <= overlap <= 1.0:
            raise UserError(f"overlap must be a share between 0 and 1, got {overlap}")
        self.out = Path(out)
        self.paths = side_paths(self.out)
        if self.out.exists() and not self.paths["sqlite"].exists() and not self.paths["journal.jsonl"].exists():
            raise UserError(f"{self.out} exists but {self.paths['sqlite']} does not: the labels were not made "
                            "by the labeling app; choose another --out")
        # A new label file's files and folders go again if the command fails before it serves (`discard`).
        self.new = not any(path.exists() for path in self._files())
        self._made_folders = [folder for folder in self.out.parents if not folder.exists()]  # deepest first
        self.label_type, self.labels = label_type, label_writer.valid_labels(label_type)
        self.overlap, self.seed, self.lease_s = overlap, seed, lease_s
        self.items = Items(self)
        self.version = 0  # bumped on every change (`wait_for_change`)
        self.delivered: set[int] = set()  # questions whose labels the trainer took: no undo
        self._lock = threading.Condition()  # guards the assignment and the database's main connection
        self._closing = self._closed = False
        self._cache: OrderedDict[int, questions.Item] = OrderedDict()
        self._reader: Store | None = None  # for reading questions after `close`
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.paths["sqlite"], label_type.name)
        with self.store.transaction():  # a migration that does not replay is rolled back
            journal.migrate(self.store, self.paths, label_type)
            self._load()
        journal.retire(self.paths)
        stale = self.store.meta("written") != self._stamp() or not self.out.exists()
        self._writer = label_writer.LabelWriter(self.out, self.paths, label_type, overlap > 0, write_interval_s,
                                                self.store, self._snapshot, stale)
        self._commits = GroupCommit(self.store, self._lock, reload=self._load, committed=self._changed)

    def _load(self) -> None:
        """The assignment as the database holds it (what was handed to the trainer stays so)."""
        self.assignment = Assignment(self.labels, self.overlap, self.seed, self.lease_s)
        self.assignment.add_questions(self.store.count_questions())
        now = time.monotonic()
        for seq, kind, qid, session, label, undo in self.store.events():
            try:
                self.assignment.replay(seq, kind, qid, session, label, undo, now)
            except (BadAnswer, Conflict) as e:
                raise UserError(f"{self.paths['sqlite']}: event {seq} cannot be replayed ({e}); the database was "
                                "edited or belongs to other questions") from None
        self.assignment.advance_low()  # now, not in the first request (a scan of every question)

    def _stamp(self) -> str:
        """What the label files hold once written: every event and question so far."""
        return f"{self.assignment.next_seq} events, {self.assignment.n} questions"

    def _snapshot(self) -> label_writer.Snapshot:
        with self._lock:
            return label_writer.Snapshot(list(self.assignment.first.items()), list(self.assignment.second.items()),
                                         self._stamp())

    def _changed(self, questions: bool = False) -> None:
        self.version += 1
        self._lock.notify_all()
        self._writer.stale(questions)

    def _check_open(self) -> None:
        if self._closing:
            raise Closed("the labeling app is stopping; answers are no longer taken")

    # -- questions

    def overlapped(self, qid: int) -> bool:
        """Whether question `qid` goes to two labelers: drawn from (seed, id), so stable across restarts."""
        return self.assignment.overlapped(qid)

    def add(self, items: list[questions.Item]) -> list[int]:
        """Queue more questions (in the database before this returns); their ids."""
        with self._lock:
            self._check_open()
            first = self.assignment.n
            records = [label_writer.record_prefix(self.label_type, it.question) for it in items]
            ticket = self._commits.write(lambda: self.store.add_questions(first, items, records))
            ids = self.assignment.add_questions(len(items))
            self._changed(questions=True)
            self._commits.wait(ticket)
            return ids

    def _item(self, qid: int) -> questions.Item:
        with self._lock:
            if qid in self._cache:
                self._cache.move_to_end(qid)
                return self._cache[qid]
            if self._closed:  # read after close (a caller looking back at the questions)
                self._reader = self._reader or self.store.reader()
            item = (self._reader or self.store).question(qid)
            self._cache[qid] = item
            if len(self._cache) > ITEM_CACHE:
                self._cache.popitem(last=False)
            return item

    def next_question(self, session: str) -> int | None:
        """The question to show `session`: the one it was shown if still open, else the first open one."""
        with self._lock:
            return self.assignment.next_question(session, time.monotonic())

    # -- answers

    def label(self, session: str, qid, label) -> None:
        """Record `session`'s label for question `qid`."""
        self.assignment.check_label(label)
        self._answer(session, qid, label)

    def skip(self, session: str, qid) -> None:
        """Record that `session` skipped question `qid` (it has no clear preference)."""
        self._answer(session, qid, None)

    def _answer(self, session: str, qid, label: int | None) -> None:
        with self._lock:
            self._check_open()
            self.assignment.check_answer(session, qid, time.monotonic())
            seq = self.assignment.next_seq
            ticket = self._commits.write(lambda: self.store.append(seq, "answer", session, question=qid, label=label))
            self.assignment.answer(Answer(seq, qid, session, label))
            self._changed()
            self._commits.wait(ticket)

    def undo(self, session: str) -> int:
        """Take back `session`'s last answer (label or skip) and show it that question again; its id."""
        with self._lock:
            self._check_open()
            last = self.assignment.last_answer(session)
            if last is None:
                raise Conflict("nothing to undo")
            if last.id in self.delivered:
                raise Conflict(f"question {last.id} was already handed to the trainer")
            seq = self.assignment.next_seq
            ticket = self._commits.write(lambda: self.store.append(seq, "undo", session, undo=last.seq))
            self.assignment.undo(seq, session, last.seq, time.monotonic())
            self._changed()
            self._commits.wait(ticket)
            return last.id

    def can_undo(self, session: str) -> bool:
        with self._lock:
            last = self.assignment.last_answer(session)
            return last is not None and last.id not in self.delivered

    # -- results

    def progress(self, session: str | None = None) -> dict:
        with self._lock:
            return self.assignment.progress(session)

    def agreement(self) -> dict:
        """Agreement of the two labels on questions labelled twice (agreement.py)."""
        with self._lock:
            return self.assignment.agreement.summary(isinstance(self.label_type, label_types.ScalarRating))

    def wait_for_change(self, version: int, timeout: float) -> int:
        """The version after waiting up to `timeout` s for one newer than `version`."""
        with self._lock:
            self._lock.wait_for(lambda: self.version != version, timeout)
            return self.version

    def complete_count(self, ids: list[int]) -> int:
        with self._lock:
            return sum(self.assignment.complete(i) for i in ids)

    def deliver(self, ids: list[int]) -> list[int | None]:
        """The first label of each question (None where all skipped); they can no longer be undone."""
        with self._lock:
            self.delivered.update(ids)
            return [self.assignment.first_label(i) for i in ids]

    def close(self) -> None:
        """Stop taking answers, write the files (fsynced) and close the database."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._commits.close()
        self._writer.close()
        with self._lock:
            self._closed = True
            self.store.close()

    def _files(self) -> list[Path]:
        sqlite = self.paths["sqlite"]
        return [self.out, *self.paths.values(), sqlite.with_name(sqlite.name + "-wal"),
                sqlite.with_name(sqlite.name + "-shm")]

    def discard(self) -> None:
        """Close; for a new label file, also remove its files and the folders made for it. For a
        command that fails before it serves: nothing is left behind (a restart's files stay)."""
        try:
            self.close()
        finally:
            if self.new:
                for path in self._files():
                    path.unlink(missing_ok=True)
                for folder in self._made_folders:
                    with contextlib.suppress(OSError):  # not empty: something else was put there
                        folder.rmdir()
