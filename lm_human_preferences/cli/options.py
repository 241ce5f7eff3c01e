"""Parsing the command lines' `--key value` options."""

import math

from lm_human_preferences.utils.errors import UserError


def parse(args: list[str], booleans: set[str]) -> dict[str, str]:
    """`--key value` / `--key=value` pairs; keys in `booleans` may stand alone (meaning true).
    A key given twice is an error: a silent "last one wins" hides a typo in a long command line."""
    flags: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}; options look like --key value (see --help)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if key in booleans and (i + 1 == len(args) or args[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise UserError(f"option --{key} needs a value")
        if key in flags:
            raise UserError(f"option --{key} is given twice ({flags[key]!r} and {value!r}); give it once")
        flags[key] = value
        i += 1
    return flags


def pop_int(flags: dict[str, str], key: str, default: int | None, minimum: int | None = None,
               meaning: str = "") -> int | None:
    """The integer value of --key (popped), at least `minimum`; `meaning` explains the bound."""
    if key not in flags:
        return default
    try:
        value = int(flags.pop(key))
    except ValueError:
        raise UserError(f"--{key} needs an integer") from None
    if minimum is not None and value < minimum:
        raise UserError(f"--{key} must be at least {minimum}{meaning}, got {value}")
    return value


def pop_float(flags: dict[str, str], key: str, default: float, positive: bool) -> float:
    """The finite number given as --key (popped): > 0 when `positive`, else ≥ 0."""
    try:
        value = float(flags.pop(key, default))
    except ValueError:
        raise UserError(f"--{key} needs a number") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise UserError(f"--{key} must be a finite {'positive' if positive else 'non-negative'} number, got {value}")
    return value


def pop_bool(flags: dict[str, str], key: str) -> bool:
    value = flags.pop(key, "false").lower()
    if value not in ("true", "false", "1", "0", "on", "off"):
        raise UserError(f"--{key} takes no value or true/false, got {value!r}")
    return value in ("true", "1", "on")
