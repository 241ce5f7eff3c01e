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
        _check_end(text, pos + 1, source)
        return
    index = 0
    while True:
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}: invalid JSON in record {index} (line {e.lineno}, column {e.colno}: "
                            f"{e.msg}); the file may be truncated, download it again") from None
        except (ValueError, RecursionError) as e:  # an integer too long to read, or nesting too deep
            raise UserError(f"{source}: record {index} cannot be read ({type(e).__name__}: {e})") from None
        yield record
        index += 1
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            _check_end(text, pos + 1, source)
            return
        else:
            raise UserError(f"{source}: invalid JSON after record {index - 1} (expected ',' or ']'); "
                            "the file may be truncated, download it again")


def _check_end(text: str, pos: int, source: str) -> None:
    """Nothing but whitespace may follow the list: more is two files joined, or a broken copy."""
    rest = _WHITESPACE.match(text, pos).end()
    if rest < len(text):
        line = text.count("\n", 0, rest) + 1
        raise UserError(f"{source}: unexpected data after the JSON list (line {line}, column "
                        f"{rest - text.rfind(chr(10), 0, rest)}: {text[rest:rest + 20]!r}); two files joined or a "
                        "broken copy? Download or write the file again")
