"""The engines the contract suite runs on, and a fresh PostgreSQL schema per test.

A module marked ``pytestmark = pytest.mark.contract`` runs each of its tests once per engine
in ``COORD_TEST_ENGINES`` (default: ``sqlite,postgresql``) through the ``engine`` fixture:
``db_path`` is then a PostgreSQL URL naming a schema of its own, so ``coord.Store(db_path)``,
``COORD_DB`` and the CLI helpers work unchanged. PostgreSQL comes from ``pg_url``
(tests/pg_fixtures.py): where no server can run, those tests are skipped with the reason —
a failure under ``CI=true``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

KNOWN = ("sqlite", "postgresql")


def engines_under_test() -> list[str]:
    chosen = [e.strip() for e in os.environ.get("COORD_TEST_ENGINES", ",".join(KNOWN)).split(",")
              if e.strip()]
    unknown = [e for e in chosen if e not in KNOWN]
    if unknown:
        raise SystemExit(f"COORD_TEST_ENGINES: unknown engine(s) {unknown} (known: {KNOWN})")
    return chosen


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A URL of ``url``'s server naming a schema nobody uses; the schema is dropped after."""
    import psycopg

    from coord.backend.postgresql import connection, listen

    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield with_schema(url, schema)
    finally:
        # A store the test dropped without closing keeps its connections (the server's
        # connection slots are shared by the whole run): they go with the schema.
        listen.close_schema(schema)
        connection.close_schema(schema)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("SET lock_timeout = '20s'")
            for attempt in range(5):
                try:
                    c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                    break
                except psycopg.errors.DeadlockDetected:
                    # A closed connection's backend may still be mid-statement, waiting for
                    # a table the DROP has locked while holding one the DROP wants next:
                    # the server ends one of the two, and the other goes on.
                    if attempt == 4:
                        raise
                    time.sleep(0.2)
