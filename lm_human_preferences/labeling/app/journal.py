"""The journal of an earlier version of the labeling app, migrated into the database once.

That version kept every answer, skip and undo in FILE.journal.jsonl, one JSON event a line,
each appended and fsynced before it was confirmed, and its questions in FILE.questions.json; the
database (store.py) holds them now. A crash can only have left the last line half written:
reading drops such a line; any other unreadable line is an error. Events are checked for the
keys and types replaying them needs. Once migrated, the journal is renamed FILE.journal.jsonl.migrated.
"""

import json
from pathlib import Path

from lm_human_preferences.labeling import label_types
from lm_human_preferences.labeling.app import questions
from lm_human_preferences.labeling.app.label_writer import record_prefix
from lm_human_preferences.labeling.app.store import Store
from lm_human_preferences.utils.errors import UserError

_KEYS = {"answer": {"seq": int, "id": int, "session": str}, "undo": {"seq": int, "undo": int, "session": str}}


def migrate(store: Store, paths: dict[str, Path], label_type: label_types.LabelType) -> None:
    """Copy the journal `paths["journal.jsonl"]` (and its questions file) into the database unless
    it was, within the caller's transaction: the replay that follows checks it, and rolls it back
    if it does not replay."""
    legacy = paths["journal.jsonl"]
    if not legacy.exists() or store.meta("migrated") is not None:
        return
    if store.count_questions() or store.count_events():
        raise UserError(f"{store.path} and {legacy} both hold answers; keep one of them")
    items: list[questions.Item] = []
    if paths["questions.json"].exists():
        type_name, items = questions.load(paths["questions.json"])
        if type_name != label_type.name:
            raise UserError(f"{paths['questions.json']} holds {type_name} questions, not {label_type.name}")
    records = [record_prefix(label_type, it.question) for it in items]
    store.migrate(items, records, read(legacy), legacy.name)


def retire(paths: dict[str, Path]) -> None:
    """Rename the journal, once the database holds its events for good."""
    legacy = paths["journal.jsonl"]
    if legacy.exists():
        legacy.replace(legacy.with_name(legacy.name + ".migrated"))


def read(path: Path) -> list[dict]:
    """The complete events of the journal at `path`, in order."""
    lines = Path(path).read_bytes().split(b"\n")[:-1]  # the part after the last newline was cut short
    events = []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{path}: line {number} is not a JSON event ({e}); the journal was edited "
                            "or damaged") from None
        problem = _problem(event, len(events))
        if problem:
            raise UserError(f"{path}: line {number} {problem}; the journal was edited or damaged")
        events.append(event)
    return events


def _problem(event, seq: int) -> str | None:
    if not isinstance(event, dict):
        return "is not a JSON object"
    keys = _KEYS.get(event.get("event"))
    if keys is None:
        return f"is an unknown event {event.get('event')!r}"
    for key, kind in keys.items():
        if type(event.get(key)) is not kind:
            return f"lacks {key!r} (a {kind.__name__})"
    if event["seq"] != seq:
        return f"is event {event['seq']}, not {seq}"
    label = event.get("label")
    if event["event"] == "answer" and label is not None and type(label) is not int:
        return "has a label that is not an integer"
    if not isinstance(event.get("time", 0.0), (int, float)):
        return "has a time that is not a number"
    return None
