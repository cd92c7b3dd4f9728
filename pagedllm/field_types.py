"""A dataclass's field values checked against their annotations, for configs that Python callers fill directly
(LLM(...), a speculative_config dict) with no argparse in between: a wrong type is a ValueError naming the field,
not a TypeError from a comparison deep inside, nor a value taken as something else ('yes' for True)."""
import json
import math
import os
import typing
from dataclasses import fields

_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string", dict: "a dict",
          type(None): "None"}


def json_object(value, name: str) -> dict | None:
    """A config given as JSON text (the CLI) or a dict (Python callers), as a dict (None stays None)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"{name} must be a JSON object: {e}") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r:.100}")
    return value


def is_int(value) -> bool:
    """An int that is no bool (bool is an int subclass: True is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_types(obj, prefix: str = "") -> None:
    """Each field of dataclass obj of its annotated type: an int no bool, a float any finite number, a str also
    a path (made a str), list[X] a list of X; metadata python_types replaces the annotation (what Python callers
    may pass besides the CLI's text, e.g. a dict for JSON)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        allowed = typing.get_args(f.type) if isinstance(f.type, type(int | None)) else (f.type,)
        if "python_types" in f.metadata:
            allowed = (*f.metadata["python_types"], *(t for t in allowed if t is type(None)))
        if str in allowed and isinstance(value, os.PathLike):
            setattr(obj, f.name, value := os.fspath(value))
        if isinstance(value, float) and float in allowed and not math.isfinite(value):
            raise ValueError(f"{prefix}{f.name} must be a finite number, got {value!r}")
        if not any(_of_type(value, t) for t in allowed):
            raise ValueError(f"{prefix}{f.name} must be {' or '.join(map(_name, allowed))}, got {value!r:.200}")


def _of_type(value, t) -> bool:
    if typing.get_origin(t) is list:
        return isinstance(value, list) and all(_of_type(v, typing.get_args(t)[0]) for v in value)
    if t is type(None):
        return value is None
    if t is int:
        return is_int(value)
    if t is float:
        return is_number(value)
    return isinstance(value, t)


def _name(t) -> str:
    if typing.get_origin(t) is list:
        return "a list of " + {"an integer": "integers", "a number": "numbers"}.get(_name(typing.get_args(t)[0]),
                                                                                  str(typing.get_args(t)[0]))
    return _NAMES.get(t, str(t))
