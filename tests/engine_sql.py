"""Raw SQL on either engine, for contract tests that must look at or break stored rows.

Statements are written once in the SQL both engines speak (``?`` placeholders, ``ON
CONFLICT`` upserts, ``RETURNING``); on PostgreSQL the placeholders become ``%s``. A store's
fenced writes take the engine's own SQL too: ``sql(store, text)`` gives it.
"""

from __future__ import annotations

from typing import Any

import coord


def sql(store: coord.Store, text: str) -> str:
    """``text`` with the placeholders of ``store``'s engine."""
    return text.replace("?", "%s") if store.engine == "postgresql" else text


def rows(store: coord.Store, text: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """The rows of one read, as dicts."""
    if store.engine == "postgresql":
        return store.backend.db.rows(sql(store, text), params)  # type: ignore[attr-defined, no-any-return]
    return [dict(r) for r in store.rows(text, params)]


def value(store: coord.Store, text: str, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row of one read, or None."""
    found = rows(store, text, params)
    return next(iter(found[0].values())) if found else None


def write(store: coord.Store, text: str, params: tuple[Any, ...] | list[tuple[Any, ...]] = ()
          ) -> None:
    """Run one statement in its own transaction (a list of parameter tuples: once each)."""
    many = params if isinstance(params, list) else [params]
    if store.engine == "postgresql":
        store.backend.db.write(  # type: ignore[attr-defined]
            lambda c: c.cursor().executemany(sql(store, text), many))
    else:
        store.write(lambda c: c.executemany(text, many))
