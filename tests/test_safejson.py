"""safejson.loads: a nesting limit measured without recursion, exact where it matters."""

from __future__ import annotations

import json

import pytest

from regproxy.safejson import MAX_DEPTH, JSONTooDeep, loads, nesting_bound


def _arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


def _objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("make", [_arrays, _objects])
def test_depth_up_to_the_limit_parses(make: object) -> None:
    assert callable(make)
    text = make(MAX_DEPTH)
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        _arrays(MAX_DEPTH + 1),
        _objects(MAX_DEPTH + 1),
        _arrays(100_000),
        _objects(1000),
        "[" * 100_000,  # never closed: the parser would still go that deep
        '{"annotations": {"a": ' + _arrays(5000) + "}}",
        "[" * 200 + "}" * 200,  # mismatched, but nested all the same
    ],
)
def test_deeper_is_refused(text: str) -> None:
    with pytest.raises(JSONTooDeep):
        loads(text)
    with pytest.raises(ValueError):
        loads(text.encode())


def test_brackets_in_strings_do_not_nest() -> None:
    doc = {"a": "[" * 10_000, "b": '\\"[[[[', "c": ["{" * 500, {"d": "\\" * 7 + "[["}]}
    text = json.dumps(doc)
    assert loads(text) == doc
    assert nesting_bound(text.encode(), 3) <= 3  # {"c": [{"d": ...}]}
    assert nesting_bound(text.encode(), 2) > 2


def test_an_escaped_quote_does_not_end_a_string() -> None:
    # If \" ended the string, the brackets after it would be counted as structure.
    text = json.dumps(['x\\"' + "[" * 1000])
    assert loads(text) == json.loads(text)


def test_an_unterminated_string_is_invalid_not_deep() -> None:
    with pytest.raises(ValueError) as info:
        loads('["abc' + "[" * 1000)
    assert not isinstance(info.value, JSONTooDeep)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le", "utf-32"])
def test_other_encodings_are_measured_after_decoding(encoding: str) -> None:
    # In UTF-16, U+225B is the bytes 5B 22: a "[" and a quote if read as UTF-8.
    doc = {"k": "\u225b" * 300, "v": [[1]]}
    assert loads(json.dumps(doc, ensure_ascii=False).encode(encoding)) == doc
    with pytest.raises(JSONTooDeep):
        loads(_arrays(MAX_DEPTH + 1).encode(encoding))


@pytest.mark.parametrize("depth", [1, 2, 7, 64, 128])
def test_bound_exceeds_the_limit_exactly_when_the_depth_does(depth: int) -> None:
    # Wide as well as deep, so more brackets open than the limit: the pass-counting path.
    wide = ("[" + ",".join([_arrays(depth - 1)] * (2 * depth + 3)) + "]").encode()
    assert nesting_bound(wide, depth) <= depth
    assert nesting_bound(wide, depth - 1) > depth - 1
