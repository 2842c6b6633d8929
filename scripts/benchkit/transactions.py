"""Section 1: one-row write transactions, raw apsw (the limit) vs coord's ``Store.write``."""

from __future__ import annotations

from .harness import Context, Result, interleaved, raw_connection

_TABLE = "CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"


def section_transactions(ctx: Context) -> list[Result]:
    import coord
    n = ctx.sizes.tx
    work = "one-row write transaction"

    conn = raw_connection(ctx.fresh_dir("raw") / "raw.db")
    conn.execute(_TABLE)

    def raw(i: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO bench (v) VALUES (?)", (f"row {i}",))
        conn.execute("COMMIT")

    store = coord.Store(ctx.fresh_dir("store") / "coord.db")
    store.write(lambda c: c.execute(_TABLE))

    def via_store(i: int) -> None:
        store.write(lambda c: c.execute("INSERT INTO bench (v) VALUES (?)", (f"row {i}",)))

    for i in range(min(200, n)):  # warm-up: caches, the WAL file's first pages
        raw(i)
        via_store(i)
    (raw_s, raw_lat), (store_s, store_lat) = interleaved(n, [raw, via_store])
    conn.close()
    store.close()
    return [
        Result("transactions", work, "coord Store.write", n, store_s, store_lat, coord=True,
               note="same, with pid/thread check and busy handling", per_op=True),
        Result("transactions", work, "raw apsw", n, raw_s, raw_lat, limit=True,
               note="BEGIN IMMEDIATE; INSERT; COMMIT", per_op=True),
    ]
