"""The labeling app's assignment and agreement on their own: no database, no threads, no clock
(each call is given `now`)."""

import random
from collections import Counter

import pytest

from lm_human_preferences.labeling.app.agreement import Agreement, chance_agreement
from lm_human_preferences.labeling.app.assignment import Answer, Assignment, BadAnswer, Conflict

A, B, C = "a" * 32, "b" * 32, "c" * 32
LEASE_S = 600.0


def assignment(n: int, overlap: float = 0.0, labels: range = range(4)) -> Assignment:
    state = Assignment(labels, overlap, seed=0, lease_s=LEASE_S)
    state.add_questions(n)
    return state


def answer(state: Assignment, session: str, qid: int, label: int | None, now: float = 0.0) -> None:
    """As the queue records an answer: checked, then taken."""
    state.check_answer(session, qid, now)
    state.answer(Answer(state.next_seq, qid, session, label))


def undo(state: Assignment, session: str, now: float = 0.0) -> int:
    last = state.last_answer(session)
    state.undo(state.next_seq, session, last.seq, now)
    return last.id


def test_questions_go_out_in_order_and_each_labeler_keeps_its_own():
    state = assignment(3)
    assert state.next_question(A, 0.0) == 0
    assert state.next_question(A, 1.0) == 0  # still shown
    assert state.next_question(B, 1.0) == 1  # 0 is A's while its lease runs
    answer(state, A, 0, 2)
    assert state.next_question(A, 2.0) == 2
    answer(state, B, 1, None)
    assert state.next_question(B, 3.0) is None  # 2 is A's
    assert state.progress() == dict(questions=3, labelled=1, skipped=1, complete=2, overlapped=0)
    assert state.progress(A) == dict(questions=3, labelled=1, skipped=1, complete=2, overlapped=0, yours=1, labeler=1)
    assert state.first_label(0) == 2 and state.first_label(1) is None and state.first_label(2) is None


def test_a_lease_that_runs_out_frees_the_question():
    state = assignment(1)
    assert state.next_question(A, 0.0) == 0
    assert state.next_question(B, LEASE_S - 1) is None
    assert state.next_question(B, LEASE_S) == 0  # A is still shown it, and may still answer it
    answer(state, B, 0, 1, LEASE_S)
    with pytest.raises(Conflict, match="answered by someone else"):
        state.check_answer(A, 0, LEASE_S + 1)


def test_an_overlapped_question_goes_to_two_labelers_never_twice_to_one():
    state = assignment(40, overlap=0.5)
    twice = [i for i in range(40) if state.overlapped(i)]
    assert 10 <= len(twice) <= 30 and state.progress()["overlapped"] == len(twice)
    seen = []
    while (qid := state.next_question(A, 0.0)) is not None:
        seen.append(qid)
        answer(state, A, qid, 0)
    assert seen == list(range(40))
    assert state.progress()["complete"] == 40 - len(twice)
    seen = []
    while (qid := state.next_question(B, 0.0)) is not None:
        seen.append(qid)
        answer(state, B, qid, 1)
    assert seen == twice and state.progress()["complete"] == 40


def test_answers_are_checked():
    state = assignment(2)
    with pytest.raises(BadAnswer, match="no question 2"):
        state.check_answer(A, 2, 0.0)
    with pytest.raises(BadAnswer, match="no question True"):
        state.check_id(True)
    for label in (4, -1, True, 1.0, "1"):
        with pytest.raises(BadAnswer, match="is not one of 0..3"):
            state.check_label(label)
    state.next_question(A, 0.0)
    with pytest.raises(Conflict, match="not the one this labeler was shown"):
        state.check_answer(A, 1, 0.0)
    state.check_answer(B, 1, 0.0)  # a page from before a restart may answer a question still open
    with pytest.raises(BadAnswer, match="event 0 is missing"):
        state.answer(Answer(1, 0, A, 0))


def test_undo_takes_back_the_last_answer_and_shows_that_question_again():
    state = assignment(3)
    state.next_question(A, 0.0)
    answer(state, A, 0, 1)
    state.next_question(A, 0.0)
    answer(state, A, 1, None)
    assert undo(state, A) == 1
    assert state.progress() == dict(questions=3, labelled=1, skipped=0, complete=1, overlapped=0)
    assert state.next_question(A, 0.0) == 1
    assert state.next_question(B, 0.0) == 2  # 1 is A's again
    with pytest.raises(Conflict, match="answer 1 is not the last answer"):
        state.undo(state.next_seq, A, 1, 0.0)
    assert undo(state, A) == 0 and state.first_label(0) is None and state.last_answer(A) is None
    assert state.next_question(A, 0.0) == 0  # shown again
    assert state.next_question(C, 0.0) == 1  # no longer A's
    assert state.next_seq == 4


