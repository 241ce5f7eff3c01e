"""Questions waiting for people, handed out one at a time, with every answer on disk at once.

A `LabelQueue` belongs to one label file FILE and keeps three files beside it:
    FILE.questions.json  the questions (`questions.py`); a question's id is its index
    FILE.journal.jsonl   every answer, skip and undo, appended and fsynced before it is confirmed
    FILE.overlap.json    second labels of questions that two people answered (with overlap > 0)
FILE itself is folded from the journal after every event and written atomically: a JSON list
in the released schema, in labelling order, holding the *first* label of each question;
a question everybody skipped is not written. A restart replays the journal, so nothing
confirmed is lost and no answered question is shown again.

Each labeler (a browser session) gets its own questions. With `overlap` F a share F of the
questions, drawn from the seed, goes to two different labelers; the agreement rate is the
share of questions labelled (not skipped) by both on which the two labels are equal (for
ratings also: within one point). A question handed to someone who does not answer within
`lease_s` seconds may be handed to someone else.

`HumanLabeler` puts this queue behind collect's `Labeler` protocol.
"""

import functools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lm_human_preferences.labeling import collect, label_files, label_types
from lm_human_preferences.labeling.app import questions
from lm_human_preferences.labeling.app.journal import Journal
from lm_human_preferences.utils.errors import UserError

RATINGS = range(1, 8)  # scalar_rating: 1 (worst) … 7 (best)
LEASE_S = 600.0


class BadAnswer(ValueError):
    """An answer that can never be valid (unknown question, label out of range)."""


class Conflict(Exception):
    """An answer that is no longer wanted: the question is not this labeler's, or is already answered."""


@dataclass
class Answer:
    seq: int  # the event's index in the journal
    id: int
    session: str
    label: int | None  # None: skipped


def side_paths(out: Path) -> dict[str, Path]:
    out = Path(out)
    return {name: out.with_name(f"{out.name}.{name}") for name in ("questions.json", "journal.jsonl", "overlap.json")}


def valid_labels(label_type: label_types.LabelType) -> range:
    if isinstance(label_type, label_types.ScalarRating):
        return RATINGS
    return range(questions.count_responses(label_type))


def record(label_type: label_types.LabelType, question: collect.Question, label: int) -> dict:
    """The label record in the released schema of `label_type`."""
    if isinstance(label_type, label_types.ScalarRating):
        return {"query": question.query, "sample": question.responses[0], "score": float(label)}
    return collect.record(question, label)


@functools.cache
def _draw(seed: int, qid: int) -> float:
    return random.Random(f"{seed}:{qid}").random()


