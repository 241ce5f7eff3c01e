"""Stopping a run cleanly: SIGINT (Ctrl-C) or SIGTERM (what Slurm and Kubernetes send) ask the
trainer to stop after the current update, with a checkpoint it can resume from.

Every rank must stop at the same update, so the ranks agree on a stop request each update. A
second signal, at least two seconds after the first, stops at once (as Ctrl-C does anywhere);
a signal repeated within that window (one sent both to a launcher and to its ranks) counts once.
"""

import contextlib
import signal
import threading
import time

import torch

from lm_human_preferences.utils import distributed
from lm_human_preferences.utils.errors import Stopped

REPEAT_WINDOW = 2.0  # seconds within which a repeated signal counts once


class _Request:
    def __init__(self) -> None:
        self.signum = 0
        self.at = 0.0

    def handle(self, signum: int, _frame) -> None:
        if self.signum and time.monotonic() - self.at > REPEAT_WINDOW:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum, self.at = signum, time.monotonic()
            name = signal.Signals(signum).name
            print(f"\n{name}: stopping after this update (send it again to stop at once)", flush=True)

    def requested(self) -> bool:
        """Whether any rank was asked to stop (a collective: call it on every rank)."""
        flag = torch.tensor(float(self.signum), device=distributed.device())
        agreed = distributed.all_reduce_max(flag).item()
        if agreed and not self.signum:
            self.signum = int(agreed)
        return bool(agreed)

    def exit(self, where: str) -> None:
        raise Stopped(self.signum, f"stopped by {signal.Signals(self.signum).name} {where}")


@contextlib.contextmanager
def graceful():
    """Within the block, SIGINT and SIGTERM set a stop request instead of interrupting."""
    request = _Request()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
