"""Payloads are JSON data, never pickle: validated on the way in and on the way out.

Every payload is treated as untrusted: it must be valid UTF-8 JSON with no NaN or Infinity,
at most ``payload_max_depth`` levels deep and ``payload_limit`` bytes long. Anything else
raises ``PayloadError`` (``PayloadTooLarge`` for size) and nothing is stored.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import PayloadError, PayloadTooLarge

DEFAULT_LIMIT = 1 << 20
DEFAULT_DEPTH = 64


def _reject_constant(name: str) -> Any:
    raise PayloadError(f"{name} is not JSON data")


def _depth_ok(value: Any, max_depth: int) -> None:
    # Iterative, so a hostile payload cannot exhaust the Python stack.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            if d > max_depth:
                raise PayloadError(f"nested deeper than {max_depth} levels")
            for k, x in v.items():
                if not isinstance(k, str):
                    raise PayloadError(f"object key {k!r} is not a string")
                stack.append((x, d + 1))
        elif isinstance(v, (list, tuple)):
            if d > max_depth:
                raise PayloadError(f"nested deeper than {max_depth} levels")
            stack.extend((x, d + 1) for x in v)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise PayloadError("NaN and Infinity are not JSON data")
        elif v is None or isinstance(v, (str, int, bool)):
            if isinstance(v, str) and "\x00" in v:
                continue  # NUL is valid JSON text ("\u0000"); stored escaped
        else:
            raise PayloadError(f"{type(v).__name__} is not JSON data")


#: Values a flat object may hold without a walk (NaN and Infinity: the encoder refuses them).
_SCALARS = frozenset((str, int, float, bool, type(None)))
#: One encoder for every payload: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _flat(value: Any) -> bool:
    """Whether ``value`` is an object of string keys and scalar values (the common payload),
    which needs no walk: it is one level deep, and json refuses what else could be wrong."""
    if type(value) is not dict:
        return False
    for k, v in value.items():
        if type(k) is not str or type(v) not in _SCALARS:
            return False
    return True


def encode(value: Any, *, limit: int = DEFAULT_LIMIT, max_depth: int = DEFAULT_DEPTH) -> str:
    """Validate a Python value and return its canonical JSON text."""
    if max_depth < 1 or not _flat(value):
        _depth_ok(value, max_depth)
    try:
        text = _ENCODER.encode(value)
    except ValueError as e:  # allow_nan=False refuses NaN and infinities ("Out of range float")
        raise PayloadError("NaN and Infinity are not JSON data" if "float" in str(e)
                           else str(e)) from None
    except TypeError as e:
        raise PayloadError(str(e)) from None
    if len(text) * 4 > limit:  # else it fits whatever its characters (at most 4 bytes each)
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise PayloadTooLarge(size, limit)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError("contains a lone surrogate, which is not valid UTF-8") from None
    return text


def decode(text: str | bytes, *, limit: int = DEFAULT_LIMIT, max_depth: int = DEFAULT_DEPTH) -> Any:
    """Parse and validate JSON text (from a user, a file, or the database)."""
    if isinstance(text, bytes):
        if len(text) > limit:
            raise PayloadTooLarge(len(text), limit)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError("not valid UTF-8") from None
    if len(text) * 4 > limit:  # else it fits whatever its characters (at most 4 bytes each)
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise PayloadTooLarge(size, limit)
    try:
        value = _DECODER.decode(text)
    except PayloadError:
        raise
    except RecursionError:
        # The C parser guards its recursion; a hostile depth ends here, not in a crash.
        raise PayloadError(f"nested deeper than {max_depth} levels") from None
    except ValueError as e:
        raise PayloadError(f"not JSON: {e}") from None
    # What json.loads returns is JSON data already (string keys, finite numbers: see the
    # hooks), so only the depth is left to check, and a text with fewer brackets than the
    # limit cannot be deeper: the walk runs only for texts that could be.
    if text.count("[") + text.count("{") > max_depth:
        _depth_ok(value, max_depth)
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to infinity
        raise PayloadError("NaN and Infinity are not JSON data")
    return value


#: One decoder for every payload (json.loads with hooks builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
