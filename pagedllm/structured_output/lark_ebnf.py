"""A `grammar` written in Lark, as xgrammar's EBNF (vLLM's xgrammar backend takes Lark the same way: a grammar
with no `::=` line is Lark, and is converted before it compiles).

Converted: rules and terminals (`?rule`, `!rule`, priorities `.N` and `-> alias` kept out: they shape Lark's
tree, not its language), alternatives, `( )`, `[ ]`, `? * +`, `~ n` and `~ n..m`, string literals (`"..."i`:
each letter in either case; `'...'` too, as vLLM's converter takes), ranges `"a".."z"`, and regexes `/.../`
(flag `s` only) that xgrammar's regex can express. A regex keeps to a part of Python's meaning, never more: `.`
leaves out the newline (as without `s`), and `\\d`, `\\w`, `\\s` are their ASCII classes. The start is the rule
`start`, else the first definition (vLLM's choice). Anything else is a ValueError naming the line and the
construct: `%import`, `%ignore` and the other directives, templates, anchors, other escapes and flags. Terminals
are matched as text, as Lark's Earley parser with its dynamic lexer does (a lexer of another parser may split the
same text otherwise).
"""
import re

MAX_DEPTH = 50   # nested ( ) and [ ]: a deeper grammar is refused, not a RecursionError

_TOKEN = re.compile(r"""
    (?P<space>[ \t\f\r]+|(?://|\#)[^\n]*)
  | (?P<nl>\n)
  | (?P<string>"(?:\\.|[^"\\\n])*"i?|'(?:\\.|[^'\\\n])*'i?)
  | (?P<regex>/(?!/)(?:\\.|[^/\\\n])+/[a-z]*)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[+-]?[0-9]+)
  | (?P<directive>%[A-Za-z_]+)
  | (?P<op>->|\.\.|[:|()\[\]?*+~.{},!])
""", re.VERBOSE)

_ESCAPES = {"n": "\n", "f": "\f", "t": "\t", "r": "\r"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_IN_CLASS = "\\]-^"   # what a backslash goes before in an EBNF character class
_REGEX_SPECIAL = "\\^$.|?*+()[]{}/-"
_CLASSES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": "\\t\\n\\v\\f\\r "}   # \d \w \s: ASCII, a part of Python's


def grammar_is_lark(text: str) -> bool:
    """vLLM's test: Lark unless some line, without its `#` or `//` comment, has `::=`."""
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in text.split("\n"))


