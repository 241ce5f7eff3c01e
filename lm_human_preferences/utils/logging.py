"""Console and TensorBoard output; only rank 0 writes anything."""

import threading
from pathlib import Path

from tqdm import tqdm

from lm_human_preferences.utils import distributed


def print_main(*args) -> None:
    """Print on rank 0 only, without breaking an active tqdm bar."""
    if distributed.is_main():
        tqdm.write(" ".join(str(a) for a in args))


def progress(total: int, desc: str, unit: str):
    return tqdm(total=total, desc=desc, unit=unit, disable=not distributed.is_main(), dynamic_ncols=True)


def _quiet_event_writer_errors() -> None:
    """TensorBoard writes events in a thread; an OSError there (a full disk) is raised again in the
    thread that writes, flushes or closes next, which reports it in one line. The thread's own
    traceback, printed first by `threading.excepthook`, is left out."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "quiet_event_writer", False):
        return

    def hook(args) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiet_event_writer = True
    threading.excepthook = hook


class ScalarLog:
    """TensorBoard scalars under `tb_dir` (rank 0, when a folder is given)."""

    def __init__(self, tb_dir: Path | None):
        self.writer = None
        if tb_dir is not None and distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            _quiet_event_writer_errors()
            self.writer = SummaryWriter(str(tb_dir))

    def scalars(self, stats: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in stats.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_stats(stats: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in stats.items())
