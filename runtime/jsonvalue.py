"""JSON as requests carry it: parsed without Python's own failure modes, and checked before anything recurses.

Three things in a JSON document break Python code far from where they arrive, as a 500 instead of a 400:
an integer longer than Python's int/str conversion limit (4,300 digits: `json.loads` raises a bare
ValueError), nesting deeper than the code that later walks it can recurse (RecursionError in sizes,
pydantic, templates), and a `\\ud800` escape, which JSON allows but which is no Unicode text (the tokenizer,
`str.encode` and file paths all fail on it). `load_json` parses (a too-long integer becomes a
`HugeInteger`, an infinite float every numeric check refuses), and `json_text_size` walks a value once,
without recursion, refusing all three by the field's name. Every interface (HTTP, stdio, gRPC's JSON
fields) goes through these two, so each answers the same 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gallery.errors import RequestError

MAX_JSON_DEPTH = (
    64  # far above any real request (a JSON schema in tools nests ~10), far below recursion limits
)


class HugeInteger(float):
    """A JSON integer too long for Python's int/str conversion, kept as ±inf so every numeric check refuses it."""


def _parse_int(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:  # over sys.get_int_max_str_digits(): no field takes a number that large
        return HugeInteger("-inf" if text.startswith("-") else "inf")


def load_json(data: str | bytes | bytearray) -> Any:
    """`json.loads`, except that an integer over Python's digit limit becomes a HugeInteger, not a ValueError.

    Raises json.JSONDecodeError, UnicodeDecodeError or RecursionError like `json.loads`.
    """
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise
        # Only Python's int-string limit raises a plain ValueError here; parse again, the slow way only now.
        return json.loads(data, parse_int=_parse_int)


def text_size(text: str, field: str) -> int:
    """UTF-8 length of text; RequestError when it holds a lone surrogate (not encodable)."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise RequestError(
            f"{field}: contains a lone surrogate (\\u{code:04x}), which is not Unicode text", field=field
        ) from None


def json_text_size(value: Any, field: str, *, uncounted: frozenset[str] = frozenset()) -> int:
    """Bytes of UTF-8 text inside a JSON-shaped value (strings only; values under `uncounted` keys walked, not counted).

    Refuses, naming `field`: nesting deeper than MAX_JSON_DEPTH, a lone surrogate in any string or key, and an
    integer too long for Python (a HugeInteger). Iterative, so no depth can make it recurse.
    """
    size = 0
    stack: list[tuple[Any, int, bool]] = [(value, 0, True)]
    while stack:
        item, depth, counted = stack.pop()
        if isinstance(item, str):
            length = text_size(item, field)
            size += length if counted else 0
        elif isinstance(item, (Mapping, list, tuple)):
            if depth >= MAX_JSON_DEPTH:
                raise RequestError(f"{field}: nested more than {MAX_JSON_DEPTH} levels deep", field=field)
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if isinstance(key, str):
                        text_size(key, field)
                    stack.append((child, depth + 1, counted and key not in uncounted))
            else:
                stack.extend((child, depth + 1, counted) for child in item)
        elif isinstance(item, HugeInteger):
            raise RequestError(f"{field}: an integer with too many digits", field=field)
    return size
