"""The one bounded JSON parser (``edgeserve.jsonsafe``): every refusal is one line."""

from __future__ import annotations

import json

import pytest

from edgeserve.jsonsafe import JsonRefused, parse_json


def test_plain_documents_parse() -> None:
    assert parse_json(b'{"a": [1, 2.5, "x"], "b": null}') == {"a": [1, 2.5, "x"], "b": None}
    assert parse_json('{"s": "[[[[\\"{{{{"}', max_depth=1) == {"s": '[[[["{{{{'}
    wide = [[i, {"k": ["é["]}] for i in range(20_000)]  # many brackets, three levels
    assert parse_json(json.dumps(wide), max_depth=4) == wide
    with pytest.raises(JsonRefused, match="nested deeper than 4 levels"):
        parse_json(json.dumps([*wide, [[[[[]]]]]]), max_depth=4)


@pytest.mark.parametrize(
    ("data", "kwargs", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, {}, "nested deeper than 32 levels"),
        (b"[" * 5 + b"]" * 5, {"max_depth": 4}, "nested deeper than 4 levels"),
        (b'"' + b"x" * 2000 + b'"', {"max_bytes": 1000}, "more than the 1000 allowed"),
        (b'{"a": 1, "a": 2}', {}, "duplicate key 'a'"),
        (b"[NaN]", {}, "NaN is not JSON"),
        (b"[1.5]", {"allow_floats": False}, "floats are not allowed"),
        (b"\xff\xfe", {}, "not UTF-8"),
        (b"{not json", {}, "not valid JSON"),
        (b"9" * 5000, {}, "not valid JSON"),
    ],
)
def test_refusals_say_why(data: bytes, kwargs: dict, reason: str) -> None:
    with pytest.raises(JsonRefused, match=reason) as caught:
        parse_json(data, **kwargs)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers that caught JSONDecodeError still do
