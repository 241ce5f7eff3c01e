"""Who answered what, and which question each labeler (a browser session) is shown next.

Each labeler gets its own questions. With `overlap` F a share F of the questions, drawn from
the seed, goes to two different labelers. A question shown to someone who does not answer
within `lease_s` seconds may be shown to someone else. An undo takes back a labeler's last
answer and shows it that question again.

`Assignment` keeps this state as events come (an answer, a skip, an undo): the counters, the
agreement counts and where each labeler's next open question may be, so that every request costs
the same however many answers there are. It has no threads, no I/O and no clock (callers pass
`now`): the queue (queue.py) records each event in its database first and calls it under its
lock, and rebuilds it from the database's events on opening.
"""

import functools
import random
from dataclasses import dataclass

from lm_human_preferences.labeling.app.agreement import Agreement


class BadAnswer(ValueError):
    """An answer that can never be valid (unknown question, label out of range)."""


class Conflict(Exception):
    """An answer that is no longer wanted: the question is not this labeler's, or is already answered."""


@dataclass
class Answer:
    seq: int  # the event's number in the database
    id: int
    session: str
    label: int | None  # None: skipped


@functools.cache
def _draw(seed: int, qid: int) -> float:
    return random.Random(f"{seed}:{qid}").random()


class Assignment:
    def __init__(self, labels: range, overlap: float, seed: int, lease_s: float):
        self.labels, self.overlap, self.seed, self.lease_s = labels, overlap, seed, lease_s
        self.n = 0  # questions
        self.overlapped_n = 0  # of them, those that go to two labelers
        self.next_seq = 0  # the number of the next event
        self.answers: dict[int, list[Answer]] = {}  # live answers of each question, oldest first
        self.history: dict[str, list[Answer]] = {}  # live answers of each labeler, oldest first
        self.current: dict[str, int] = {}  # the question each labeler was last shown
        self.holders: dict[int, dict[str, float]] = {}  # who was shown a question, and when
        self.agreement = Agreement()
        self.labelled = self.skipped = self.complete_n = 0
        self.first: dict[int, tuple[int, int]] = {}  # question → (seq, label) of its first label
        self.second: dict[int, tuple[int, int]] = {}
        self._low = 0  # every question below is complete
        self._start: dict[str, int] = {}  # every question below is complete or answered by that labeler

    # -- questions

    def add_questions(self, count: int) -> list[int]:
        """Take `count` more questions; their ids."""
        ids = list(range(self.n, self.n + count))
        self.n += count
        self.overlapped_n += sum(self.overlapped(i) for i in ids)
        return ids

    def overlapped(self, qid: int) -> bool:
        """Whether question `qid` goes to two labelers: drawn from (seed, id), so stable across restarts."""
        return _draw(self.seed, qid) < self.overlap

    def needed(self, qid: int) -> int:
        return 2 if self.overlapped(qid) else 1

    def complete(self, qid: int) -> bool:
        return len(self.answers.get(qid, [])) >= self.needed(qid)

    def check_id(self, qid) -> None:
        if isinstance(qid, bool) or not isinstance(qid, int) or not 0 <= qid < self.n:
            raise BadAnswer(f"no question {qid!r} (ids are 0..{self.n - 1})")

    def check_label(self, label) -> None:
        if isinstance(label, bool) or not isinstance(label, int) or label not in self.labels:
            raise BadAnswer(f"label {label!r} is not one of {self.labels.start}..{self.labels.stop - 1}")

    # -- who is shown which question

    def _answered_by(self, qid: int, session: str) -> bool:
        return any(a.session == session for a in self.answers.get(qid, []))

    def open_to(self, qid: int, session: str, now: float) -> bool:
        if self.complete(qid) or self._answered_by(qid, session):
            return False
        holders = self.holders.get(qid, {})
        if session in holders:
            return True
        fresh = sum(now - t < self.lease_s for t in holders.values())
        return len(self.answers.get(qid, [])) + fresh < self.needed(qid)

    def advance_low(self) -> None:
        """Move past the complete questions at the start (done on opening: a scan of every question)."""
        while self._low < self.n and self.complete(self._low):
            self._low += 1

    def _first_open(self, session: str, now: float) -> int | None:
        """The first question open to `session`, scanning from where no earlier one can be."""
        self.advance_low()
        start = max(self._start.get(session, self._low), self._low)
        while start < self.n and (self.complete(start) or self._answered_by(start, session)):
            start += 1
        self._start[session] = start
        return next((i for i in range(start, self.n) if self.open_to(i, session, now)), None)

    def next_question(self, session: str, now: float) -> int | None:
        """The question to show `session`: the one it was shown if still open, else the first open one."""
        qid = self.current.get(session)
        if qid is None or not self.open_to(qid, session, now):
            qid = self._first_open(session, now)
        if qid is None:
            previous = self.current.pop(session, None)
            self.holders.get(previous, {}).pop(session, None)
            return None
        self._show(session, qid, now)
        return qid

    def _show(self, session: str, qid: int, now: float) -> None:
        """Make `qid` the question `session` is shown (releasing the one it was shown before)."""
        previous = self.current.get(session)
        if previous is not None and previous != qid:
            self.holders.get(previous, {}).pop(session, None)
        self.current[session] = qid
        self.holders.setdefault(qid, {})[session] = now

    # -- events

    def check_answer(self, session: str, qid, now: float) -> None:
        """Raise unless `session` may answer question `qid` now."""
        self.check_id(qid)
        shown = self.current.get(session)
        # a page shown before a restart may answer its question if it is still open
        if shown != qid and not (shown is None and self.open_to(qid, session, now)):
            raise Conflict(f"question {qid} is not the one this labeler was shown; reload the page")
        if self.complete(qid):
            raise Conflict(f"question {qid} was answered by someone else meanwhile")

    def last_answer(self, session: str) -> Answer | None:
        mine = self.history.get(session, [])
        return mine[-1] if mine else None

    def answer(self, answer: Answer) -> None:
        """Event `answer` (a label, or a skip)."""
        self._expect(answer.seq)
        self._account(answer.id, -1)
        self.answers.setdefault(answer.id, []).append(answer)
        self._account(answer.id, +1)
        self.history.setdefault(answer.session, []).append(answer)
        self.agreement.count(answer.session, answer.label, +1)
        self.holders.get(answer.id, {}).pop(answer.session, None)
        if self.current.get(answer.session) == answer.id:
            del self.current[answer.session]
        self.next_seq += 1

    def undo(self, seq: int, session: str, answer_seq: int, now: float) -> None:
        """Event `seq`: `session` takes back its last answer (number `answer_seq`) and is shown that question again."""
        self._expect(seq)
        last = self.last_answer(session)
        if last is None or last.seq != answer_seq:
            raise Conflict(f"answer {answer_seq} is not the last answer of this labeler")
        self.history[session].pop()
        self._account(last.id, -1)
        self.answers[last.id].remove(last)
        self._account(last.id, +1)
        self.agreement.count(session, last.label, -1)
        self._low = min(self._low, last.id)
        for other, start in self._start.items():
            if start > last.id:
                self._start[other] = last.id
        self._show(session, last.id, now)
        self.next_seq += 1

    def replay(self, seq: int, kind: str, qid, session: str, label, undo, now: float) -> None:
        """Event `seq` as the database holds it, checked (BadAnswer or Conflict where it cannot be)."""
        self._expect(seq)
        if kind == "answer":
            if label is not None:
                self.check_label(label)
            self.check_id(qid)
            self.answer(Answer(seq, qid, session, label))
        elif kind == "undo":
            self.undo(seq, session, undo, now)
        else:
            raise BadAnswer(f"unknown event {kind!r}")

    def _expect(self, seq: int) -> None:
        if seq != self.next_seq:
            raise BadAnswer(f"event {self.next_seq} is missing")

    def _account(self, qid: int, sign: int) -> None:
        """Add (+1) or take away (-1) question `qid`'s share of the counters, as its answers are now."""
        answers = self.answers.get(qid, [])
        labels = [a for a in answers if a.label is not None]
        complete = len(answers) >= self.needed(qid)
        self.labelled += sign * bool(labels)
        self.complete_n += sign * complete
        self.skipped += sign * (complete and not labels)
        for position, table in enumerate((self.first, self.second)):
            if sign < 0:
                table.pop(qid, None)
            elif len(labels) > position:
                table[qid] = (labels[position].seq, labels[position].label)
        if len(labels) > 1:
            a, b = labels[0], labels[1]
            self.agreement.count_pair((a.session, a.label), (b.session, b.label), sign)

    # -- results

    def progress(self, session: str | None = None) -> dict:
        out = dict(questions=self.n, labelled=self.labelled, skipped=self.skipped, complete=self.complete_n,
                   overlapped=self.overlapped_n)
        if session is not None:
            stats = self.agreement.labelers.get(session)
            out["yours"] = stats.labelled if stats else 0
            out["labeler"] = stats.number if stats else None
        return out

    def first_label(self, qid: int) -> int | None:
        """The first label of question `qid` (None: none yet, or all skipped)."""
        return self.first[qid][1] if qid in self.first else None
