"""The wrapping of calls written as a JSON list: brackets, commas and the items that are no objects (a scalar,
or a list of them, at any depth), read up to the next object (an item that may be a call), or to where the list
closes or stops being JSON.

Items that are objects are read by the caller (as calls, or as content); everything else in a list that holds a
call is its wrapping, as vLLM reads the objects only ([42, {call}, [1, [2]]] answers the call alone).
"""
import re
from dataclasses import dataclass, replace

# a complete number or literal
SCALAR = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
# the start of one, which the next text may complete
PARTIAL_SCALAR = re.compile(r"-?\d[\d.eE+-]*|-|t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?")


@dataclass
class ListScan:
    kind: str    # "object": a "{" where an item may start; "closed": the list's last "]"; "more": cut short;
    #              "broken": text that is no JSON list
    end: int     # "object": the "{"; "closed": after the "]"; "more": where to go on; "broken": where it broke
    depth: int   # lists open at `end`
    want_value: bool = True   # an item comes next (else a "," or "]")
    in_string: bool = False   # `end` is in a string item (escaped: after its backslash)
    escaped: bool = False


def start_list(at: int) -> ListScan:
    """The scan of a list whose "[" is at `at`."""
    return ListScan("more", at + 1, 1)


def scan_list(text: str, state: ListScan) -> ListScan:
    """Reads text from state.end on, as the inside of state.depth open lists. A scan that stopped for more
    ("more") goes on from where it stopped once the text has grown, so that a long list is read once in all;
    strings may hold brackets, braces and escaped quotes."""
    i, n, depth, want_value = state.end, len(text), state.depth, state.want_value
    in_string, escaped = state.in_string, state.escaped
    while i < n:
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = want_value = False
            i += 1
        elif ch.isspace():
            i += 1
        elif want_value and ch == "{":
            return ListScan("object", i, depth)
        elif want_value and ch == "[":
            depth, i = depth + 1, i + 1
        elif want_value and ch == '"':
            in_string, i = True, i + 1
        elif ch == "]":   # (right after "[" or ",": an empty list, or a trailing comma)
            depth, i, want_value = depth - 1, i + 1, False
            if depth == 0:
                return ListScan("closed", i, 0, False)
        elif not want_value and ch == ",":
            want_value, i = True, i + 1
        elif want_value:
            partial = PARTIAL_SCALAR.match(text, i)
            if partial is not None and partial.end() == n:   # may yet be a longer one ("4" of "42", "tr")
                return ListScan("more", i, depth, True)
            m = SCALAR.match(text, i)
            if m is None:
                return ListScan("broken", i, depth)
            want_value, i = False, m.end()
        else:
            return ListScan("broken", i, depth)
    return ListScan("more", i, depth, want_value, in_string, escaped)


def moved(state: ListScan, end: int) -> ListScan:
    """The same scan, going on at `end` (of a text cut or added to before it)."""
    return replace(state, end=end)
