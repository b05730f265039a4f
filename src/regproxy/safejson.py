"""JSON from clients and upstreams, parsed with a nesting limit.

``json.loads`` recurses once per nested array or object, so ``[`` x 100000 raises
``RecursionError`` (or worse, deep in an unrelated frame). Every document regproxy parses
from the outside (manifests, upstream tag lists, referrers and token answers) goes through
:func:`loads`, which measures the nesting first, without recursion, and refuses anything
deeper than :data:`MAX_DEPTH`: a ``ValueError``, like any other malformed JSON.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any, Final

# Real manifests nest 4 to 6 levels deep; this is far above any of them.
MAX_DEPTH: Final = 128

# A JSON string, escapes included; an unterminated one runs to the end of the text. Possessive
# quantifiers: each byte is looked at once, whatever the input.
_STRING: Final = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\Z)', re.DOTALL)
_BRACKETS: Final = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS: Final = bytes(c for c in range(256) if c not in b"[]{}")
# One step of the depth for each byte of the skeleton.
_STEP: Final = tuple(1 if c == ord("(") else -1 if c == ord(")") else 0 for c in range(256))
# Passes continue while each removes at least 1/_SHRINK of the skeleton.
_SHRINK: Final = 8
_CHUNK: Final = 1 << 16


class JSONTooDeep(ValueError):
    """The document nests arrays and objects deeper than the limit."""


def loads(data: str | bytes | bytearray, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` for untrusted input: ``JSONTooDeep`` past ``max_depth`` levels.

    Bytes are decoded as ``json.loads`` would (UTF-8, -16 or -32); a decoding error is a
    ``UnicodeDecodeError``, which is a ``ValueError`` too.
    """
    if isinstance(data, bytes | bytearray):
        text = bytes(data).decode(json.detect_encoding(data), "surrogatepass")
    else:
        text = data
    depth = nesting_bound(text.encode("utf-8", "surrogatepass"), max_depth)
    if depth > max_depth:
        raise JSONTooDeep(f"JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except RecursionError as exc:  # cannot happen below the limit; never a 500 if it does
        raise JSONTooDeep(f"JSON nested too deep: {exc}") from exc


def nesting_bound(utf8: bytes, limit: int) -> int:
    """An upper bound of the nesting a JSON parser reaches in ``utf8``; greater than
    ``limit`` exactly when the nesting of a well-formed document is.

    Strings are cut out first: brackets inside them do not nest. A document with no more
    brackets open than ``limit`` stops there. Otherwise the innermost pairs are removed, one
    level per pass, with ``bytes.replace``, while that shrinks the text a lot (wide, shallow
    documents, which real ones are); what is left is walked in C (``accumulate``), chunk by
    chunk, stopping as soon as it is too deep. No step recurses, and none loops in Python
    over the bytes.
    """
    skeleton = _STRING.sub(b"", utf8).translate(_BRACKETS, _NOT_BRACKETS)
    opens = skeleton.count(b"(")
    if opens <= limit:
        return opens
    passes = 0
    while passes < limit:
        shorter = skeleton.replace(b"()", b"")
        removed = len(skeleton) - len(shorter)
        if not removed:
            break
        passes += 1
        skeleton = shorter
        if removed * _SHRINK < len(skeleton) + removed:
            break
    # Removing a matched pair changes no other bracket's depth: the rest is walked as is.
    depth = peak = 0
    for start in range(0, len(skeleton), _CHUNK):
        steps = list(
            accumulate(map(_STEP.__getitem__, skeleton[start : start + _CHUNK]), initial=depth)
        )
        peak, depth = max(peak, *steps), steps[-1]
        if passes + peak > limit:
            break
    return passes + peak
