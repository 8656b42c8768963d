"""JSON from files and messages an outsider controls, parsed with bounds.

Every place the daemon reads JSON it did not write in this process (an archive's manifest
and signature, the live set, fleet documents) parses it here: at most ``max_bytes`` and
``max_depth`` levels of nesting, both checked before the JSON parser runs, so a hostile
document is a ``JsonRefused`` with a one-line reason, never a ``RecursionError`` or a
megabyte of brackets held in memory. Duplicate keys and the non-standard ``NaN`` and
``Infinity`` are refused (two readers could disagree about them); floats can be refused
too, for documents whose bytes are signed (``fleet/canonical.py``).

``JsonRefused`` is a ``ValueError`` (as ``json.JSONDecodeError`` is), so a caller
converts it into its own error kind, naming the file or document.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any, NoReturn

DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_DEPTH = 32

# A JSON string, escapes included (an unterminated one runs to the end). Possessive
# (3.11): no backtracking, and a run of plain characters is one step.
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
# Every byte but the four brackets (UTF-8 continuation bytes are never brackets).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class JsonRefused(ValueError):
    """Not acceptable JSON; the message is one line that says why."""


def parse_json(
    data: bytes | str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    allow_floats: bool = True,
) -> Any:
    """A JSON value from untrusted bytes (UTF-8) or text, bounded in size and depth."""
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if size > max_bytes:
        raise JsonRefused(f"document is {size} bytes, more than the {max_bytes} allowed")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise JsonRefused("document is not UTF-8") from None
    check_depth(data, max_depth)
    try:
        return json.loads(
            data,
            parse_float=None if allow_floats else _refuse_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
    except JsonRefused:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers
        raise JsonRefused(f"not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def check_depth(text: str, max_depth: int) -> None:
    """Refuse ``text`` when its arrays and objects nest deeper than ``max_depth``."""
    if text.count("[") + text.count("{") <= max_depth:
        return  # it cannot nest deeper than it opens (a fast path for most documents)
    # Strings out (brackets in them do not nest), then only the brackets; the first
    # running sum over the limit ends it. No Python step per character.
    outside = _STRING.sub("", text).encode("utf-8", "surrogatepass")
    depths = accumulate(map(_STEP.__getitem__, outside.translate(None, _NOT_BRACKETS)))
    if next(filter(max_depth.__lt__, depths), None) is not None:
        raise JsonRefused(f"nested deeper than {max_depth} levels")


def _refuse_float(text: str) -> NoReturn:
    raise JsonRefused(f"floats are not allowed here, got {text}")


def _refuse_constant(text: str) -> NoReturn:
    raise JsonRefused(f"{text} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonRefused(f"duplicate key {key[:64]!r}")
        out[key] = value
    return out
