"""PostgreSQL's own limits for the work coord does, measured with raw psycopg 3 (the code is
scripts/benchkit/pg_limits.py; ``scripts/bench.py --db postgresql://…`` measures coord beside
the same limits in one run).

    .venv/bin/python scripts/bench_pg.py                    # starts a private cluster, a table
    .venv/bin/python scripts/bench_pg.py --db postgresql://user@host:5432/db   # a given server
    .venv/bin/python scripts/bench_pg.py --tiny --json      # the smallest: the CI smoke test
"""

from __future__ import annotations

import sys
from contextlib import suppress

from benchkit.pg_limits import main

if __name__ == "__main__":
    with suppress(BrokenPipeError):
        sys.exit(main())
