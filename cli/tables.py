"""Plain-text tables that fit: one line per row, cells shortened with an ellipsis.

No markup library is involved: a cell is the value's literal text with control characters
escaped (a newline in a payload shows as ``\\n``, an escape sequence as ``\\x1b``), so
nothing a process wrote can break the one-row-one-line rule or steer the terminal.
"""

from __future__ import annotations

import json
import shlex
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any

ELLIPSIS = "…"
GAP = "  "
MIN_CELL = 3  # a shortened cell keeps at least this many columns (e.g. "ab…")

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def fmt(v: Any, key: str = "") -> str:
    """The text of one value: '-' for none, yes/no, command lines quoted as a shell would."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, (list, tuple)):
        items = [str(x) for x in v]
        return shlex.join(items) if key.endswith("cmdline") else " ".join(items)
    if isinstance(v, dict):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def literal(text: str) -> str:
    """``text`` on one line with every control character escaped."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            code = f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
            out.append(_ESCAPES.get(ch, code))
    return "".join(out)


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def width_of(text: str) -> int:
    """Terminal columns ``text`` takes (wide East Asian characters count two)."""
    return len(text) if text.isascii() else sum(_char_width(c) for c in text)


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns, ending in an ellipsis when it was cut."""
    if width_of(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        w = _char_width(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + ELLIPSIS


def _numeric(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 for v in present)


def fit(widths: list[int], floor: list[int], limit: int) -> list[int]:
    """Column widths that fit ``limit`` (gaps included): the widest column gives up a
    column at a time, never below its floor."""
    widths = list(widths)
    excess = sum(widths) + len(GAP) * (len(widths) - 1) - limit
    while excess > 0:
        i = max(range(len(widths)), key=lambda k: (widths[k] - floor[k] > 0, widths[k]))
        if widths[i] <= floor[i]:
            break  # everything at its floor: let the line run over rather than lose columns
        widths[i] -= 1
        excess -= 1
    return widths


def render(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *,
           width: int | None, headers: bool = True) -> Iterator[str]:
    """The table's lines: a header line (unless ``headers`` is false), then one per row.
    With ``width``, the widest cells are shortened until a line fits it."""
    keys = [k for k, _ in columns]
    cells = [[literal(fmt(r.get(k), k)) for k in keys] for r in rows]
    head = [h for _, h in columns]
    right = [_numeric([r.get(k) for r in rows]) for k in keys]
    shown = ([head] if headers else []) + cells
    if not shown:
        return
    widths = [max(width_of(line[i]) for line in shown) for i in range(len(keys))]
    if width is not None:
        # A number is never cut (a term or pid with an ellipsis would be a wrong number).
        floor = [w if num else min(w, max(MIN_CELL, width_of(h) if headers else 0))
                 for w, h, num in zip(widths, head, right, strict=True)]
        widths = fit(widths, floor, width)
    for line in shown:
        parts = []
        for i, text in enumerate(line):
            text = shorten(text, widths[i])
            pad = " " * (widths[i] - width_of(text))
            last = i == len(line) - 1
            parts.append(pad + text if right[i] else text + ("" if last else pad))
        yield GAP.join(parts).rstrip()
