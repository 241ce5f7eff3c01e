"""Decoding a large JSON list one item at a time, so its items can be compacted as they come."""

import json
import re
from collections.abc import Iterator

from lm_human_preferences.utils.errors import UserError

_WHITESPACE = re.compile(r"\s*")


def json_list_items(text: str, source: str) -> Iterator:
    """Yield the items of the JSON list in `text` one by one (errors name `source`)."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, 1 if text.startswith("\ufeff") else 0).end()  # skip a byte order mark
    if not text.startswith("[", pos):
        raise UserError(f"{source}: the file must be a JSON list of records")
    pos = _WHITESPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    index = 0
    while True:
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}: invalid JSON in record {index} (line {e.lineno}, column {e.colno}: "
                            f"{e.msg}); the file may be truncated, download it again") from None
        yield record
        index += 1
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return
        else:
            raise UserError(f"{source}: invalid JSON after record {index - 1} (expected ',' or ']'); "
                            "the file may be truncated, download it again")
