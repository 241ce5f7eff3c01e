"""People as a labeler: collect's `Labeler` protocol, answered through the labeling app's queue."""

from collections.abc import Callable

from lm_human_preferences.labeling import collect
from lm_human_preferences.labeling.app import questions
from lm_human_preferences.labeling.app.queue import LabelQueue


class PeopleLabeler:
    """`answer(questions)` queues the questions for the people using the app serving `queue` and
    blocks until they answered or skipped every one; it returns their labels (None: skipped).

    The queue's questions from index `taken` on were given to people before a restart by an ask
    that did not finish: asked again, they are not queued again (their answers are kept). While
    it waits, `report` gets a progress line whenever the count changes, and `beat()` runs every
    poll (e.g. to notice a stop request).
    """

    def __init__(self, queue: LabelQueue, padding_token: int, taken: int = 0, url: str | None = None,
                 report: Callable[[str], None] | None = print, beat: Callable[[], None] | None = None,
                 poll_s: float = 1.0):
        self.queue, self.padding_token, self.taken = queue, padding_token, taken
        self.url, self.report, self.beat, self.poll_s = url, report, beat, poll_s

    def pending(self) -> list[collect.Question]:
        """The questions given to people beyond `taken`, whose ask did not finish."""
        return [item.question for item in self.queue.items[self.taken:]]

    def answer(self, qs: list[collect.Question]) -> list[int | None]:
        items = [questions.item(q, self.padding_token) for q in qs]
        end = self.taken + len(items)
        ids = list(range(self.taken, end)) if self.queue.items[self.taken:end] == items else self.queue.add(items)
        self.taken = ids[-1] + 1
        version, reported = -1, -1
        while (done := self.queue.complete_count(ids)) < len(ids):
            if self.report and done != reported:
                self.report(f"waiting for people: {done}/{len(ids)} questions answered"
                            + (f" at {self.url}" if self.url else ""))
                reported = done
            version = self.queue.wait_for_change(version, self.poll_s)
            if self.beat:
                self.beat()
        return self.queue.deliver(ids)
