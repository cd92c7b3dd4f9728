"""The open call of a pythonic list read from its last boundary, so that a long value streams in linear time.

Each delta used to parse the open call from its start: quadratic for a long list, dict or run of strings (a
50 KB list of numbers fed 4 characters a delta: ~10 MB allocated past the per-delta bound, against a bound of
10). A window stands for the text before a boundary (OpenBrackets.Boundary) with a short source, its context:
`[f(` and each frame open there, with the key of the element the next frame is in (the real one, so a key given
twice inside the window is refused as in the whole text). The window's text is parsed after that context, and
its JSON after the context's own is what the whole text's JSON holds after the boundary's:

    whole text:   [f(xs=[1, 2, 3, 4|, 5, 6          JSON out up to the boundary:  {"xs": [1, 2, 3, 4
    parsed:       [f(xs=[          | 5, 6])]      its JSON: {"xs": [ + 5, 6]}  ->  out: , 5, 6

The keys of each open frame before the boundary are kept, so that one given again after it is refused as
Python refuses it (a call's keyword) or the parser does (a dict's key).
"""
import json
from dataclasses import dataclass

from pagedllm.server.tool_parsers.pythonic_text import Boundary


@dataclass
class Window:
    call: int             # the call's index in the list
    start: int            # the boundary's place in the list's text
    stack: tuple          # the brackets open there
    has_elem: bool        # its innermost frame has an element before it: the next one needs ", " in the JSON
    sent: int             # how much of the call's arguments out is the JSON up to the boundary
    context: str          # the source standing for the text before the boundary
    prefix: str           # the context's JSON arguments, less their closers
    keys: list[set]       # by stack index: the keys of that frame's elements before the boundary (call: keywords)


def context(stack: tuple, path: list) -> tuple[str, str]:
    """(the source of the frames open at a boundary, its JSON arguments less their closers): `[f(`, then each
    frame's opener, and where a frame holds the next one, its key there (path, by stack index: a keyword name, a
    dict key; a list needs none). The JSON is written as json.dumps writes it, not parsed."""
    source, out = ["[f("], ["{"]
    for k in range(1, len(stack)):
        if k > 1:
            source.append(stack[k])
            out.append(stack[k])
        if k < len(stack) - 1 and stack[k] != "[":
            key = path[k]
            source.append(key + "=" if stack[k] == "(" else repr(key) + ": ")
            out.append(json.dumps({key: 0}, ensure_ascii=False)[1:-4] + ": ")
    return "".join(source), "".join(out)


def frames(arguments: dict, num: int, first: bool) -> list[list]:
    """The keys of num nested frames, from a call's keyword arguments down: each frame's (a list has none), then
    the frame in its first element (first) or its last. An empty frame ends the walk."""
    out, node = [], arguments
    for _ in range(num):
        keys, values = (list(node), list(node.values())) if isinstance(node, dict) else ([], node)
        out.append(keys)
        if not values:
            break
        node = values[0 if first else -1]
    return out


def new_keys_clash(window: Window, arguments: dict) -> bool:
    """Whether the window's text gives a frame open at its boundary a key that frame had before it. The frames
    are the context's: each first element leads to the next; a frame that holds the next one has its key there
    first (the context's, known already)."""
    num = len(window.stack) - 1
    for k, keys in enumerate(frames(arguments, num, first=True), start=1):
        new = keys[1:] if k < num else keys
        if new and not window.keys[k].isdisjoint(new):
            return True
    return False


def keys_at(boundary: Boundary, arguments: dict, window: Window | None) -> tuple[list[set], list]:
    """(keys of each frame open at the boundary, the key of the element that holds the next frame), by stack
    index, from the arguments of the text up to it (its last elements lead to the next frame). A frame the
    window's boundary had open and that stayed open keeps the keys it had: its set, grown in place (a copy per
    boundary would be quadratic in a long dict), so the window is done with once this is called."""
    keys, path = [set()], [None]
    for k, frame in enumerate(frames(arguments, len(boundary.stack) - 1, first=False), start=1):
        kept = window.keys[k] if window is not None and k < boundary.low else set()
        kept.update(frame)
        keys.append(kept)
        path.append(frame[-1] if frame else None)
    return keys, path
