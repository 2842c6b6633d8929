"""Section 6: cold start of coord's CLI vs ``python -c pass`` (the limit) and
``python -c "import typer"``."""

from __future__ import annotations

import subprocess
import sys
import time

from .harness import Context, Result, rotate, worker_env


def section_cli(ctx: Context) -> list[Result]:
    import coord
    s = ctx.sizes
    d = ctx.fresh_dir("cli")
    db = d / "coord.db"
    store = coord.Store(db)
    inst = coord.register(store, "bench-cli", app="bench", heartbeat=False, handle_signals=False)
    # Bytecode as an installed coord has it: compiled by the first (untimed) run of each
    # command into a cache of this run's own, where the workers' environment writes none.
    env = {**worker_env(), "COORD_DB": str(db), "PYTHONPYCACHEPREFIX": str(d / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    py = sys.executable
    cmds = {
        "coord instances --json": [py, "-m", "coord", "instances", "--json"],
        "coord queue put": [py, "-m", "coord", "queue", "put", "bench/cli", '{"n": 1}'],
        'coord sql "select 1"': [py, "-m", "coord", "sql", "select 1"],
        "python -c pass": [py, "-c", "pass"],
        'python -c "import typer"': [py, "-c", "import typer"],
    }
    lat: dict[str, list[float]] = {k: [] for k in cmds}
    errors: dict[str, str] = {}
    try:
        for r in range(s.cli_runs + 1):  # the first run of each warms the page cache
            for k in rotate(list(cmds), r):
                if k in errors:
                    continue
                t = time.perf_counter()
                p = subprocess.run(cmds[k], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, check=False)
                dt = (time.perf_counter() - t) * 1e6
                if p.returncode != 0:
                    last = [x for x in p.stderr.strip().splitlines() if x.strip()][-1:]
                    errors[k] = f"exit {p.returncode}: {' '.join(last)[-300:]}"
                elif r > 0:
                    lat[k].append(dt)
    finally:
        inst.close()
        store.close()
    out = []
    for work in ("coord instances --json", "coord queue put", 'coord sql "select 1"'):
        for k in (work, "python -c pass", 'python -c "import typer"'):
            out.append(Result("cli", f"cold start: {work}", k, len(lat[k]), sum(lat[k]) / 1e6,
                              lat[k], coord=k == work, limit=k == "python -c pass",
                              note="same interpreter, wall time of the whole process, "
                                   "bytecode compiled",
                              error=errors.get(k)))
    return out
