"""Nested dataclass hyper-parameters with dotted overrides, as the original's `hyperparams.py`.

A hyper-parameter set is a dataclass deriving from `HParams`. Fields may be plain values
(bool, int, float, str, or Optional of those), nested `HParams` groups, or optional groups
(`Optional[SomeGroup] = None`) that are switched with `on` / `off`:

    hp.override_from_str("ppo.lr", "1e-5")
    hp.override_from_str("rewards.adaptive_kl", "on")
    hp.override_from_str("rewards.adaptive_kl.target", "6.0")   # also switches the group on

Unknown keys and unparsable values raise `UserError` naming the key, the value and, for
unknown keys, the nearest valid ones across the nested groups (`labels.source` suggests
`rewards.train_new_model.labels.source`).
"""

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Union

from lm_human_preferences.utils.errors import UserError

_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}
_NONE = {"none", "null"}
_CLOSE = 0.75  # the least difflib ratio of a key suggested for a misspelt one


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `Optional[X]` / `X | None`; (tp, False) otherwise."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, HParams)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(text)


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        as_float = float(text)  # accept "1e6" for integer fields when it is integral
        if not as_float.is_integer():
            raise
        return int(as_float)


_PARSERS = {bool: _parse_bool, int: _parse_int, float: float, str: str}


def _parse_scalar(key: str, tp: Any, text: str) -> Any:
    parse = _PARSERS.get(tp)
    if parse is None:
        raise UserError(f"hparam {key!r} has type {tp}, which cannot be set from text")
    try:
        return parse(text)
    except ValueError:
        raise UserError(f"hparam {key!r}: cannot parse {text!r} as {tp.__name__}") from None


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Type-check a Python value (from a dict or JSON) for a plain field, coercing int → float."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"hparam {key!r} may not be None")
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if inner in (bool, int, float, str) and (type(value) is not inner):
        raise UserError(f"hparam {key!r} must be {inner.__name__}, got {value!r} ({type(value).__name__})")
    return value


