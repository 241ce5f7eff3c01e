"""How well two people agree on the questions both labelled (not skipped).

Measured on the first two labels of each such question: the raw rate of equal labels (for
ratings also: within one point), the rate chance would give with the observed label
distributions (the first and the second labels' shares of each label, as Cohen's kappa takes
them), the kappa, and each labeler's count and agreement. The counts are kept as answers come
and go (`Agreement`), so a summary costs the same however many answers there are.
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class LabelerStats:
    number: int  # 1, 2, … in the order labelers first answered: sessions are secrets, never shown
    labelled: int = 0
    skipped: int = 0
    doubly: int = 0  # their labels on questions labelled by two
    agreed: int = 0
    within_one: int = 0


class Agreement:
    """The (first, second) label pairs of doubly-labelled questions and each labeler's counts."""

    def __init__(self):
        self.pairs: Counter[tuple[int, int]] = Counter()
        self.labelers: dict[str, LabelerStats] = {}

    def labeler(self, session: str) -> LabelerStats:
        if session not in self.labelers:
            self.labelers[session] = LabelerStats(len(self.labelers) + 1)
        return self.labelers[session]

    def count(self, session: str, label: int | None, sign: int) -> None:
        """Add (+1) or take away (-1) one answer of `session` (label None: a skip)."""
        stats = self.labeler(session)
        stats.labelled += sign * (label is not None)
        stats.skipped += sign * (label is None)

    def count_pair(self, first: tuple[str, int], second: tuple[str, int], sign: int) -> None:
        """Add (+1) or take away (-1) a question's first two labels, each (session, label)."""
        self.pairs[(first[1], second[1])] += sign
        for (session, mine), (_, other) in ((first, second), (second, first)):
            stats = self.labeler(session)
            stats.doubly += sign
            stats.agreed += sign * (mine == other)
            stats.within_one += sign * (abs(mine - other) <= 1)

    def summary(self, rating: bool) -> dict:
        """The agreement as the app shows it (`rating`: scalar ratings, also measured within one point)."""
        pairs = +self.pairs
        labelers = sorted(self.labelers.values(), key=lambda s: s.number)
        rows = [dict(labeler=s.number, labelled=s.labelled, skipped=s.skipped, doubly_labelled=s.doubly,
                     agreed=s.agreed, rate=s.agreed / s.doubly if s.doubly else None) for s in labelers]
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
