"""A pythonic list of calls read as Python literals (with `ast`, never evaluated), and its arguments as JSON."""
import ast
import json
import warnings

JSON_NAMES = {"true": True, "false": False, "null": None}   # some models write JSON's literals in the call


def string_body(quote: str, body: str) -> str:
    """The value of a string's text between its quotes (no prefix): itself without escapes, where the string is
    valid Python (no line break, no NUL, no lone surrogate: UTF-8, as parsing encodes it), else as ast reads it."""
    if "\\" not in body and "\n" not in body and "\r" not in body and "\0" not in body:
        if not body.isascii():
            body.encode()   # a lone surrogate: UnicodeEncodeError, a ValueError (as ast's)
        return body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # an invalid escape in a string is a SyntaxWarning
        value = ast.literal_eval(quote + body + quote)
    if not isinstance(value, str):
        raise ValueError(body)
    return value


def read_calls(source: str) -> list[tuple[str, str, dict]] | None:
    """[(name, arguments as JSON, arguments)] of a list of calls with literal keyword arguments; None for anything
    else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # an invalid escape in a string is a SyntaxWarning
        try:
            tree = ast.parse(source, mode="eval").body
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return None
    if not isinstance(tree, ast.List):
        return None
    calls = []
    for call in tree.elts:
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args):
            return None
        names = [k.arg for k in call.keywords]
        if not all(names) or len(set(names)) < len(names):   # None: **kwargs; one given twice: Python refuses it
            return None
        try:
            arguments = {k.arg: _literal(k.value) for k in call.keywords}
            calls.append((call.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False), arguments))
        except (ValueError, TypeError, RecursionError):   # not a literal; inf (1e999); bytes as a dict key
            return None
    return calls


def _literal(node: ast.expr):
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value
    if isinstance(node, ast.Name) and node.id in JSON_NAMES:
        return JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and type(node.operand.value) in (int, float):   # -1 is an operator on 1; not -True
        return -node.operand.value
    if isinstance(node, ast.List):
        return [_literal(v) for v in node.elts]
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):   # None: **spread
        value = {k.value: _literal(v) for k, v in zip(node.keys, node.values)}
        if len(value) == len(node.keys):   # a key given twice: its last value in its first place, unstreamable
            return value
    raise ValueError(f"not a literal: {ast.dump(node)}")
