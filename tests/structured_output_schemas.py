"""A corpus of structured-output constraints for the tests: JSON schemas, regexes, choices, EBNF grammars with a
checker for each, and Lark grammars (checked by Lark's own parser). Every string is bounded (maxLength, a bounded
pattern) and every array has a maxItems, so a tiny model's random walk through the grammar can end within a few
dozen tokens."""
import re

S = {"type": "string", "maxLength": 6}   # a short string
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}

SCHEMAS: dict[str, dict] = {
    "string": S,
    "bounded_integer": {"type": "integer", "minimum": -20, "maximum": 20},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "enum_strings": {"enum": ["red", "green", "blue"]},
    "enum_mixed": {"enum": [1, "two", None, True, 3.5]},
    "const": {"const": "fixed"},
    "flat_object": {"type": "object", "properties": {"name": S, "age": SMALL_INT}, "required": ["name", "age"]},
    "optional_fields": {"type": "object", "properties": {"a": S, "b": SMALL_INT, "c": {"type": "boolean"}},
                        "required": ["a"]},
    "all_optional": {"type": "object", "properties": {"x": SMALL_INT, "y": SMALL_INT}},
    "nested_object": {"type": "object", "required": ["user"], "properties": {
        "user": {"type": "object", "required": ["id", "email"], "properties": {
            "id": SMALL_INT, "email": {"type": "string", "pattern": "[a-z]{1,4}@[a-z]{1,4}\\.com"}}}}},
    "deeply_nested": {"type": "object", "required": ["a"], "properties": {"a": {
        "type": "object", "required": ["b"], "properties": {"b": {
            "type": "object", "required": ["c"], "properties": {"c": {"type": "boolean"}}}}}}},
    "array_bounds": {"type": "array", "items": SMALL_INT, "minItems": 1, "maxItems": 3},
    "array_exact": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
    "array_of_objects": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"k": S}, "required": ["k"]}},
    "array_of_enums": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 0, "maxItems": 4},
    "nested_arrays": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2, "items": SMALL_INT}},
    "tuple": {"type": "array", "prefixItems": [S, SMALL_INT, {"type": "boolean"}], "items": False},
    "one_of": {"oneOf": [{"type": "object", "properties": {"cat": S}, "required": ["cat"]},
                         {"type": "object", "properties": {"dog": SMALL_INT}, "required": ["dog"]}]},
    "any_of": {"anyOf": [SMALL_INT, {"type": "string", "maxLength": 3}, {"type": "null"}]},
    "any_of_in_object": {"type": "object", "required": ["v"], "properties": {
        "v": {"anyOf": [{"type": "boolean"}, {"enum": ["none"]}]}}},
    "pattern_code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "pattern_in_object": {"type": "object", "required": ["id"], "properties": {
        "id": {"type": "string", "pattern": "^id_[a-f0-9]{4}$"}}},
    "number_bounds": {"type": "number", "minimum": 0, "maximum": 1},
    "integer_exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "string_lengths": {"type": "string", "minLength": 2, "maxLength": 4},
    "ref_defs": {"$defs": {"point": {"type": "object", "properties": {"x": SMALL_INT, "y": SMALL_INT},
                                     "required": ["x", "y"]}},
                 "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
                 "required": ["from", "to"]},
    "nullable_field": {"type": "object", "required": ["v"], "properties": {"v": {"type": ["integer", "null"],
                                                                                 "minimum": 0, "maximum": 9}}},
    "unicode_keys": {"type": "object", "required": ["名前", "é"], "properties": {"名前": S, "é": {"enum": ["ü", "ß"]}}},
    "quoted_enum": {"enum": ['say "hi"', "back\\slash", "new\nline"]},
    "date_format": {"type": "object", "required": ["day"], "properties": {"day": {"type": "string",
                                                                                 "format": "date"}}},
    "order": {"type": "object", "required": ["id", "items", "status"], "properties": {
        "id": SMALL_INT,
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "required": ["sku", "qty"],
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}$"}, "qty": SMALL_INT}}},
        "status": {"enum": ["new", "paid", "shipped"]}}},
    "additional_false": {"type": "object", "properties": {"only": {"type": "boolean"}}, "required": ["only"],
                         "additionalProperties": False},
}

# The whole output full-matches each (Python's re.fullmatch).
REGEXES: dict[str, str] = {
    "digits": r"[0-9]{1,5}",
    "phone": r"\d{3}-\d{4}",
    "word_list": r"[a-z]{1,4}(, [a-z]{1,4}){0,2}",
    "alternation": r"(yes|no|maybe)!?",
    "escaped": r"\(\d\)\.\*",
    "ipv4": r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",
    "unicode": r"(日本|ü){1,2}",
}

