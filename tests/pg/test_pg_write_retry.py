"""PgDb.write retries a transaction the server ended as a deadlock: two writers lock two
rows in opposite orders; the server kills one, and its write runs again and commits."""

from __future__ import annotations

import threading

import pytest
from contract_engines import fresh_schema

import coord


@pytest.mark.timeout(120)
def test_a_deadlocked_write_is_retried_and_commits(pg_url: str) -> None:
    with fresh_schema(pg_url) as url:
        store = coord.Store(url)
        db = store.backend.db  # type: ignore[attr-defined]
        try:
            db.write(lambda c: c.execute("CREATE TABLE pair (id int PRIMARY KEY, n int)"))
            db.write(lambda c: c.execute("INSERT INTO pair VALUES (1, 0), (2, 0)"))
            both = threading.Barrier(2, timeout=20)
            errors: list[BaseException] = []

            def writer(first: int, second: int) -> None:
                tries = 0

                def txn(c: object) -> None:
                    nonlocal tries
                    tries += 1
                    c.execute("UPDATE pair SET n = n + 1 WHERE id = %s", (first,))  # type: ignore[attr-defined]
                    if tries == 1:
                        both.wait()  # each holds its first row: the second locks cross
                    c.execute("UPDATE pair SET n = n + 1 WHERE id = %s", (second,))  # type: ignore[attr-defined]

                try:
                    db.write(txn)
                except BaseException as e:
                    errors.append(e)

            before = db.retries
            ts = [threading.Thread(target=writer, args=a) for a in ((1, 2), (2, 1))]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            assert errors == []
            assert db.retries - before >= 1  # one of them was the deadlock's victim
            rows = db.rows("SELECT id, n FROM pair ORDER BY id")
            assert [(r["id"], r["n"]) for r in rows] == [(1, 2), (2, 2)]
        finally:
            store.close()
