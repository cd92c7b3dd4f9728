"""A constraint (StructuredOutputsParams) as an xgrammar Grammar: what the compile pool compiles, and the check
that refuses a bad schema, regex or grammar where the request enters (no tokenizer needed).

xgrammar is imported inside the functions: the plain generate path never loads it.
"""
import json
import re
from collections import OrderedDict

from pagedllm.structured_output.lark_ebnf import grammar_is_lark, lark_to_ebnf
from pagedllm.structured_output.params import StructuredOutputsParams

FIELD = "SamplingParams.structured_outputs"


def build_grammar(p: StructuredOutputsParams):
    """The xgrammar.Grammar of p's one constraint. Raises ValueError naming the field for one xgrammar refuses."""
    kind = p.kind
    try:
        return _BUILDERS[kind](p)
    except ValueError:
        raise
    except Exception as e:   # xgrammar's own errors (RuntimeError, InvalidJSONError, ...): the user's input
        raise ValueError(f"{FIELD}.{kind} is invalid: {_first_line(e)}") from e


def validate(p: StructuredOutputsParams) -> None:
    """A constraint that cannot become a grammar is a ValueError now, before the request is queued. Constraints
    seen valid are remembered by key (a bounded set): a schema sent with every request is parsed once."""
    key = p.key()
    if key in _valid:
        _valid.move_to_end(key)
        return
    build_grammar(p)
    _valid[key] = None
    if len(_valid) > MAX_VALID_KEYS:
        _valid.popitem(last=False)


MAX_VALID_KEYS = 4096
_valid: OrderedDict = OrderedDict()


def choice_ebnf(choices: list[str]) -> str:
    """root ::= "a" | "b" ...: each choice an EBNF string literal, escaped so quotes, backslashes, newlines and
    any other character stand for themselves."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def _ebnf_literal(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:   # \u: exactly 4 digits (xgrammar's \x takes every hex digit after it)
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)   # xgrammar reads its EBNF as UTF-8: other characters are literal
    return '"' + "".join(out) + '"'


def _json(p: StructuredOutputsParams):
    import xgrammar as xgr
    schema = _json_dict(p.json, "json", "a JSON schema object")
    schema = fold_into_branches(merge_all_of(schema))
    if schema is False:   # an allOf with a false part (xgrammar's own message would name no field)
        raise ValueError(f"{FIELD}.json is invalid: Schema 'false' cannot accept any value")
    refuse_unenforced(schema, root=schema)
    if p.disable_additional_properties:
        schema = no_additional_properties(schema)
    schema = json_safe_lengths(schema)
    return xgr.Grammar.from_json_schema(schema, any_whitespace=not p.disable_any_whitespace)


def _json_dict(value, name: str, what: str) -> dict:
    """A dict, or JSON text of one; anything else a ValueError naming the field."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{FIELD}.{name} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{FIELD}.{name} must be {what}, got {type(value).__name__}")
    return value


def _json_object(p: StructuredOutputsParams):
    # xgrammar's builtin JSON grammar is any JSON value; json_object is an object only.
    import xgrammar as xgr
    return xgr.Grammar.from_json_schema({"type": "object"}, any_whitespace=not p.disable_any_whitespace,
                                        strict_mode=False)


def _regex(p: StructuredOutputsParams):
    import xgrammar as xgr
    return xgr.Grammar.from_regex(p.regex)


def _choice(p: StructuredOutputsParams):
    import xgrammar as xgr
    return xgr.Grammar.from_ebnf(choice_ebnf(p.choice))


def _grammar(p: StructuredOutputsParams):
    """EBNF as it is; Lark (no line has `::=`, vLLM's test) converted to EBNF first (lark_ebnf.py)."""
    import xgrammar as xgr
    if not grammar_is_lark(p.grammar):
        return xgr.Grammar.from_ebnf(p.grammar)
    where = f"{FIELD}.grammar (read as Lark: no line has '::=')"
    try:
        ebnf = lark_to_ebnf(p.grammar)
    except ValueError as e:
        raise ValueError(f"{where} cannot be converted to EBNF: {e}") from e
    try:
        return xgr.Grammar.from_ebnf(ebnf)
    except Exception as e:
        raise ValueError(f"{where} is invalid once converted to EBNF: {_first_line(e)}") from e