# The output is exactly one member: quotes, backslashes, newlines, tabs, unicode and prefixes of each other.
CHOICES: dict[str, list[str]] = {
    "sentiment": ["positive", "negative", "neutral"],
    "tricky": ['say "hi"', "back\\slash", "two\nlines", "tab\there", "日本語", "ü"],
    "prefixes": ["a", "ab", "abc"],
}

# EBNF (xgrammar's GBNF-style dialect), each with a checker (CHECKERS) written for it.
GRAMMARS: dict[str, str] = {
    "arithmetic": (
        'root ::= expr\n'
        'expr ::= term (("+" | "-") term){0,2}\n'
        'term ::= num | "(" expr ")"\n'
        'num ::= [0-9] [0-9]?\n'),
    "key_values": (
        'root ::= pair (";" pair){0,2}\n'
        'pair ::= key "=" value\n'
        'key ::= [a-z] [a-z]?\n'
        'value ::= "on" | "off" | [0-9]\n'),
    "balanced": (
        'root ::= group\n'
        'group ::= "[" group? "]" | "<" group? ">"\n'),
}


def check_arithmetic(text: str) -> bool:
    """expr ::= term (('+'|'-') term){0,2}; term ::= num | '(' expr ')'; num ::= 1-2 digits."""
    def expr(i: int) -> int:
        i = term(i)
        for _ in range(2):
            if i < len(text) and text[i] in "+-":
                i = term(i + 1)
        return i

    def term(i: int) -> int:
        if i < len(text) and text[i] == "(":
            i = expr(i + 1)
            if i >= len(text) or text[i] != ")":
                raise ValueError(i)
            return i + 1
        m = re.compile(r"[0-9]{1,2}").match(text, i)
        if not m:
            raise ValueError(i)
        return m.end()
    try:
        return expr(0) == len(text)
    except ValueError:
        return False


def check_key_values(text: str) -> bool:
    return re.fullmatch(r"[a-z]{1,2}=(on|off|[0-9])(;[a-z]{1,2}=(on|off|[0-9])){0,2}", text) is not None


def check_balanced(text: str) -> bool:
    """One group of nested brackets, each "[" closed by "]" and "<" by ">", each holding at most one group."""
    def group(i: int) -> int:
        if i >= len(text) or text[i] not in "[<":
            raise ValueError(i)
        close = "]" if text[i] == "[" else ">"
        i += 1
        if i < len(text) and text[i] in "[<":
            i = group(i)
        if i >= len(text) or text[i] != close:
            raise ValueError(i)
        return i + 1
    try:
        return group(0) == len(text)
    except ValueError:
        return False


CHECKERS = {"arithmetic": check_arithmetic, "key_values": check_key_values, "balanced": check_balanced}


# Lark (vLLM's other grammar syntax: no line has "::="), converted to EBNF by the engine (lark_ebnf.py). Between them
# they use rules and terminals, `?rule`, `-> alias`, a priority, alternatives on new lines, `[ ]`, `~ n..m`, a
# case-insensitive string, a range and regexes; lark_accepts checks an output with Lark itself.
LARK_GRAMMARS: dict[str, str] = {
    "sql": (
        'start: select\n'
        'select: "SELECT " column " FROM " table [" WHERE " condition]\n'
        'column: "id" | "name" | "*"\n'
        'table: "users" | "orders"\n'
        'condition: column " = " NUMBER\n'
        'NUMBER: /[0-9]{1,3}/\n'),
    "list": (
        '// up to four short items\n'
        'start: "[" [item ("," item)~0..3] "]"\n'
        '?item: WORD | INT\n'
        'WORD: ("a".."z")~1..5\n'
        'INT: /-?\\d{1,3}/\n'),
    "switches": (
        '?start: pair (";" pair)~0..2\n'
        'pair: KEY "=" value -> assignment\n'
        'value: "on"i\n'
        '     | "off"i\n'
        '     | DIGIT\n'
        'KEY.2: /[a-z][a-z0-9_]?/\n'
        'DIGIT: "0".."9"\n'),
}


def lark_accepts(grammar: str, text: str) -> bool:
    """Whether Lark's Earley parser takes text whole (its dynamic lexer matches terminals as text, as the
    converted grammar does; dynamic_complete tries every length of each)."""
    import lark
    try:
        lark.Lark(grammar, parser="earley", lexer="dynamic_complete").parse(text)
    except lark.exceptions.LarkError:
        return False
    return True
