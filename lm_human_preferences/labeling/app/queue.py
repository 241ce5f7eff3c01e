"""Questions waiting for people, handed out one at a time, with every answer on disk at once.

A `LabelQueue` belongs to one label file FILE and keeps these files beside it:
    FILE.sqlite          the durable record (store.py): the questions and every answer, skip and
                         undo, each committed (fsynced) before it is confirmed; the answers that
                         arrive while one commit is being fsynced share the next one
    FILE.questions.json  the questions (`questions.py`); a question's id is its index
    FILE.overlap.json    second labels of questions that two people answered (with overlap > 0)
FILE and FILE.overlap.json are JSON lists in the released schema, in labelling order: FILE holds
the *first* label of each question (a question everybody skipped is not written), the overlap
file the second. They and the questions file are written from the database by a background
thread, at most every `write_interval_s` seconds (longer when writing takes more than a tenth
of that time), and at `close`; a reader never sees half a file. A restart replays the database,
so nothing confirmed is lost and no answered question is shown again; FILE.journal.jsonl, the
journal of an earlier version of the app, is migrated into the database once.

Each labeler (a browser session) gets its own questions. With `overlap` F a share F of the
questions, drawn from the seed, goes to two different labelers. Agreement is measured on the
questions labelled (not skipped) by two: the raw rate of equal labels (for ratings also: within
one point), the rate chance would give with the observed label distributions (the first and
the second labels' shares of each label, as Cohen's kappa takes them), the kappa, and each
labeler's count and agreement. A question handed to someone who does not answer within
`lease_s` seconds may be handed to someone else.

Every request costs the same however many answers the queue holds: counters, agreement counts
and where each labeler's next question may be are kept as answers come.

`people.PeopleLabeler` puts this queue behind collect's `Labeler` protocol.
"""

import contextlib
import errno
import functools
import json
import os
import random
import sqlite3
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lm_human_preferences.labeling import collect, label_types
from lm_human_preferences.labeling.app import journal, questions
from lm_human_preferences.labeling.app.store import Store
from lm_human_preferences.utils.errors import UserError

RATINGS = range(1, 8)  # scalar_rating: 1 (worst) … 7 (best)
LEASE_S = 600.0
WRITE_INTERVAL_S = 2.0
WRITE_DUTY = 0.1  # the label files take at most this share of the time: a file that takes 1 s waits 10 s
SYNC_BYTES = 4 << 20  # a label file being written goes to disk in steps of this many bytes (see _atomic_write)
ITEM_CACHE = 512  # questions kept decoded (each labeler's current one, and then some)


class BadAnswer(ValueError):
    """An answer that can never be valid (unknown question, label out of range)."""


class Conflict(Exception):
    """An answer that is no longer wanted: the question is not this labeler's, or is already answered."""


class Closed(Exception):
    """The queue was closed: the app is stopping."""


@dataclass
class Answer:
    seq: int  # the event's number in the database
    id: int
    session: str
    label: int | None  # None: skipped


@dataclass
class LabelerStats:
    number: int  # 1, 2, … in the order labelers first answered: sessions are secrets, never shown
    labelled: int = 0
    skipped: int = 0
    doubly: int = 0  # their labels on questions labelled by two
    agreed: int = 0
    within_one: int = 0


def side_paths(out: Path) -> dict[str, Path]:
    out = Path(out)
    names = ("questions.json", "journal.jsonl", "overlap.json", "sqlite")
    return {name: out.with_name(f"{out.name}.{name}") for name in names}


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


@functools.cache
def _draw(seed: int, qid: int) -> float:
    return random.Random(f"{seed}:{qid}").random()


