"""Commands about the database itself: path, sql, doctor."""

from __future__ import annotations

from typing import Annotated

import typer

from ._common import (
    JsonOption,
    NoHeadersOption,
    emit_csv,
    emit_json,
    example,
    handle_errors,
    store,
    table,
    usage,
)


def register(app: typer.Typer) -> None:
    app.command("path")(path)
    app.command("sql")(sql)
    app.command("doctor")(doctor)


@example("sqlite3 \"$(coord path)\" \"select count(*) from live_instances\"")
@handle_errors
def path(ctx: typer.Context) -> None:
    """Print the database path (`sqlite3 "$(coord path)"` works while instances run); on
    PostgreSQL its URL, the password shown as ***."""
    s = store(ctx)
    print(s.address_shown if s.engine == "postgresql" else s.path)


@example("coord sql 'select id, app, pid from live_instances'",
         "coord sql --csv 'select * from queue_depths' > depths.csv")
@handle_errors
def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="SQL to run; only reads are allowed.",
                                         metavar="QUERY", show_default=False)],
    as_json: JsonOption = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV with a header row.")] = False,
    no_headers: NoHeadersOption = False,
) -> None:
    """Run read-only SQL: writes, ATTACH, pragma changes and extensions are refused.

    Tables and views are documented in the schema files (see the README); the database is
    never locked against writers while the query runs. Several statements print every
    result in turn (a blank line between tables; with --json, one array per line).

    On PostgreSQL: one query at a time, as the schema's SELECT-only role, in a read-only
    transaction with a time limit; functions that change state (advisory locks, notify,
    set_config, ending backends) are refused."""
    if as_json and as_csv:
        usage("choose one of --json and --csv")
    s = store(ctx)
    from coord.adhoc import run_readonly_all

    results = run_readonly_all(s, query)
    for n, (cols, rows) in enumerate(results):
        if as_json:  # one array per statement: one line each (JSON lines)
            emit_json([dict(zip(cols, r, strict=True)) for r in rows])
            continue
        if n:
            print()  # a blank line between the results of several statements
        if as_csv:
            emit_csv(cols, rows, header=not no_headers)
        else:
            table([dict(zip(cols, r, strict=True)) for r in rows], [(c, c) for c in cols],
                  headers=not no_headers)


@example("coord doctor",
         "coord doctor --json | jq .problems")
@handle_errors
def doctor(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Check integrity, invariants, permissions, journal mode, WAL size, schema version, and
    processes that hold the database open without SQLite's locks (e.g. forked children).

    Exits 1 when anything is unhealthy."""
    from coord.check import doctor as run_doctor

    report = run_doctor(store(ctx))
    if as_json:
        emit_json(report)
    elif report.get("engine") == "postgresql":
        print(f"database       {report['location']}")
        print(f"server         PostgreSQL {report['server_version']}")
        print(f"schema         {report['schema']} version {report['schema_version']} "
              f"(this coord: {report['supported_schema_version']})")
        print("settings       " + ", ".join(f"{k} {v}" for k, v in report["settings"].items()))
        print(f"retried        {report['busy_retries']} writes after a serialization "
              "failure or deadlock")
    else:
        print(f"database       {report['path']}")
        print(f"schema         {report['schema_version']} (this coord: {report['supported_schema_version']})")
        print(f"journal mode   {report['journal_mode']}")
        print(f"size           {report['size_bytes']} bytes, WAL {report['wal_bytes']} bytes")
        print(f"busy           {report['busy_retries']} writes retried after the "
              f"{report['busy_timeout_ms']} ms busy timeout")
    if not as_json:
        print("counts         " + ", ".join(f"{k} {v}" for k, v in report["counts"].items()))
        for p in report["permissions"]:
            print(f"permissions    {p}")
        for p in report["problems"]:
            print(f"PROBLEM        {p['check']}: {p['detail']}")
        for p in report["pending"]:
            print(f"pending        {p['check']}: {p['detail']}")
        print("healthy" if report["ok"] else "UNHEALTHY")
    if not report["ok"]:
        raise typer.Exit(1)