def test_an_undone_question_is_open_again_to_labelers_who_went_past_it():
    state = assignment(2)
    state.next_question(A, 0.0)
    answer(state, A, 0, 1)
    assert state.next_question(B, 0.0) == 1
    answer(state, B, 1, 2)
    assert state.next_question(B, 0.0) is None  # B's scan now starts past both
    undo(state, A)  # A is shown 0 again
    assert state.next_question(B, LEASE_S - 1) is None
    assert state.next_question(B, LEASE_S) == 0  # A's lease ran out


def test_replaying_the_events_gives_the_same_state():
    """Random answers, skips and undos by three labelers: the events replayed into a fresh
    assignment give the same answers, progress and agreement; a gap in them is refused."""
    rng = random.Random(0)
    live = assignment(30, overlap=0.5)
    events = []
    for _ in range(200):
        session = rng.choice((A, B, C))
        qid = live.next_question(session, 0.0)
        if rng.random() < 0.2 and live.last_answer(session):
            events.append((live.next_seq, "undo", None, session, None, live.last_answer(session).seq))
            undo(live, session)
        elif qid is not None:
            label = None if rng.random() < 0.2 else rng.randrange(4)
            events.append((live.next_seq, "answer", qid, session, label, None))
            answer(live, session, qid, label)
    replayed = assignment(30, overlap=0.5)
    for event in events:
        replayed.replay(*event, now=0.0)
    assert replayed.progress() == live.progress() and live.progress()["labelled"] > 5
    assert replayed.agreement.summary(rating=False) == live.agreement.summary(rating=False)
    assert replayed.first == live.first and replayed.second == live.second and live.second
    assert replayed.answers == live.answers and replayed.history == live.history
    with pytest.raises(BadAnswer, match="event 0 is missing"):
        assignment(30).replay(*events[1], now=0.0)
    with pytest.raises(BadAnswer, match="unknown event 'rename'"):
        assignment(30).replay(0, "rename", 0, A, None, None, now=0.0)


def test_agreement_counts_follow_answers_and_undos():
    state = assignment(20, overlap=1.0)
    for qid, (first, second) in enumerate([(0, 0), (1, 1), (2, 0), (3, 3)]):
        answer(state, A, qid, first)
        answer(state, B, qid, second)
    summary = state.agreement.summary(rating=False)
    assert (summary["doubly_labelled"], summary["agreed"], summary["rate"]) == (4, 3, 0.75)
    assert [(r["labeler"], r["doubly_labelled"], r["agreed"]) for r in summary["labelers"]] == [(1, 4, 3), (2, 4, 3)]
    undo(state, B)  # (3, 3) goes
    summary = state.agreement.summary(rating=False)
    assert (summary["doubly_labelled"], summary["agreed"]) == (3, 2)
    assert state.second == {0: (1, 0), 1: (3, 1), 2: (5, 0)}


def test_chance_agreement_and_kappa_by_hand():
    # first labels 0,1,2,3 (a quarter each), second 0,1,0,3 (½, ¼, 0, ¼): chance ¼·½ + ¼·¼ + ¼·¼ = ¼
    pairs = Counter({(0, 0): 1, (1, 1): 1, (2, 0): 1, (3, 3): 1})
    assert chance_agreement(pairs, lambda a, b: a == b) == dict(agreed=3, rate=0.75, chance=0.25,
                                                               kappa=pytest.approx(2 / 3))
    assert chance_agreement(Counter(), lambda a, b: a == b) == dict(agreed=0, rate=None, chance=None, kappa=None)
    everyone_says_1 = Counter({(1, 1): 5})
    assert chance_agreement(everyone_says_1, lambda a, b: a == b)["kappa"] is None  # chance is 1: no kappa


def test_ratings_are_also_measured_within_one_point():
    agreement = Agreement()
    for first, second in [(7, 7), (1, 2), (4, 6), (5, 5)]:
        agreement.count_pair((A, first), (B, second), +1)
    summary = agreement.summary(rating=True)
    # equal by chance: (7,7), (5,5): 2/16; within one by chance: (7,7) (7,6) (1,2) (4,5) (5,5) (5,6): 6/16
    assert summary["rule"] == "same score" and summary["chance"] == 0.125 and summary["within_one_rate"] == 0.75
    assert summary["within_one_chance"] == 0.375 and summary["within_one_kappa"] == pytest.approx(0.6)
    assert [r["within_one_rate"] for r in summary["labelers"]] == [0.75, 0.75]