def lark_to_ebnf(text: str) -> str:
    """The grammar as xgrammar's EBNF, `root` first. Raises ValueError("line N: ...") for what is not converted."""
    statements = _statements(_tokens(text))
    rules, references = {}, {}
    for tokens in statements:
        name, body = _Definition(tokens, references).parse()
        if name in rules:
            raise ValueError(f"line {tokens[0][2]}: {name!r} is defined twice")
        rules[name] = body
    if not rules:
        raise ValueError("no rule is defined")
    for name, line in references.items():
        if name not in rules:
            raise ValueError(f"line {line}: {name!r} is used but not defined")
    start = "start" if "start" in rules else next(iter(rules))
    if "root" in rules and start != "root":   # EBNF's start is `root`
        raise ValueError("a rule named 'root' that is not the start is not supported (rename it)")
    lines = [] if start == "root" else [f"root ::= {start}"]
    return "\n".join(lines + [f"{name} ::= {body}" for name, body in rules.items()])


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, line) of each token, spaces and comments left out."""
    out, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"line {line}: unexpected {text[pos]!r}")
        if m.lastgroup != "space":
            out.append((m.lastgroup, m.group(), line))
        line += m.group().count("\n")
        pos = m.end()
    return out


def _statements(tokens: list) -> list[list]:
    """The tokens of each definition: a new line ends one, unless the next line starts with `|`."""
    statements, current, new_line = [], [], False
    for token in tokens:
        if token[0] == "nl":
            new_line = True
            continue
        if new_line and token[1] != "|" and current:
            statements.append(current)
            current = []
        new_line = False
        current.append(token)
    return statements + ([current] if current else [])


class _Definition:
    """One `name: expansions` (rule or terminal) as (name, EBNF body)."""

    def __init__(self, tokens: list, references: dict):
        self.tokens, self.pos, self.references = tokens, 0, references
        self.line = tokens[0][2]
        self.terminal = False

    def parse(self) -> tuple[str, str]:
        first = self.peek()
        if first[0] == "directive":
            hint = {"%import": ": define the terminals it would bring in the grammar itself",
                    "%ignore": ": write what it would skip into the rules"}.get(first[1], "")
            self.fail(f"the directive {first[1]} is not supported{hint}")
        if first[1] in ("?", "!"):
            self.pos += 1
        name = self.expect("name")
        self.terminal = name.lstrip("_")[:1].isupper()
        if self.peek()[1] == ".":   # priority: which parse or token Lark prefers, not what it accepts
            self.pos += 1
            self.expect("number")
        if self.peek()[1] == "{":
            self.fail(f"templates ({name}{{...}}) are not supported")
        if self.next()[1] != ":":
            self.fail(f"expected ':' after {name!r}")
        body = self.expansions(0)
        if self.pos < len(self.tokens):
            self.fail(f"unexpected {self.peek()[1]!r}")
        return name, body

    def expansions(self, depth: int) -> str:
        alternatives = [self.alias(depth)]
        while self.peek()[1] == "|":
            self.pos += 1
            alternatives.append(self.alias(depth))
        return " | ".join(alternatives)

    def alias(self, depth: int) -> str:
        items = []
        while self.peek()[1] not in ("", "|", ")", "]", "->"):
            items.append(self.expr(depth))
        if self.peek()[1] == "->":   # a name for the tree's node
            self.pos += 1
            self.expect("name")
        return " ".join(items) or '""'

    def expr(self, depth: int) -> str:
        atom = self.atom(depth)
        op = self.peek()[1]
        if op in ("?", "*", "+"):
            self.pos += 1
            return atom + op
        if op != "~":
            return atom
        self.pos += 1
        low = high = int(self.expect("number"))
        if self.peek()[1] == "..":
            self.pos += 1
            high = int(self.expect("number"))
        if not 0 <= low <= high:
            self.fail(f"'~ {low}..{high}' is not a repetition count")
        return f"{atom}{{{low}}}" if low == high else f"{atom}{{{low},{high}}}"

    def atom(self, depth: int) -> str:
        kind, text, _ = self.next()
        if text in ("(", "["):
            if depth >= MAX_DEPTH:
                self.fail(f"groups nested deeper than {MAX_DEPTH} are not supported")
            inner = self.expansions(depth + 1)
            close = ")" if text == "(" else "]"
            if self.next()[1] != close:
                self.fail(f"expected {close!r}")
            return f"({inner})" if text == "(" else f"({inner})?"
        if kind == "string":
            if self.peek()[1] == "..":
                self.pos += 1
                if self.peek()[0] != "string":
                    self.fail("expected a string after '..'")
                return self.range(text, self.next()[1])
            return self.literal(text)
        if kind == "regex":
            return self.regex(text)
        if kind == "name":
            if self.peek()[1] == "{":
                self.fail(f"templates ({text}{{...}}) are not supported")
            if self.terminal and not text.lstrip("_")[:1].isupper():
                self.fail(f"a terminal cannot use the rule {text!r}")
            self.references.setdefault(text, self.line)
            return text
        self.fail(f"unexpected {text!r}" if text else "unexpected end of line")

    def literal(self, token: str) -> str:
        fold = token.endswith("i")
        value = self.string(token[:-1] if fold else token)
        if not fold:
            return _quoted(value)
        parts = []
        for ch in value:
            cases = sorted({c for c in (ch, ch.lower(), ch.upper()) if len(c) == 1})
            parts.append(f"[{''.join(_escape(c, _IN_CLASS) for c in cases)}]" if len(cases) > 1 else _quoted(ch))
        return "(" + " ".join(parts) + ")" if parts else '""'

    def range(self, low: str, high: str) -> str:
        if low.endswith("i") or high.endswith("i"):
            self.fail("a range of case-insensitive strings is not supported")
        low, high = self.string(low), self.string(high)
        if len(low) != 1 or len(high) != 1 or low > high:
            self.fail(f"a range needs two characters, the first not after the second: {low!r}..{high!r}")
        return f"[{_escape(low, _IN_CLASS)}-{_escape(high, _IN_CLASS)}]"

    def string(self, token: str) -> str:
        """A string literal's characters, as Lark reads its escapes (an unknown one keeps its backslash)."""
        quote = token[0]
        value = self.escapes(token[1:-1], quote)
        return value.replace("\\\\", "\\")

    def escapes(self, text: str, quote: str = "") -> str:
        """Lark's escape evaluation of a literal's text: \\n \\f \\t \\r \\xNN \\uNNNN \\UNNNNNNNN and the quote."""
        out, i = [], 0
        while i < len(text):
            if text[i] != "\\":
                out.append(text[i])
                i += 1
                continue
            e = text[i + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
            elif e in _HEX_DIGITS:
                digits = text[i + 2:i + 2 + _HEX_DIGITS[e]]
                if not re.fullmatch(f"[0-9a-fA-F]{{{_HEX_DIGITS[e]}}}", digits) or int(digits, 16) > 0x10FFFF:
                    self.fail(f"bad escape \\{e}{digits}")
                out.append(chr(int(digits, 16)))
                i += len(digits)
            elif e == quote:
                out.append(e)
            else:
                out.append("\\" + e)
            i += 2
        return "".join(out)

    def regex(self, token: str) -> str:
        """A /regex/ as an EBNF group, through xgrammar's regex converter (what it cannot express: an error)."""
        import xgrammar as xgr
        # the regex converter Grammar.from_regex runs, as one EBNF expression (the public call gives a grammar)
        from xgrammar.testing import _regex_to_ebnf
        end = token.rindex("/")
        flags = token[end + 1:]
        if flags.strip("s"):
            self.fail(f"the regex flag {flags.strip('s')[0]!r} of {token} is not supported (only 's')")
        pattern = _python_regex(self.escapes(token[1:end]), dotall="s" in flags, fail=self.fail)
        try:
            xgr.Grammar.from_regex(pattern)
            return f"({_regex_to_ebnf(pattern, with_rule_name=False)})"
        except Exception as e:   # xgrammar's RuntimeError: a construct its regex does not have
            text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", " ".join(str(e).split()))
            self.fail(f"the regex {token} is not supported: {text[:200]}")

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("", "", self.line)

    def next(self) -> tuple[str, str, int]:
        token = self.peek()
        self.pos += 1
        return token

    def expect(self, kind: str) -> str:
        token = self.next()
        if token[0] != kind:
            self.fail(f"expected a {kind}, got {token[1]!r}" if token[1] else f"expected a {kind}")
        return token[1]

    def fail(self, what: str):
        raise ValueError(f"line {self.peek()[2]}: {what}")


def _python_regex(text: str, dotall: bool, fail) -> str:
    """A Python regex (as Lark hands it to `re`) in xgrammar's regex syntax, never matching more than Python's:
    `.` without the newline unless dotall, \\d \\w \\s as ASCII classes; anchors, \\D \\W \\S and other letter
    escapes refused. A `]` first in a class is a character, as in Python."""
    out, i, in_class, negated, class_start = [], 0, False, False, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            e = text[i + 1:i + 2]
            if not e:
                fail("a regex ends with a backslash")
            if e in _CLASSES and in_class and negated:
                fail(f"\\{e} in a negated class is not supported in a regex (it would take more than Python's)")
            if e in _CLASSES:
                out.append(_CLASSES[e] if in_class else f"[{_CLASSES[e]}]")
            elif e == "v" or e in _REGEX_SPECIAL:
                out.append(ch + e)
            elif not e.isalnum():   # an escaped character that is plain anyway (xgrammar warns of the escape)
                out.append(_escape(e, ""))
            else:
                fail(f"the escape \\{e} is not supported in a regex")
            i += 2
            continue
        if in_class:
            if ch == "]" and i > class_start:
                in_class = False
                out.append(ch)
            else:
                out.append(_escape(ch, "\\]["))
        elif ch == "[":
            negated = text[i + 1:i + 2] == "^"
            in_class, class_start = True, i + 1 + negated
            out.append("[^" if negated else "[")
            i += negated
        elif ch in "^$":
            fail(f"the anchor {ch!r} is not supported in a regex")
        elif ch == "." and not dotall:
            out.append("[^\\n]")
        else:
            out.append(_escape(ch, ""))
        i += 1
    return "".join(out)


def _quoted(text: str) -> str:
    return '"' + "".join(_escape(c, '"\\') for c in text) + '"'


def _escape(ch: str, special: str) -> str:
    """ch in EBNF (or regex) text: a backslash before the special ones, control characters as \\uNNNN."""
    if ch in special:
        return "\\" + ch
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\u{ord(ch):04x}"   # \u: exactly 4 digits (xgrammar's \x takes every hex digit after it)
    return ch
