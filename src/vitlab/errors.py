"""The exception type the CLI turns into a one-line message (exit code 2), and the checks that raise it."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing


class VitlabError(ValueError):
    """A problem with the user's input (bad path, corrupt file, mismatched weights, ...).

    Subclasses ValueError so library callers can catch either.
    """


class MissingField(VitlabError, KeyError):
    """A required key is absent from a file's JSON object; also a KeyError, so `except KeyError` still works."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def check_fields(cls: type, d: dict, what: str, *, ignore: tuple[str, ...] = ()) -> None:
    """Refuse keys of `d` that are not fields of dataclass `cls` (a typo must not be silently dropped), and
    values whose type does not fit the field's annotation (a "width": "64" in a config.json)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known - set(ignore))
    source = getattr(d, "source", None)  # set on JSON read by vitlab.weights.read_json
    where = f"{source}: " if source else ""
    if unknown:
        raise VitlabError(f"{where}unknown {what} fields {unknown}; known fields: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for k in sorted(set(d) & known):
        if not fits(d[k], hints[k]):
            raise VitlabError(f"{where}{what} field {k!r} must be {describe_type(hints[k])}, got {d[k]!r}")


def fits(value, annotation) -> bool:
    """Does `value` (from JSON or keyword arguments) fit a field annotation? Unknown annotations fit anything."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple or annotation is tuple or origin is list or annotation is list:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            return all(fits(v, args[0]) for v in value) if args else True
        return not args or (len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args)))
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (dict, annotation))
    return True


def describe_type(annotation) -> str:
    """'an integer', 'a number or null', ... for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
             type(None): "null"}
    if annotation in names:
        return names[annotation]
    if origin in (tuple, list) or annotation in (tuple, list):
        fixed = args and args[-1] is not Ellipsis and origin is tuple
        return f"a list of {len(args)} values" if fixed else "a list"
    if dataclasses.is_dataclass(annotation):
        return "an object"
    return str(annotation)


def check_count(value, name: str, source: str) -> int:
    """A non-negative integer field (a step or epoch counter) read from `source`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise VitlabError(f"{source}: field {name!r} must be a non-negative integer, got {value!r}")
    return int(value)


def check_number(value, name: str, source: str, *, minimum: float | None = None) -> float:
    """A finite number field (seconds, a learning rate) read from `source`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise VitlabError(f"{source}: field {name!r} must be a finite number{bound}, got {value!r}")
    return float(value)
