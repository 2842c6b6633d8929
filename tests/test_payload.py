"""coord.payload: JSON data only, validated on the way in and the way out."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coord.errors import PayloadError, PayloadTooLarge
from coord.payload import DEFAULT_DEPTH, DEFAULT_LIMIT, decode, encode

# Arbitrary JSON values: what a payload may be. Strings exclude lone surrogates (not UTF-8).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=30,
)


def nested(depth: int, kind: str = "list") -> Any:
    v: Any = 0
    for _ in range(depth):
        v = [v] if kind == "list" else {"k": v}
    return v


@given(JSON_VALUES)
@settings(max_examples=300, deadline=None)
def test_round_trip_of_arbitrary_json(value: Any) -> None:
    text = encode(value)
    back = decode(text)
    assert back == value or (isinstance(value, float) and math.isclose(back, value))
    assert decode(text.encode("utf-8")) == back  # bytes in, same value out
    assert encode(back) == text  # canonical: encoding is stable


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, [1, math.nan], {"a": math.inf}])
def test_nan_and_infinity_are_refused_on_the_way_in(bad: Any) -> None:
    with pytest.raises(PayloadError, match="NaN and Infinity"):
        encode(bad)


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}', "1e400", "[-1e999]"])
def test_nan_and_infinity_are_refused_on_the_way_out(text: str) -> None:
    with pytest.raises(PayloadError):
        decode(text)


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_depth_limit_both_ways(kind: str) -> None:
    ok = nested(DEFAULT_DEPTH, kind)
    assert decode(encode(ok)) == ok
    deep = nested(DEFAULT_DEPTH + 1, kind)
    with pytest.raises(PayloadError, match="nested deeper"):
        encode(deep)
    with pytest.raises(PayloadError, match="nested deeper"):
        decode(json.dumps(deep))
    with pytest.raises(PayloadError, match="nested deeper"):
        encode(nested(3, kind), max_depth=2)


def test_hostile_depth_is_a_clear_error_not_a_crash() -> None:
    with pytest.raises(PayloadError):
        decode("[" * 200_000 + "]" * 200_000, limit=1 << 21)
    with pytest.raises(PayloadError, match="nested deeper"):
        encode(nested(100_000))


def test_size_limit_both_ways() -> None:
    big = "x" * DEFAULT_LIMIT
    with pytest.raises(PayloadTooLarge) as e:
        encode(big)
    assert e.value.limit == DEFAULT_LIMIT and e.value.size > DEFAULT_LIMIT
    assert "exceeds the limit" in str(e.value)
    with pytest.raises(PayloadTooLarge):
        decode(json.dumps(big))
    with pytest.raises(PayloadTooLarge):
        decode(json.dumps(big).encode())
    # The limit counts UTF-8 bytes, not characters.
    with pytest.raises(PayloadTooLarge):
        encode("é" * 60, limit=100)
    assert decode(encode("é" * 40, limit=100)) == "é" * 40
    assert isinstance(PayloadTooLarge(2, 1), PayloadError)


@pytest.mark.parametrize("raw", [b'"\xff"', b'{"a": "\xc3"}', b"\x80"])
def test_invalid_utf8_is_refused(raw: bytes) -> None:
    with pytest.raises(PayloadError, match="UTF-8"):
        decode(raw)


@pytest.mark.parametrize("raw", [b'"a\x00b"', b"\x00", b'{"a": 1}\x00', b"[1,\x002]"])
def test_raw_nul_bytes_are_not_json(raw: bytes) -> None:
    with pytest.raises(PayloadError, match="not JSON"):
        decode(raw)


def test_escaped_nul_is_data() -> None:
    # "\u0000" inside a JSON string is valid JSON text and round-trips (stored escaped).
    assert decode('"a\\u0000b"') == "a\x00b"
    assert "\x00" not in encode("a\x00b")
    assert decode(encode("a\x00b")) == "a\x00b"


@pytest.mark.parametrize("text", ["", "not json", "{'a': 1}", "[1, 2", '{"a" 1}', "tru", "01"])
def test_malformed_text_is_refused(text: str) -> None:
    with pytest.raises(PayloadError, match="not JSON"):
        decode(text)


@pytest.mark.parametrize("value", [b"bytes", {1: "int key"}, {(1, 2): 3}, object(), {1, 2},
                                   complex(1, 2), "\ud800"])
def test_non_json_python_values_are_refused(value: Any) -> None:
    with pytest.raises(PayloadError):
        encode(value)


def test_huge_integers_are_refused_not_crashing() -> None:
    with pytest.raises(PayloadError):
        encode(10**5000)
    with pytest.raises(PayloadError):
        decode("1" * 5000)


def test_error_messages_are_clear() -> None:
    with pytest.raises(PayloadError) as e:
        decode("nope")
    assert str(e.value).startswith("bad payload: not JSON")