@dataclasses.dataclass
class HParams:
    """Base class for hyper-parameter dataclasses; subclasses are `@dataclass`es."""

    def _field_types(self) -> dict[str, Any]:
        hints = typing.get_type_hints(type(self))
        return {f.name: hints[f.name] for f in dataclasses.fields(self)}

    def _unknown(self, prefix: str, key: str) -> UserError:
        """The error for the dotted `key` below this group, which names no field: it suggests the
        keys below the group that end with `key` (given without its outer groups, as
        `labels.source` for `rewards.train_new_model.labels.source`), else those spelt nearly
        like it, else lists the valid keys here."""
        close = nearest_keys(key, _all_keys(self, ""))
        if close:
            hint = "; did you mean " + _one_of([repr(prefix + k) for k in close]) + "?"
        else:
            hint = f"; valid keys here: {', '.join(prefix + n for n in self._field_types())}"
        return UserError(f"unknown hparam {prefix + key!r}{hint}")

    def override_from_str(self, key: str, text: str, _prefix: str = "") -> None:
        """Set the dotted `key` from its text form, parsed by the field's type."""
        name, _, rest = key.partition(".")
        types_ = self._field_types()
        if name not in types_:
            raise self._unknown(_prefix, key)
        inner, optional = _unwrap_optional(types_[name])
        full = _prefix + name
        if _is_group(inner):
            if rest:
                group = getattr(self, name)
                if group is None:  # setting a field of an optional group switches it on
                    group = inner()
                    setattr(self, name, group)
                group.override_from_str(rest, text, _prefix=full + ".")
                return
            lowered = text.strip().lower()
            if optional and lowered in _TRUE:
                if getattr(self, name) is None:
                    setattr(self, name, inner())
            elif optional and (lowered in _FALSE or lowered in _NONE):
                setattr(self, name, None)
            else:
                what = "'on' or 'off'" if optional else "a field below it, e.g. " + f"{full}.<field>"
                raise UserError(f"hparam {full!r} is a group; set it with {what}, not {text!r}")
            return
        if rest:
            raise self._unknown(_prefix, key)
        if optional and text.strip().lower() in _NONE:
            setattr(self, name, None)
        else:
            setattr(self, name, _parse_scalar(full, inner, text))

    def override_from_flags(self, flags: dict[str, str]) -> None:
        """Set every `--key value` of a command line, in order (`override_from_str`). A field of an
        optional group that the same command line switches off is refused, in either order: which
        of the two was meant is not clear."""
        for key, text in flags.items():
            self.override_from_str(key, text)
        for key, text in flags.items():
            inside = [k for k in flags if k.startswith(key + ".")]
            if inside and text.strip().lower() in _FALSE | _NONE:
                raise UserError(f"--{inside[0]} sets a field of {key}, which --{key} {text} switches off; "
                                f"drop one of the two (setting a field switches its group on)")

    def override_from_dict(self, values: dict[str, Any], _prefix: str = "") -> None:
        """Set fields from a (possibly nested) dict of Python values, e.g. parsed JSON.

        Keys may be nested dicts or dotted paths; a group given as None switches it off.
        """
        types_ = self._field_types()
        for key, value in values.items():
            name, _, rest = key.partition(".")
            if name not in types_:
                raise self._unknown(_prefix, key)
            inner, optional = _unwrap_optional(types_[name])
            full = _prefix + name
            if rest:
                value = {rest: value}
            if _is_group(inner):
                if value is None:
                    if not optional:
                        raise UserError(f"hparam group {full!r} cannot be switched off")
                    setattr(self, name, None)
                    continue
                if not isinstance(value, dict):
                    raise UserError(f"hparam group {full!r} needs a dict of its fields, got {value!r}")
                group = getattr(self, name)
                if group is None:
                    group = inner()
                    setattr(self, name, group)
                group.override_from_dict(value, _prefix=full + ".")
            elif rest:
                raise self._unknown(_prefix, key)
            else:
                setattr(self, name, _check_value(full, types_[name], value))

    def to_nested_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self._field_types():
            value = getattr(self, name)
            out[name] = value.to_nested_dict() if isinstance(value, HParams) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_nested_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        hp = cls()
        hp.override_from_dict(values)
        return hp

    @classmethod
    def from_json(cls, text: str):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"hparams JSON is malformed ({e}); re-save it or fix the file") from None
        if not isinstance(values, dict):
            raise UserError("hparams JSON must be an object of fields")
        return cls.from_dict(values)

    def validate(self, _prefix: str = "") -> None:
        """Check every field's type recursively; subclasses extend with semantic checks."""
        for name, tp in self._field_types().items():
            value = getattr(self, name)
            inner, _ = _unwrap_optional(tp)
            if _is_group(inner):
                if value is None:
                    _check_value(_prefix + name, tp, value)
                elif not isinstance(value, inner):
                    raise UserError(f"hparam group {_prefix + name!r} holds {value!r}, not {inner.__name__}")
                else:
                    value.validate(_prefix=_prefix + name + ".")
            else:
                _check_value(_prefix + name, tp, value)


def _all_keys(hp: HParams, prefix: str) -> set[str]:
    """Every dotted key reachable below `hp` (optional groups expanded with their defaults)."""
    keys = set()
    for name, tp in hp._field_types().items():
        inner, _ = _unwrap_optional(tp)
        keys.add(prefix + name)
        if _is_group(inner):
            group = getattr(hp, name) or inner()
            keys |= _all_keys(group, prefix + name + ".")
    return keys


def nearest_keys(key: str, keys: set[str], n: int = 3) -> list[str]:
    """Up to `n` of `keys` nearest the dotted `key`: those that end with it, else those whose
    spelling (whole, or of as many last parts as `key` has) is close to it, nearest first."""
    ending = sorted((k for k in keys if k == key or k.endswith("." + key)), key=lambda k: (len(k), k))
    if ending:
        return ending[:n]
    depth = key.count(".") + 1
    scores = {k: max(_similarity(key, k), _similarity(key, ".".join(k.split(".")[-depth:]))) for k in keys}
    close = [k for k in keys if scores[k] >= _CLOSE]
    return sorted(close, key=lambda k: (-scores[k], len(k), k))[:n]


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