def _structural_tag(p: StructuredOutputsParams):
    """xgrammar's format ({"type": "structural_tag", "format": {...}}), or vLLM's older one
    ({"structures": [{"begin", "schema", "end"}], "triggers": [...]})."""
    import xgrammar as xgr
    tag = _json_dict(p.structural_tag, "structural_tag", "a JSON object")
    if "structures" not in tag:
        return xgr.Grammar.from_structural_tag(tag)
    items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
             for s in tag["structures"]]
    return xgr.Grammar.from_structural_tag(items, tag.get("triggers", []))


_BUILDERS = {"json": _json, "json_object": _json_object, "regex": _regex, "choice": _choice,
             "grammar": _grammar, "structural_tag": _structural_tag}


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems")


def map_schemas(schema, fn):
    """A copy of schema with fn applied to it and to every schema inside it (only keywords that hold schemas:
    a property named "properties" is a name, not a keyword)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: map_schemas(s, fn) for name, s in out[key].items()}
    for key in _SCHEMA_LISTS + _SUBSCHEMAS:
        value = out.get(key)
        if isinstance(value, list):
            out[key] = [map_schemas(s, fn) for s in value]
        elif isinstance(value, dict):
            out[key] = map_schemas(value, fn)
    return fn(out)


def no_additional_properties(schema):
    """vLLM's disable_additional_properties: additionalProperties false on every object schema leaving it unset."""
    def close(s: dict) -> dict:
        if (s.get("type") == "object" or "properties" in s) and "additionalProperties" not in s:
            s["additionalProperties"] = False
        return s
    return map_schemas(schema, close)


def json_safe_lengths(schema):
    """xgrammar 0.2.9 writes a string with minLength/maxLength as "any character but quote, backslash, CR, LF"
    {min,max}: raw control characters get in (invalid JSON), and so do UTF-8 byte sequences of surrogates and
    overlong forms (text that decodes to U+FFFD, more characters than maxLength). The same bounds as a pattern
    over the characters JSON allows unescaped, named as code point ranges, keep the string valid."""
    def bound(s: dict) -> dict:
        # a type list too ({"type": ["string", "null"]}): xgrammar bounds its strings the same way, and a pattern
        # holds for strings only
        types = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
        if "string" not in types or "pattern" in s or "format" in s:
            return s
        if "minLength" not in s and "maxLength" not in s:
            return s
        low, high = s.pop("minLength", 0), s.pop("maxLength", "")
        s["pattern"] = f"^{JSON_STRING_CHAR}{{{low},{high}}}$"
        return s
    return map_schemas(schema, bound)


# What xgrammar 0.2.9 takes in a schema but does not enforce: a violating instance passes its matcher (probed in
# tests/unit/test_structured_grammar_spec.py). A schema using one is refused, never followed in part. allOf is not
# enforced either, so merge_all_of folds its parts into their schema first (pydantic writes allOf: [{$ref}]).
UNENFORCED = ("not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
              "dependentRequired", "dependentSchemas", "dependencies")
# Formats with a syntax JSON Schema defines that xgrammar does not check (it checks email, uri, uri-reference,
# uri-template, uuid, date, time, date-time, duration, ipv4, ipv6, hostname, json-pointer,
# relative-json-pointer). Other format values define nothing to check: annotations, as the spec treats them.
UNENFORCED_FORMATS = ("idn-email", "iri", "iri-reference", "idn-hostname", "regex")
NUMBER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
ANNOTATIONS = ("title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
               "contentEncoding", "contentMediaType", "$schema", "$id", "discriminator")   # OpenAPI's: a hint
# Formats xgrammar writes a grammar of its own for: a minLength / maxLength beside one is not applied.
CHECKED_FORMATS = ("email", "uri", "uri-reference", "uri-template", "uuid", "date", "time", "date-time", "duration",
                   "ipv4", "ipv6", "hostname", "json-pointer", "relative-json-pointer")
# Keywords that hold for one JSON type. xgrammar applies them only where the schema's "type" (or, for objects
# and arrays, "properties" / "items") says which type it is: without one they are dropped.
TYPED_KEYWORDS = {"string": ("minLength", "maxLength", "pattern", "format"),
                  "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
                  "array": ("minItems", "maxItems"),
                  "object": ("required", "minProperties", "maxProperties", "propertyNames")}
_INFERRED = {"object": ("properties", "patternProperties", "additionalProperties"), "array": ("items", "prefixItems")}
_STRUCTURE = ("$defs", "definitions")


def merge_all_of(schema):
    """Each allOf folded into its schema: the parts' keywords and the schema's own, where none is given two
    different values (then the schema is refused: the intersection would need the backend to enforce allOf)."""
    def merge(s: dict) -> dict:
        if not isinstance(s.get("allOf"), list):
            return s
        return _intersect({k: v for k, v in s.items() if k != "allOf"}, s["allOf"], "allOf")
    return map_schemas(schema, merge)


