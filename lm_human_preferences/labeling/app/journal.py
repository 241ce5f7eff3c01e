"""An append-only journal of JSON events, one a line, each on disk before `append` returns.

The labeling app keeps every answer, skip and undo here first; the label file is then folded
from it. A crash can only leave the last line half written: reading drops such a line (and
cuts it off the file, so later lines start clean); any other unreadable line is an error.
"""

import json
import os
from pathlib import Path

from lm_human_preferences.utils.errors import UserError


class Journal:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.events = self._read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, torn = lines[:-1], lines[-1]
        if torn:  # no newline after the last event: it was being written when the process stopped
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(torn))
                f.flush()
                os.fsync(f.fileno())
        events = []
        for number, line in enumerate(complete, 1):
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{self.path}: line {number} is not a JSON event ({e}); the journal was edited "
                                "or damaged") from None
            if not isinstance(event, dict):
                raise UserError(f"{self.path}: line {number} is not a JSON object")
            events.append(event)
        return events

    def append(self, event: dict) -> None:
        self._file.write(json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.events.append(event)

    def close(self) -> None:
        self._file.close()
