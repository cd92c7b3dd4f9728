"""A parameter written as plain text (qwen3_coder's XML) becomes the JSON value its schema's type names, as
vLLM's Qwen3CoderToolParser converts it: a value that does not convert stays the model's text (a boolean other
than true/false is false), and a parameter the tool does not declare is a string.
"""
import ast
import json
import math

STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")
INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")
NULLS = ("null", "none")   # Qwen3.5's template writes a null argument as Python's None


def convert(text: str, schema) -> object:
    """text: the value between the tags; schema: the parameter's (None: not declared)."""
    if not isinstance(schema, dict):
        return text
    kind, nullable = _type(schema)
    if nullable and text.lower() in NULLS:
        return None
    if kind in STRING_TYPES:
        return text
    if text.lower() in NULLS:
        return None
    if kind.startswith(INT_PREFIXES):
        try:
            return int(text)
        except ValueError:
            return text
    if kind.startswith(("num", "float")):
        return _number(text)
    if kind in ("boolean", "bool", "binary"):
        return text.lower() == "true"
    return _literal(text, kind in ("object", "array", "arr") or kind.startswith(("dict", "list")))


def _type(schema: dict) -> tuple[str, bool]:
    """(the first type that is not null, whether null is allowed): from type (a name or a list) or anyOf/oneOf."""
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    else:
        names = [o["type"] for o in schema.get("anyOf") or schema.get("oneOf") or []
                 if isinstance(o, dict) and "type" in o]
        names = names or ["string"]
    names = [str(n).strip().lower() for n in names]
    kinds = [n for n in names if n != "null"]
    return (kinds[0] if kinds else "null"), "null" in names


def _number(text: str):
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):   # JSON has no inf/nan
        return text
    return int(value) if value.is_integer() else value


def _literal(text: str, container: bool):
    """JSON for objects and arrays (a JSON string holding a Python repr read once more), else a Python literal
    ({'a': 1}, True, None); text that is neither, or a value JSON cannot hold, stays text."""
    value = _json(text) if container else _NOT_JSON
    if value is _NOT_JSON:
        value = _literal_or(text, text)
    if container and isinstance(value, str) and value is not text:   # a string holding a repr: read once more
        value = _literal_or(value, value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):   # a set, bytes, complex, inf: not JSON
        return text
    return value


_NOT_JSON = object()


def _json(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return _NOT_JSON


def _literal_or(text: str, default):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return default