def _intersect(out: dict, parts: list, where: str) -> dict | bool:
    """out with each part's keywords added; a keyword two of them give different values refuses the schema."""
    out = dict(out)
    for part in parts:
        if part is False:   # no instance: so is the intersection (dropped, it read as the other parts alone)
            return False
        for key, value in (part.items() if isinstance(part, dict) else ()):
            if key in out and out[key] != value:
                raise ValueError(f"{FIELD}.json: {where} gives {key!r} two values; the grammar backend "
                                 "(xgrammar) cannot intersect them, so the schema is refused")
            out[key] = value
    return out


def fold_into_branches(schema):
    """anyOf / oneOf beside other keywords: xgrammar follows the branches alone and drops the rest ({"type":
    "string", "maxLength": 1, "anyOf": [...]} took "ab" and 5). The other keywords go into each branch instead
    (A and (B or C) is (A and B) or (A and C)), as allOf's parts are merged."""
    def fold(s: dict) -> dict:
        combinators = [k for k in ("anyOf", "oneOf") if isinstance(s.get(k), list)]
        if not combinators:
            return s
        if len(combinators) > 1:
            raise ValueError(f"{FIELD}.json: anyOf beside oneOf is not enforced by the grammar backend "
                             "(xgrammar): the schema is refused rather than followed in part")
        key = combinators[0]
        rest = {k: v for k, v in s.items() if k != key and k not in ANNOTATIONS and k not in _STRUCTURE}
        if not rest:
            return s
        out = {k: v for k, v in s.items() if k not in rest}
        out[key] = [_intersect(rest, [branch], f"{key} beside {sorted(rest)[0]!r}") if branch is not True
                    else dict(rest) for branch in s[key]]
        return out
    return map_schemas(schema, fold)


def refuse_unenforced(schema, path: str = "#", root=None) -> None:
    """A ValueError naming the first keyword of UNENFORCED (and the like) in schema, with its path; root: the
    whole schema, where a branch's local $ref is looked up."""
    if not isinstance(schema, dict):
        return
    root = schema if root is None else root

    def refuse(what: str):
        raise ValueError(f"{FIELD}.json: {what} at {path} is not enforced by the grammar backend (xgrammar): the "
                         "schema is refused rather than followed in part")
    for key in UNENFORCED:
        if key in schema and not (key == "uniqueItems" and schema[key] is False):
            refuse(repr(key))
    if schema.get("format") in UNENFORCED_FORMATS:
        refuse(f"format {schema['format']!r}")
    if "multipleOf" in schema and (schema.get("type") != "integer" or any(k in schema for k in NUMBER_BOUNDS)):
        refuse("'multipleOf' (enforced on an integer without bounds only)")
    if "$ref" in schema and any(k not in ANNOTATIONS and k not in ("$ref", "$defs", "definitions") for k in schema):
        refuse("'$ref' beside other keywords")
    _refuse_dropped(schema, root, refuse)
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                refuse_unenforced(sub, f"{path}/{key}/{name}", root)
    for key in _SCHEMA_LISTS + _SUBSCHEMAS:
        value = schema.get(key)
        if key == "propertyNames" and isinstance(value, dict):   # names are strings: xgrammar reads them so
            value = {"type": "string", **value}
        for i, sub in enumerate(value if isinstance(value, list) else [value]):
            refuse_unenforced(sub, f"{path}/{key}/{i}" if isinstance(value, list) else f"{path}/{key}", root)


