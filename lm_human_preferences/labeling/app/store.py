"""The labeling app's durable record: one SQLite database (FILE.sqlite) of questions and events.

Tables:
    meta       key → value: the label type, what was migrated, what the label file last held
    questions  id → the question as the questions file holds it (JSON)
    records    id → its label record in the released schema up to the label (`record` + the
               label + "}" is the record), apart: writing the label file reads these only
    events     seq → an answer (kind "answer": question, session, label or NULL for a skip) or
               an undo (kind "undo": session, undo = the seq of the answer taken back)

The database is in WAL mode with `synchronous=FULL`: a commit is on disk (fsynced) when it
returns, at a cost that does not grow with the number of answers, and a killed process loses
nothing committed. Events are written into an open transaction (`begin`, `append`) that
`commit` ends: `GroupCommit` commits the answers that arrived during one fsync together in the
next, and confirms none before its commit returned. The label files are derived from it.
"""

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lm_human_preferences.labeling.app import questions
from lm_human_preferences.utils.errors import UserError

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS questions (id INTEGER PRIMARY KEY, item TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, question INTEGER,
                                   session TEXT NOT NULL, label INTEGER, undo INTEGER, time REAL NOT NULL);
"""


def item_json(item: questions.Item) -> str:
    q = item.question
    return json.dumps(dict(query=q.query, responses=q.responses, query_text=q.query_text,
                           response_texts=q.response_texts, ended=item.ended), ensure_ascii=False)


def item_from_json(text: str, qid: int, source: str) -> questions.Item:
    return questions.parse_item(json.loads(text), qid, source)


class Store:
    """One connection to FILE.sqlite. Not thread-safe: each thread opens its own (`reader`)."""

    def __init__(self, path: Path, label_type_name: str, create: bool = True):
        self.path, self.label_type_name = Path(path), label_type_name
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            if create:
                self.db.executescript(_SCHEMA)
            stored = self.meta("label_type")
            if stored is None and create:
                self.set_meta(label_type=label_type_name, schema=SCHEMA_VERSION)
            elif stored != label_type_name:
                raise UserError(f"{self.path} holds {stored} labels, not {label_type_name}; choose another --out")
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: not a labeling app database ({e}); it was damaged or is another file; "
                            "choose another --out") from None

    def reader(self) -> "Store":
        """Another connection to the same database, for another thread."""
        return Store(self.path, self.label_type_name, create=False)

    # -- meta

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, **values: str) -> None:
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    # -- writing

    def transaction(self):
        """`with store.transaction():` one transaction (committed at the end, rolled back on error)."""
        return _Transaction(self.db)

    def begin(self) -> None:
        """Open a transaction for `append` and `add_questions`, unless one is open."""
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def add_questions(self, first_id: int, items: list[questions.Item], records: list[str]) -> None:
        """Questions and their label record prefixes, in the open transaction."""
        self.db.executemany("INSERT INTO questions VALUES (?, ?)",
                            ((first_id + i, item_json(it)) for i, it in enumerate(items)))
        self.db.executemany("INSERT INTO records VALUES (?, ?)", ((first_id + i, r) for i, r in enumerate(records)))

    def append(self, seq: int, kind: str, session: str, question: int | None = None, label: int | None = None,
               undo: int | None = None) -> None:
        """One event, in the open transaction."""
        self.db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (seq, kind, question, session, label, undo, time.time()))

    def migrate(self, items: list[questions.Item], records: list[str], events: list[dict], source: str) -> None:
        """A journal's questions and events, within the caller's transaction (so all or none)."""
        self.add_questions(0, items, records)
        self.db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                            ((e["seq"], e["event"], e.get("id"), e["session"], e.get("label"), e.get("undo"),
                              e.get("time", 0.0)) for e in events))
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('migrated', ?)", (source,))

    # -- reading

    def count_questions(self) -> int:
        return self.db.execute("SELECT count(*) FROM questions").fetchone()[0]

    def count_events(self) -> int:
        return self.db.execute("SELECT count(*) FROM events").fetchone()[0]

    def question(self, qid: int) -> questions.Item:
        row = self.db.execute("SELECT item FROM questions WHERE id = ?", (qid,)).fetchone()
        if row is None:
            raise IndexError(qid)
        return item_from_json(row[0], qid, str(self.path))

    def events(self) -> Iterator[tuple]:
        """(seq, kind, question, session, label, undo) in order."""
        return self.db.execute("SELECT seq, kind, question, session, label, undo FROM events ORDER BY seq")

    def records(self, ids: list[int]) -> dict[int, str]:
        """The label record prefixes of questions `ids`."""
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            out.update(self.db.execute(f"SELECT id, record FROM records WHERE id IN ({marks})", chunk))
        return out

    def items_json(self) -> Iterator[str]:
        return (row[0] for row in self.db.execute("SELECT item FROM questions ORDER BY id"))

    def close(self) -> None:
        self.db.close()


class GroupCommit:
    """Writes into the store's open transaction, committed by a thread of its own: the writes that
    come while one commit is fsynced go together in the next, and none is confirmed before its
    commit returned.

    `lock` is the caller's. It guards the connection (not thread-safe) and the caller's state,
    which already holds what the open transaction holds: `write` and `wait` are called with it
    held, and the commit runs under it. After a failed commit (rolled back) `reload` runs, for the
    state to forget the writes that were not committed; after every commit, `committed`.
    """

    def __init__(self, store: Store, lock: threading.Condition, reload: Callable[[], None],
                 committed: Callable[[], None]):
        self.store, self.lock, self.reload, self.committed = store, lock, reload, committed
        self._written = self._durable = 0  # writes into the open transaction; of them, committed
        self._failed: list[tuple[int, int, str]] = []  # (after, up to, why) of writes whose commit failed
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="label-commits", daemon=True)
        self._thread.start()

    def write(self, write: Callable[[], None]) -> int:
        """`write` into the open transaction; the ticket to `wait` for."""
        try:
            self.store.begin()
            write()
        except sqlite3.Error as e:
            raise self._error(str(e)) from None
        self._written += 1
        return self._written

    def wait(self, ticket: int) -> None:
        """Return once write `ticket` is committed (others take the lock meanwhile); raise if its commit failed."""
        self.lock.wait_for(lambda: self._durable >= ticket)
        for after, upto, why in self._failed:
            if after < ticket <= upto:
                raise self._error(why)

    def close(self) -> None:
        """Commit what was written, and stop."""
        with self.lock:
            self._closing = True
            self.lock.notify_all()
        self._thread.join()

    def _error(self, why: str) -> UserError:
        advice = "free space and answer again" if "full" in why else "the database is damaged"
        return UserError(f"cannot record this in {self.store.path} ({why}); {advice}")

    def _loop(self) -> None:
        with self.lock:
            while True:
                self.lock.wait_for(lambda: self._written > self._durable or self._closing)
                if self._written == self._durable:
                    return
                upto = self._written
                try:
                    self.store.commit()
                except sqlite3.Error as e:  # none of these writes is confirmed, and the state forgets them
                    self.store.rollback()
                    self._failed.append((self._durable, upto, str(e)))
                    self.reload()
                self._durable = upto
                self.committed()


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