class LabelQueue:
    def __init__(self, out: Path, label_type: label_types.LabelType, overlap: float = 0.0, seed: int = 0,
                 lease_s: float = LEASE_S):
        if not 0.0 <= overlap <= 1.0:
            raise UserError(f"overlap must be a share between 0 and 1, got {overlap}")
        self.out = Path(out)
        self.paths = side_paths(self.out)
        if self.out.exists() and not self.paths["journal.jsonl"].exists():
            raise UserError(f"{self.out} exists but {self.paths['journal.jsonl']} does not: the labels were not made "
                            "by the labeling app; choose another --out")
        self.label_type = label_type
        self.labels = valid_labels(label_type)
        self.overlap, self.seed, self.lease_s = overlap, seed, lease_s
        self.items: list[questions.Item] = []
        if self.paths["questions.json"].exists():
            type_name, self.items = questions.load(self.paths["questions.json"])
            if type_name != label_type.name:
                raise UserError(f"{self.paths['questions.json']} holds {type_name} questions, not {label_type.name}")
        self.changed = threading.Condition()
        self.version = 0
        self.answers: dict[int, list[Answer]] = {}  # live answers of each question, oldest first
        self.history: dict[str, list[Answer]] = {}  # live answers of each labeler, oldest first
        self.current: dict[str, int] = {}  # the question each labeler was last shown
        self.holders: dict[int, dict[str, float]] = {}  # who was shown a question, and when
        self.delivered: set[int] = set()
        self.journal = Journal(self.paths["journal.jsonl"])
        for event in self.journal.events:
            self._replay(event)
        self._fold()

    # -- reading the journal

    def _replay(self, event: dict) -> None:
        where = f"{self.journal.path}: event {event.get('seq')}"
        try:
            if event["event"] == "answer":
                label = event["label"]
                if label is not None:
                    self._check_label(label)
                self._check_id(event["id"])
                self._apply(Answer(event["seq"], event["id"], event["session"], label))
            elif event["event"] == "undo":
                self._take_back(event["session"], event["undo"])
            else:
                raise UserError(f"{where}: unknown event {event['event']!r}")
        except (KeyError, TypeError, BadAnswer, Conflict) as e:
            raise UserError(f"{where} cannot be replayed ({type(e).__name__}: {e}); the journal was edited or "
                            "belongs to other questions") from None

    def _apply(self, answer: Answer) -> None:
        self.answers.setdefault(answer.id, []).append(answer)
        self.history.setdefault(answer.session, []).append(answer)
        self.holders.get(answer.id, {}).pop(answer.session, None)
        if self.current.get(answer.session) == answer.id:
            del self.current[answer.session]

    def _take_back(self, session: str, seq: int) -> None:
        """Remove `session`'s last answer (number `seq`) and show it that question again."""
        mine = self.history.get(session, [])
        if not mine or mine[-1].seq != seq:
            raise Conflict(f"answer {seq} is not the last answer of this labeler")
        answer = mine.pop()
        self.answers[answer.id].remove(answer)
        self._show(session, answer.id, time.monotonic())

    def _show(self, session: str, qid: int, now: float) -> None:
        """Make `qid` the question `session` is shown (releasing the one it was shown before)."""
        previous = self.current.get(session)
        if previous is not None and previous != qid:
            self.holders.get(previous, {}).pop(session, None)
        self.current[session] = qid
        self.holders.setdefault(qid, {})[session] = now

    # -- checks

    def _check_id(self, qid) -> None:
        if isinstance(qid, bool) or not isinstance(qid, int) or not 0 <= qid < len(self.items):
            raise BadAnswer(f"no question {qid!r} (ids are 0..{len(self.items) - 1})")

    def _check_label(self, label) -> None:
        if isinstance(label, bool) or not isinstance(label, int) or label not in self.labels:
            raise BadAnswer(f"label {label!r} is not one of {self.labels.start}..{self.labels.stop - 1}")

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

    def next_question(self, session: str) -> int | None:
        """The question to show `session`: the one it was shown if still open, else the first open one."""
        with self.changed:
            now = time.monotonic()
            qid = self.current.get(session)
            if qid is None or not self._open_to(qid, session, now):
                qid = next((i for i in range(len(self.items)) if self._open_to(i, session, now)), None)
            if qid is None:
                previous = self.current.pop(session, None)
                self.holders.get(previous, {}).pop(session, None)
                return None
            self._show(session, qid, now)
            return qid

    # -- answers

    def add(self, items: list[questions.Item]) -> list[int]:
        """Queue more questions (saved to the questions file first); their ids."""
        with self.changed:
            ids = list(range(len(self.items), len(self.items) + len(items)))
            questions.save(self.paths["questions.json"], self.label_type, self.items + items)
            self.items.extend(items)
            self._changed()
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
            self._check_id(qid)
            shown = self.current.get(session)
            # a page shown before a restart may answer its question if it is still open
            if shown != qid and not (shown is None and self._open_to(qid, session, time.monotonic())):
                raise Conflict(f"question {qid} is not the one this labeler was shown; reload the page")
            if self._complete(qid):
                raise Conflict(f"question {qid} was answered by someone else meanwhile")
            seq = len(self.journal.events)
            self.journal.append(dict(seq=seq, event="answer", id=qid, session=session, label=label, time=time.time()))
            self._apply(Answer(seq, qid, session, label))
            self._fold()
            self._changed()

    def undo(self, session: str) -> int:
        """Take back `session`'s last answer (label or skip) and show it that question again; its id."""
        with self.changed:
            mine = self.history.get(session, [])
            if not mine:
                raise Conflict("nothing to undo")
            last = mine[-1]
            if last.id in self.delivered:
                raise Conflict(f"question {last.id} was already handed to the trainer")
            self.journal.append(dict(seq=len(self.journal.events), event="undo", undo=last.seq, session=session,
                                     time=time.time()))
            self._take_back(session, last.seq)
            self._fold()
            self._changed()
            return last.id

    def can_undo(self, session: str) -> bool:
        with self.changed:
            mine = self.history.get(session, [])
            return bool(mine) and mine[-1].id not in self.delivered

    # -- results

    def _labels_of(self, qid: int) -> list[Answer]:
        return [a for a in self.answers.get(qid, []) if a.label is not None]

    def _fold(self) -> None:
        """Write FILE (first labels) and FILE.overlap.json (second labels), each in labelling order."""
        first, second = [], []
        for qid in self.answers:
            labels = self._labels_of(qid)
            question = self.items[qid].question
            if labels:
                first.append((labels[0].seq, record(self.label_type, question, labels[0].label)))
            if len(labels) > 1:
                second.append((labels[1].seq, record(self.label_type, question, labels[1].label)))
        label_files.write([r for _, r in sorted(first, key=lambda x: x[0])], self.out)
        if self.overlap > 0 or self.paths["overlap.json"].exists():
            label_files.write([r for _, r in sorted(second, key=lambda x: x[0])], self.paths["overlap.json"])

    def progress(self, session: str | None = None) -> dict:
        with self.changed:
            complete = [i for i in range(len(self.items)) if self._complete(i)]
            out = dict(questions=len(self.items), labelled=sum(bool(self._labels_of(i)) for i in self.answers),
                       skipped=sum(not self._labels_of(i) for i in complete), complete=len(complete),
                       overlapped=sum(self.overlapped(i) for i in range(len(self.items))))
            if session is not None:
                out["yours"] = sum(a.label is not None for a in self.history.get(session, []))
            return out

    def agreement(self) -> dict:
        """Agreement of the two labels on questions labelled twice: equal labels (ratings: also within 1)."""
        with self.changed:
            pairs = [(ls[0].label, ls[1].label) for ls in map(self._labels_of, self.answers) if len(ls) > 1]
        out = dict(doubly_labelled=len(pairs), agreed=sum(a == b for a, b in pairs))
        out["rate"] = out["agreed"] / len(pairs) if pairs else None
        if isinstance(self.label_type, label_types.ScalarRating):
            out["rule"] = "same score"
            within = sum(abs(a - b) <= 1 for a, b in pairs)
            out["within_one_rate"] = within / len(pairs) if pairs else None
        else:
            out["rule"] = "same best response"
        return out

    # -- waiting

    def _changed(self) -> None:
        self.version += 1
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
            return [labels[0].label if labels else None for labels in map(self._labels_of, ids)]

    def close(self) -> None:
        self.journal.close()


class HumanLabeler:
    """collect's `Labeler` protocol answered by people through the labeling app serving `queue`."""

    def __init__(self, queue: LabelQueue, padding_token: int, report: Callable[[str], None] | None = print,
                 poll_s: float = 1.0):
        self.queue = queue
        self.padding_token = padding_token
        self.report = report
        self.poll_s = poll_s

    def answer(self, qs: list[collect.Question]) -> list[int | None]:
        """Blocks until people answered or skipped every question; the labels (None: skipped)."""
        ids = self.queue.add([questions.item(q, self.padding_token) for q in qs])
        version, reported = -1, -1
        while (done := self.queue.complete_count(ids)) < len(ids):
            if self.report and done != reported:
                self.report(f"people answered {done}/{len(ids)} questions")
                reported = done
            version = self.queue.wait_for_change(version, self.poll_s)
        return self.queue.deliver(ids)