def _refuse_dropped(schema: dict, root: dict, refuse) -> None:
    """What xgrammar 0.2.9 takes but drops, each probed in tests/unit/test_structured_grammar_spec.py: a violating
    instance passes its matcher."""
    if isinstance(schema.get("oneOf"), list):   # read as anyOf: exact only where no instance matches two branches
        branches = [_resolve(b, root) for b in schema["oneOf"]]
        if not all(_disjoint(a, b) for i, a in enumerate(branches) for b in branches[i + 1:]):
            refuse("'oneOf' whose branches may overlap (it is followed as anyOf)")
    required, properties = schema.get("required"), schema.get("properties")
    if isinstance(required, list):
        missing = [name for name in required if not isinstance(properties, dict) or name not in properties]
        if missing:
            refuse(f"'required' naming a property not in 'properties' ({shorten_name(missing[0])})")
    lengths = [k for k in ("minLength", "maxLength") if k in schema]
    if lengths and ("pattern" in schema or schema.get("format") in CHECKED_FORMATS):
        refuse(f"{lengths[0]!r} beside 'pattern' or 'format'")
    if isinstance(schema.get("pattern"), str) and _regex_unsupported(schema["pattern"]):
        refuse(f"'pattern' {shorten_name(schema['pattern'])} (lookaround or a group flag)")
    values = _values(schema)
    if values is not None:
        extra = [k for k in schema if k not in ANNOTATIONS and k not in _STRUCTURE + ("enum", "const", "type")]
        if extra:
            refuse(f"{extra[0]!r} beside 'enum' or 'const'")
        if "type" in schema and not all(_of_type(v, schema["type"]) for v in values):
            refuse("'type' beside an 'enum' or 'const' value of another type")
    if "type" not in schema and values is None and not any(k in schema for k in ("$ref", "anyOf", "oneOf")):
        inferred = [t for t, keys in _INFERRED.items() if any(k in schema for k in keys)]
        for kind, keys in TYPED_KEYWORDS.items():
            dropped = [k for k in keys if k in schema]
            if dropped and kind not in inferred:
                refuse(f"{dropped[0]!r} without 'type'")


def shorten_name(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _regex_unsupported(pattern: str) -> bool:
    """A regex feature xgrammar's regex parser refuses ("Lookahead is not supported yet"), which its schema
    converter drops silently ({"pattern": "^(?=.{0,3}$)[a-z]+$"} took "abcd"). Other errors are its own 400."""
    import xgrammar as xgr
    try:
        xgr.Grammar.from_regex(pattern)
    except Exception as e:
        return "not supported" in str(e)
    return False


def _resolve(schema, root: dict):
    """A local $ref ("#/$defs/X", "#/definitions/X") as the schema it names; anything else as it is."""
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if isinstance(ref, str) and ref.startswith("#/"):
        node = root
        for part in ref[2:].split("/"):
            node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else schema
    return schema


def _values(schema: dict) -> list | None:
    """The values an enum or const allows (None: neither is given)."""
    if "const" in schema:
        return [schema["const"]]
    return list(schema["enum"]) if isinstance(schema.get("enum"), list) else None


def _types(schema: dict) -> set[str] | None:
    """The JSON types a schema allows, where it says (None: any, as far as this reads it)."""
    values = _values(schema)
    if values is not None:
        return {_type_of(v) for v in values}
    t = schema.get("type")
    if isinstance(t, str):
        t = [t]
    if not isinstance(t, list):
        return None
    return {"number" if x in ("integer", "number") else x for x in t}


def _type_of(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}[type(value)]


def _of_type(value, t) -> bool:
    names = [t] if isinstance(t, str) else t
    kind = _type_of(value)
    return any(n == kind or (n == "integer" and kind == "number" and float(value).is_integer()) for n in names)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _disjoint(a, b) -> bool:
    """Whether no instance can match both schemas, by what is plain to see: types that cannot meet, enum / const
    values in common to none, or a property both require whose enum / const values differ (a discriminator)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    ta, tb = _types(a), _types(b)
    if ta is not None and tb is not None and not ta & tb:
        return True
    va, vb = _values(a), _values(b)
    if va is not None and vb is not None and not any(_same(x, y) for x in va for y in vb):
        return True
    pa, pb = a.get("properties"), b.get("properties")
    if isinstance(pa, dict) and isinstance(pb, dict):
        for name in set(a.get("required") or ()) & set(b.get("required") or ()):
            xa, xb = pa.get(name), pb.get(name)
            if isinstance(xa, dict) and isinstance(xb, dict) and _disjoint(xa, xb):
                return True
        # the grammar's objects hold only the properties listed (xgrammar's strict mode: no additionalProperties
        # unless given), so a property one requires and the other cannot hold tells them apart
        for x, y, py in ((a, b, pb), (b, a, pa)):
            closed = y.get("additionalProperties", False) is False and "patternProperties" not in y
            if closed and any(name not in py for name in x.get("required") or ()):
                return True
    return False


# A character JSON takes unescaped: U+0020..U+10FFFF but the quote, the backslash and the surrogates.
JSON_STRING_CHAR = r"[ !#-\[\]-\uD7FF\uE000-\U0010FFFF]"


def _first_line(e: Exception) -> str:
    """xgrammar's message without its log prefix ("[04:30:58] /project/cpp/x.cc:94: "), on one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return _LOG_PREFIX.sub("", text)[:1000]


_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