class Items(Sequence):
    """The queue's questions, read from its database as they are asked for (a list of them would
    hold every token as a Python int: gigabytes at the paper's scale)."""

    def __init__(self, queue: "LabelQueue"):
        self._queue = queue

    def __len__(self) -> int:
        return self._queue._n

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
                 lease_s: float = LEASE_S, write_interval_s: float = WRITE_INTERVAL_S):
        if not 0.0 <= overlap <= 1.0:
            raise UserError(f"overlap must be a share between 0 and 1, got {overlap}")
        self.out = Path(out)
        self.paths = side_paths(self.out)
        legacy = self.paths["journal.jsonl"]
        if self.out.exists() and not self.paths["sqlite"].exists() and not legacy.exists():
            raise UserError(f"{self.out} exists but {self.paths['sqlite']} does not: the labels were not made "
                            "by the labeling app; choose another --out")
        # A new label file's files and folders go again if the command fails before it serves (`discard`).
        self.new = not any(path.exists() for path in self._files())
        self._made_folders = [folder for folder in self.out.parents if not folder.exists()]  # deepest first
        self.label_type = label_type
        self.labels = valid_labels(label_type)
        self.overlap, self.seed, self.lease_s, self.write_interval_s = overlap, seed, lease_s, write_interval_s
        self.changed = threading.Condition()  # guards everything below; notified on every change
        self.version = 0
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.paths["sqlite"], label_type.name)
        self._reader: Store | None = None  # for reading questions after `close`
        self._cache: OrderedDict[int, questions.Item] = OrderedDict()
        self.items = Items(self)
        with self.store.transaction():  # a migration that does not replay is rolled back
            if legacy.exists() and self.store.meta("migrated") is None:
                self._migrate(legacy)
            self._load()
        if legacy.exists():
            legacy.replace(legacy.with_name(legacy.name + ".migrated"))
        # the files' state: bumped on every change; the writer catches up
        self._file_version = 1 if self.store.meta("written") != self._stamp() or not self.out.exists() else 0
        self._questions_version = self._file_version
        self._written = (0, 0)  # (file version, questions version) on disk
        self._next_write_at = 0.0
        self._write_lock = threading.Lock()
        self._write_error = ""
        self._closing = self._closed = False
        self._written_db = self._durable = 0  # writes into the open transaction; of them, committed
        self._failed: list[tuple[int, int, str]] = []  # (after, up to, why) of writes whose commit failed
        self._committer = threading.Thread(target=self._commit_loop, name="label-commits", daemon=True)
        self._committer.start()
        self._writer = threading.Thread(target=self._write_loop, name="label-files", daemon=True)
        self._writer.start()

    def _load(self) -> None:
        """The state as the database holds it (what was handed to the trainer stays so)."""
        delivered = getattr(self, "delivered", set())
        self._init_state()
        self.delivered = delivered
        self._n = self.store.count_questions()
        self._overlapped = sum(self.overlapped(i) for i in range(self._n))
        self._replay()
        self._advance_low()  # now, not in the first request (a scan of every question)

    def _advance_low(self) -> None:
        while self._low < self._n and self._complete(self._low):
            self._low += 1

    def _init_state(self) -> None:
        self.answers: dict[int, list[Answer]] = {}  # live answers of each question, oldest first
        self.history: dict[str, list[Answer]] = {}  # live answers of each labeler, oldest first
        self.current: dict[str, int] = {}  # the question each labeler was last shown
        self.holders: dict[int, dict[str, float]] = {}  # who was shown a question, and when
        self.delivered: set[int] = set()
        self.labelers: dict[str, LabelerStats] = {}
        self._next_seq = 0
        self._labelled = self._skipped = self._complete_n = 0
        self._first: dict[int, tuple[int, int]] = {}  # question → (seq, label) of its first label
        self._second: dict[int, tuple[int, int]] = {}
        self._pairs: Counter[tuple[int, int]] = Counter()  # (first, second) labels of doubly-labelled questions
        self._low = 0  # every question below is complete
        self._start: dict[str, int] = {}  # every question below is complete or answered by that labeler

    # -- opening: migration and replay

    def _migrate(self, legacy: Path) -> None:
        """Copy an earlier version's journal (and its questions file) into the database (within the
        caller's transaction: the replay that follows checks it)."""
        if self.store.count_questions() or self.store.db.execute("SELECT count(*) FROM events").fetchone()[0]:
            raise UserError(f"{self.paths['sqlite']} and {legacy} both hold answers; keep one of them")
        items: list[questions.Item] = []
        if self.paths["questions.json"].exists():
            type_name, items = questions.load(self.paths["questions.json"])
            if type_name != self.label_type.name:
                raise UserError(f"{self.paths['questions.json']} holds {type_name} questions, not "
                                f"{self.label_type.name}")
        records = [record_prefix(self.label_type, it.question) for it in items]
        self.store.migrate(items, records, journal.read(legacy), legacy.name)

    def _replay(self) -> None:
        for seq, kind, qid, session, label, undo in self.store.events():
            try:
                if seq != self._next_seq:
                    raise BadAnswer(f"event {self._next_seq} is missing")
                if kind == "answer":
                    if label is not None:
                        self._check_label(label)
                    self._check_id(qid)
                    self._apply(Answer(seq, qid, session, label))
                elif kind == "undo":
                    self._take_back(session, undo)
                else:
                    raise BadAnswer(f"unknown event {kind!r}")
            except (BadAnswer, Conflict) as e:
                raise UserError(f"{self.paths['sqlite']}: event {seq} cannot be replayed ({e}); the database was "
                                "edited or belongs to other questions") from None
            self._next_seq += 1

    # -- the state, kept as answers come

    def _account(self, qid: int, sign: int) -> None:
        """Add (+1) or take away (-1) question `qid`'s share of the counters, as its answers are now."""
        answers = self.answers.get(qid, [])
        labels = [a for a in answers if a.label is not None]
        complete = len(answers) >= self._needed(qid)
        self._labelled += sign * bool(labels)
        self._complete_n += sign * complete
        self._skipped += sign * (complete and not labels)
        for position, table in enumerate((self._first, self._second)):
            if sign < 0:
                table.pop(qid, None)
            elif len(labels) > position:
                table[qid] = (labels[position].seq, labels[position].label)
        if len(labels) > 1:
            a, b = labels[0], labels[1]
            self._pairs[(a.label, b.label)] += sign
            for mine, other in ((a, b), (b, a)):
                stats = self._labeler(mine.session)
                stats.doubly += sign
                stats.agreed += sign * (mine.label == other.label)
                stats.within_one += sign * (abs(mine.label - other.label) <= 1)

    def _labeler(self, session: str) -> LabelerStats:
        if session not in self.labelers:
            self.labelers[session] = LabelerStats(len(self.labelers) + 1)
        return self.labelers[session]

    def _apply(self, answer: Answer) -> None:
        self._account(answer.id, -1)
        self.answers.setdefault(answer.id, []).append(answer)
        self._account(answer.id, +1)
        self.history.setdefault(answer.session, []).append(answer)
        stats = self._labeler(answer.session)
        stats.labelled += answer.label is not None
        stats.skipped += answer.label is None
        self.holders.get(answer.id, {}).pop(answer.session, None)
        if self.current.get(answer.session) == answer.id:
            del self.current[answer.session]

    def _take_back(self, session: str, seq: int) -> None:
        """Remove `session`'s last answer (number `seq`) and show it that question again."""
        mine = self.history.get(session, [])
        if not mine or mine[-1].seq != seq:
            raise Conflict(f"answer {seq} is not the last answer of this labeler")
        answer = mine.pop()
        self._account(answer.id, -1)
        self.answers[answer.id].remove(answer)
        self._account(answer.id, +1)
        stats = self.labelers[session]
        stats.labelled -= answer.label is not None
        stats.skipped -= answer.label is None
        self._low = min(self._low, answer.id)
        for other, start in self._start.items():
            if start > answer.id:
                self._start[other] = answer.id
        self._show(session, answer.id, time.monotonic())

    def _show(self, session: str, qid: int, now: float) -> None:
        """Make `qid` the question `session` is shown (releasing the one it was shown before)."""
        previous = self.current.get(session)
        if previous is not None and previous != qid:
            self.holders.get(previous, {}).pop(session, None)
        self.current[session] = qid
        self.holders.setdefault(qid, {})[session] = now

    def _stamp(self) -> str:
        """What the label files hold once written: every event and question so far."""
        return f"{self._next_seq} events, {self._n} questions"

    # -- checks

    def _check_id(self, qid) -> None:
        if isinstance(qid, bool) or not isinstance(qid, int) or not 0 <= qid < self._n:
            raise BadAnswer(f"no question {qid!r} (ids are 0..{self._n - 1})")

    def _check_label(self, label) -> None:
        if isinstance(label, bool) or not isinstance(label, int) or label not in self.labels:
            raise BadAnswer(f"label {label!r} is not one of {self.labels.start}..{self.labels.stop - 1}")

    def _check_open(self) -> None:
        if self._closing:
            raise Closed("the labeling app is stopping; answers are no longer taken")

    # -- who gets which question

    def overlapped(self, qid: int) -> bool:
        """Whether question `qid` goes to two labelers: drawn from (seed, id), so stable across restarts."""
        return _draw(self.seed, qid) < self.overlap

    def _needed(self, qid: int) -> int:
        return 2 if self.overlapped(qid) else 1

    def _complete(self, qid: int) -> bool:
        return len(self.answers.get(qid, [])) >= self._needed(qid)

    def _answered_by(self, qid: int, session: str) -> bool:
        return any(a.session == session for a in self.answers.get(qid, []))

    def _open_to(self, qid: int, session: str, now: float) -> bool:
        if self._complete(qid) or self._answered_by(qid, session):
            return False
        holders = self.holders.get(qid, {})
        if session in holders:
            return True
        fresh = sum(now - t < self.lease_s for t in holders.values())
        return len(self.answers.get(qid, [])) + fresh < self._needed(qid)

    def _first_open(self, session: str, now: float) -> int | None:
        """The first question open to `session`, scanning from where no earlier one can be."""
        self._advance_low()
        start = max(self._start.get(session, self._low), self._low)
        while start < self._n and (self._complete(start) or self._answered_by(start, session)):
            start += 1
        self._start[session] = start
        return next((i for i in range(start, self._n) if self._open_to(i, session, now)), None)

    def next_question(self, session: str) -> int | None:
        """The question to show `session`: the one it was shown if still open, else the first open one."""
        with self.changed:
            now = time.monotonic()
            qid = self.current.get(session)
            if qid is None or not self._open_to(qid, session, now):
                qid = self._first_open(session, now)
            if qid is None:
                previous = self.current.pop(session, None)
                self.holders.get(previous, {}).pop(session, None)
                return None
            self._show(session, qid, now)
            return qid

    def _item(self, qid: int) -> questions.Item:
        with self.changed:
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

    # -- answers

    def add(self, items: list[questions.Item]) -> list[int]:
        """Queue more questions (in the database before this returns); their ids."""
        with self.changed:
            self._check_open()
            ids = list(range(self._n, self._n + len(items)))
            records = [record_prefix(self.label_type, it.question) for it in items]
            ticket = self._write_db(lambda: self.store.add_questions(self._n, items, records))
            self._n += len(items)
            self._overlapped += sum(self.overlapped(i) for i in ids)
            self._questions_version += 1
            self._changed()
            self._wait_durable(ticket)
            return ids

    def label(self, session: str, qid, label) -> None:
        """Record `session`'s label for question `qid`."""
        self._check_label(label)
        self._answer(session, qid, label)

    def skip(self, session: str, qid) -> None:
        """Record that `session` skipped question `qid` (it has no clear preference)."""
        self._answer(session, qid, None)

    def _answer(self, session: str, qid, label: int | None) -> None:
        with self.changed:
            self._check_open()
            self._check_id(qid)
            shown = self.current.get(session)
            # a page shown before a restart may answer its question if it is still open
            if shown != qid and not (shown is None and self._open_to(qid, session, time.monotonic())):
                raise Conflict(f"question {qid} is not the one this labeler was shown; reload the page")
            if self._complete(qid):
                raise Conflict(f"question {qid} was answered by someone else meanwhile")
            seq = self._next_seq
            ticket = self._write_db(lambda: self.store.append(seq, "answer", session, question=qid, label=label))
            self._next_seq += 1
            self._apply(Answer(seq, qid, session, label))
            self._changed()
            self._wait_durable(ticket)

    def undo(self, session: str) -> int:
        """Take back `session`'s last answer (label or skip) and show it that question again; its id."""
        with self.changed:
            self._check_open()
            mine = self.history.get(session, [])
            if not mine:
                raise Conflict("nothing to undo")
            last = mine[-1]
            if last.id in self.delivered:
                raise Conflict(f"question {last.id} was already handed to the trainer")
            seq = self._next_seq
            ticket = self._write_db(lambda: self.store.append(seq, "undo", session, undo=last.seq))
            self._next_seq += 1
            self._take_back(session, last.seq)
            self._changed()
            self._wait_durable(ticket)
            return last.id

    # -- commits: the answers that come while one commit is fsynced go together in the next

    def _write_db(self, write: Callable[[], None]) -> int:
        """`write` into the open transaction (under the lock); the ticket to wait for."""
        try:
            self.store.begin()
            write()
        except sqlite3.Error as e:
            raise self._db_error(str(e)) from None
        self._written_db += 1
        return self._written_db

    def _db_error(self, why: str) -> UserError:
        advice = "free space and answer again" if "full" in why else "the database is damaged"
        return UserError(f"cannot record this in {self.paths['sqlite']} ({why}); {advice}")

    def _wait_durable(self, ticket: int) -> None:
        """Return once write `ticket` is committed (with the lock held: others go on meanwhile)."""
        self.changed.wait_for(lambda: self._durable >= ticket)
        for after, upto, why in self._failed:
            if after < ticket <= upto:
                raise self._db_error(why)

    def _commit_loop(self) -> None:
        with self.changed:
            while True:
                self.changed.wait_for(lambda: self._written_db > self._durable or self._closing)
                if self._written_db == self._durable:
                    return
                upto = self._written_db
                try:
                    self.store.commit()
                except sqlite3.Error as e:  # none of these writes is confirmed, and the state forgets them
                    self.store.rollback()
                    self._failed.append((self._durable, upto, str(e)))
                    self._load()
                self._durable = upto
                self._changed()

    def can_undo(self, session: str) -> bool:
        with self.changed:
            mine = self.history.get(session, [])
            return bool(mine) and mine[-1].id not in self.delivered

    # -- results

    def progress(self, session: str | None = None) -> dict:
        with self.changed:
            out = dict(questions=self._n, labelled=self._labelled, skipped=self._skipped, complete=self._complete_n,
                       overlapped=self._overlapped)
            if session is not None:
                stats = self.labelers.get(session)
                out["yours"] = stats.labelled if stats else 0
                out["labeler"] = stats.number if stats else None
            return out

    def agreement(self) -> dict:
        """Agreement of the two labels on questions labelled twice (see the module doc)."""
        with self.changed:
            pairs = +self._pairs
            labelers = sorted(self.labelers.values(), key=lambda s: s.number)
            rows = [dict(labeler=s.number, labelled=s.labelled, skipped=s.skipped, doubly_labelled=s.doubly,
                         agreed=s.agreed, rate=s.agreed / s.doubly if s.doubly else None) for s in labelers]
        rating = isinstance(self.label_type, label_types.ScalarRating)
        out = dict(doubly_labelled=sum(pairs.values()), rule="same score" if rating else "same best response")
        out.update(chance_agreement(pairs, lambda a, b: a == b))
        if rating:
            within = chance_agreement(pairs, lambda a, b: abs(a - b) <= 1)
            out.update(within_one_rate=within["rate"], within_one_chance=within["chance"],
                       within_one_kappa=within["kappa"])
            for row, s in zip(rows, labelers):
                row["within_one_rate"] = s.within_one / s.doubly if s.doubly else None
        out["labelers"] = rows
        return out

    # -- waiting

    def _changed(self) -> None:
        self.version += 1
        self._file_version += 1
        self.changed.notify_all()

    def wait_for_change(self, version: int, timeout: float) -> int:
        """The version after waiting up to `timeout` s for one newer than `version`."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != version, timeout)
            return self.version

    def complete_count(self, ids: list[int]) -> int:
        with self.changed:
            return sum(self._complete(i) for i in ids)

    def deliver(self, ids: list[int]) -> list[int | None]:
        """The first label of each question (None where all skipped); they can no longer be undone."""
        with self.changed:
            self.delivered.update(ids)
            return [self._first[i][1] if i in self._first else None for i in ids]

    # -- the files

    def _write_loop(self) -> None:
        reader = self.store.reader()
        try:
            while True:
                with self.changed:
                    self.changed.wait_for(lambda: self._closing or self._written[0] != self._file_version)
                    if self._closing:
                        return
                    delay = self._next_write_at - time.monotonic()
                if delay > 0:
                    time.sleep(min(delay, 0.2))  # short naps: `close` does not wait for a long one
                    continue
                try:
                    self._write_files(reader)
                    self._write_error = ""
                except UserError as e:  # e.g. a full disk: the answers are safe in the database
                    if str(e) != self._write_error:
                        print(f"labeling app: {e}; the answers are kept in {self.paths['sqlite']}", file=sys.stderr,
                              flush=True)
                    self._write_error = str(e)
                    self._next_write_at = time.monotonic() + self.write_interval_s
        finally:
            reader.close()

    def flush(self) -> None:
        """Write the files now, instead of within the next few seconds."""
        reader = self.store.reader()
        try:
            self._write_files(reader)
        finally:
            reader.close()

    def _write_files(self, store: Store, durable: bool = False) -> None:
        """Write FILE, FILE.overlap.json and (when questions were added) FILE.questions.json as the
        database is now; `durable`: fsynced. Every answer confirmed before the call is in them."""
        with self._write_lock:
            with self.changed:
                versions = (self._file_version, self._questions_version)
                first, second = list(self._first.items()), list(self._second.items())
                with_overlap = self.overlap > 0 or self.paths["overlap.json"].exists()
                stamp = self._stamp()
            started = time.monotonic()
            self._write_records(store, self.out, first, durable)
            if with_overlap:
                self._write_records(store, self.paths["overlap.json"], second, durable)
            if versions[1] != self._written[1] or not self.paths["questions.json"].exists():
                head = json.dumps(self.label_type.name)
                _atomic_write(self.paths["questions.json"],
                              [f'{{"label_type": {head}, "questions": [', ", ".join(store.items_json()), "]}"],
                              durable)
            took = time.monotonic() - started
            with self.changed:
                self._written = versions
                self._next_write_at = time.monotonic() + max(self.write_interval_s, took / WRITE_DUTY)
            if durable:
                store.set_meta(written=stamp)

    def _write_records(self, store: Store, path: Path, labels: list[tuple[int, tuple[int, int]]],
                       durable: bool) -> None:
        labels.sort(key=lambda entry: entry[1][0])  # labelling order

        def parts():
            yield "["
            for start in range(0, len(labels), 500):
                chunk = labels[start:start + 500]
                prefixes = store.records([qid for qid, _ in chunk])
                text = ",".join(prefixes[qid] + label_json(self.label_type, label) + "}" for qid, (_, label) in chunk)
                yield ("," if start else "") + text
            yield "]"

        _atomic_write(path, parts(), durable)

    def close(self) -> None:
        """Stop taking answers, write the files (fsynced) and close the database."""
        with self.changed:
            if self._closing:
                return
            self._closing = True
            self.changed.notify_all()
        self._committer.join()
        self._writer.join()
        reader = self.store.reader()  # the main connection may still serve a question to a request
        try:
            files = [self.out, self.paths["questions.json"]] + [self.paths["overlap.json"]] * (self.overlap > 0)
            if self._written == (self._file_version, self._questions_version) and all(f.exists() for f in files):
                for f in files:  # the background writer wrote what there is: on disk for good is enough
                    _fsync(f)
                reader.set_meta(written=self._stamp())
            else:
                self._write_files(reader, durable=True)
        finally:
            reader.close()
            with self.changed:
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


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write(path: Path, parts, durable: bool) -> None:
    """Write the strings `parts` to `path` so that readers see either the old file or the whole new one.

    The data goes to disk every SYNC_BYTES as it is written: a file system that orders data before
    metadata (ext4) would otherwise make the database's next fsync wait for the whole file (seconds
    for the 240 MB of 50,000 summarization labels) and stall every answer meanwhile."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8") as out:
            unsynced = 0
            for part in parts:
                out.write(part)
                unsynced += len(part)
                if unsynced >= SYNC_BYTES:
                    out.flush()
                    os.fdatasync(out.fileno())
                    unsynced = 0
            out.flush()
            (os.fsync if durable else os.fdatasync)(out.fileno())
        os.replace(partial, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"disk full while writing {path}; free space (the answers are in the database)") from None
        raise UserError(f"cannot write {path} ({e.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)


def chance_agreement(pairs: Counter, agree: Callable[[int, int], bool]) -> dict:
    """For label pairs (first, second) with counts: the rate at which they `agree`, the rate chance
    would give with the first and the second labels' observed distributions, and Cohen's kappa."""
    n = sum(pairs.values())
    if not n:
        return dict(agreed=0, rate=None, chance=None, kappa=None)
    agreed = sum(count for (a, b), count in pairs.items() if agree(a, b))
    firsts, seconds = Counter(), Counter()
    for (a, b), count in pairs.items():
        firsts[a] += count
        seconds[b] += count
    chance = sum(fa * fb for a, fa in firsts.items() for b, fb in seconds.items() if agree(a, b)) / (n * n)
    rate = agreed / n
    return dict(agreed=agreed, rate=rate, chance=chance, kappa=(rate - chance) / (1 - chance) if chance < 1 else None)
