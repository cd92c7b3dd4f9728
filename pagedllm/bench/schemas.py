"""JSON schemas for structured-output benchmarks: no answer under any of them can complete within max_tokens,
so constrained and plain runs generate the same number of tokens (the issue's "run to max_tokens").

An unbounded string or array is not enough: a random-weight model at temperature 1 samples a closing token
sooner or later (57 of W1's 256 answers closed early on the H200). Here each schema's last required property
is an array whose minItems makes the shortest valid answer longer, in bytes, than COVERS_MAX_TOKENS tokens of
LONGEST_TOKEN_BYTES each can spell, so the grammar offers no way to close before max_tokens. The items are
realistic (nested objects, enums, bounded numbers, anyOf, patterns, strings) so the mask fill is real work.
"""
import json
import math

COVERS_MAX_TOKENS = 1024     # W1's longest output (bench/workloads.py)
LONGEST_TOKEN_BYTES = 128    # the Qwen2/Qwen3 vocabulary's longest token (80 spaces are 80 bytes; this: 128)


def min_json_bytes(schema: dict) -> int:
    """A lower bound on the bytes of any JSON text valid under schema (no whitespace, shortest values)."""
    if "const" in schema:
        return len(json.dumps(schema["const"]))
    if "enum" in schema:
        return min(len(json.dumps(v)) for v in schema["enum"])
    if "anyOf" in schema or "oneOf" in schema:
        return min(min_json_bytes(s) for s in schema.get("anyOf", schema.get("oneOf")))
    kind = schema.get("type")
    if kind == "object":
        required = schema.get("required", [])
        fields = sum(len(json.dumps(k)) + 1 + min_json_bytes(schema["properties"][k]) for k in required)
        return 2 + fields + max(len(required) - 1, 0)
    if kind == "array":
        n = schema.get("minItems", 0)
        return 2 + n * min_json_bytes(schema.get("items", {})) + max(n - 1, 0)
    if kind == "string":
        return 2 + schema.get("minLength", 0)   # a pattern's own minimum is not counted: a lower bound
    return {"boolean": 4, "null": 4}.get(kind, 1)   # a number: one digit


def run_on(items: dict) -> dict:
    """An array of items too long to close within COVERS_MAX_TOKENS tokens (each item's comma counted)."""
    budget = COVERS_MAX_TOKENS * LONGEST_TOKEN_BYTES
    return {"type": "array", "items": items, "minItems": math.ceil(budget / (min_json_bytes(items) + 1)) + 1}


def _obj(properties: dict, optional: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": [k for k in properties if k not in optional]}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_LEVEL = {"type": "string", "enum": ["debug", "info", "warning", "error"]}

RUN_ON_SCHEMAS = [
    _obj({"order_id": {"type": "integer", "minimum": 1}, "status": {"enum": ["open", "paid", "shipped"]},
          "customer": _obj({"name": _STR, "tier": {"enum": ["free", "pro", "enterprise"]}}),
          "lines": run_on(_obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                                "qty": {"type": "integer", "minimum": 1, "maximum": 100},
                                "price": {"type": "number", "minimum": 0}}))}),
    _obj({"service": {"enum": ["api", "db", "cache"]},
          "events": run_on(_obj({"level": _LEVEL, "ts": _INT, "message": _STR}))}),
    _obj({"columns": {"type": "array", "items": _STR, "minItems": 3, "maxItems": 3},
          "rows": run_on({"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3})}),
    _obj({"title": _STR, "turns": run_on(_obj({"role": {"enum": ["user", "assistant"]}, "content": _STR}))}),
    _obj({"type": {"const": "FeatureCollection"},
          "features": run_on(_obj({"type": {"const": "Feature"},
                                   "geometry": _obj({"type": {"const": "Point"},
                                                     "coordinates": {"type": "array", "items": {"type": "number"},
                                                                     "minItems": 2, "maxItems": 2}}),
                                   "properties": _obj({"name": _STR, "population": _INT},
                                                      optional=("population",))}))}),
    _obj({"document": _STR,
          "sections": run_on(_obj({"heading": _STR, "level": {"type": "integer", "minimum": 1, "maximum": 6},
                                   "bullets": {"type": "array", "items": _STR, "maxItems": 4}}))}),
    _obj({"metric": _STR, "unit": {"enum": ["ms", "bytes", "count"]},
          "points": run_on(_obj({"t": _INT, "v": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                                 "ok": {"type": "boolean"}}))}),
    _obj({"query": _STR,
          "results": run_on(_obj({"url": {"type": "string", "pattern": "^https://[a-z0-9.-]+/[a-z0-9/_-]*$"},
                                  "score": {"type": "number", "minimum": 0, "maximum": 1},
                                  "tags": {"type": "array", "items": {"enum": ["news", "blog", "docs", "code"]},
                                           "maxItems": 3}}))}),
]
