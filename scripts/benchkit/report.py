"""The targets a run checks, and its output: one JSON object per section, or a table for
people."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .harness import Result, round1
from .peers import LIMIT_QUEUE

# -- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    section: str
    text: str
    work: str  # ending in "*": every work whose name starts so (each --size depth)
    impl: str  # the row measured against the bound (coord's)
    bound: float
    versus: str | None = None  # a reference: the bound is a ratio coord/versus
    value: str = "figure"  # "figure" (ops/s or p50) or "p99"
    at_most: bool = False  # a ratio that must stay below the bound (latencies)


#: The targets of the issue this benchmark tracks: ratios to the limit in the same run where
#: there is one, absolute bounds (µs) otherwise.
TARGETS = [
    Target("queue", "claim+ack ≥ 0.5 × the minimal queue", "claim+ack (1 consumer*", "coord",
           0.5, LIMIT_QUEUE),
    Target("queue", "claim+ack ahead of litequeue", "claim+ack (1 consumer*", "coord", 1.0,
           "litequeue"),
    Target("queue", "claim+ack ahead of huey", "claim+ack (1 consumer*", "coord", 1.0,
           "huey (no ack)"),
    Target("queue", "put ≥ 0.6 × the minimal queue", "put (1 producer*", "coord", 0.6,
           LIMIT_QUEUE),
    Target("queue", "1 producer + 4 consumers ≥ 0.4 × the minimal queue",
           "1 producer + 4 consumers", "coord", 0.4, LIMIT_QUEUE),
    Target("queue", "latency at 200 jobs/s p50 ≤ 0.5 ms", "latency at 200 jobs/s", "coord", 500),
    Target("messages", "request→reply p50 ≤ 0.4 ms", "request→reply round trip", "coord", 400),
    Target("messages", "request→reply p99 ≤ 3 ms", "request→reply round trip", "coord",
           3000, value="p99"),
    # The kernel's handover between processes of coord's size: the exit coord's holder pays.
    Target("failover", "failover p50 ≤ 2 × the kernel's handover", "SIGKILL holder → next holder",
           "coord", 2.0, "kernel lock (F_SETLKW), coord-sized processes", at_most=True),
    Target("failover", "failover p99 ≤ 10 ms", "SIGKILL holder → next holder", "coord", 10_000,
           value="p99"),
    Target("registry", "list 1 000 alive ≤ 50 ms", "list alive (N=1000)", "coord", 50_000),
    Target("registry", "reap 10 000 dead ≤ 1 s", "reap, all dead (N=10000)", "coord",
           1_000_000),
    # PostgreSQL (bench.py --db): against the server's own limits in the same run.
    # PostgreSQL's handover from a dying process of coord's size, as on SQLite.
    Target("pg failover", "failover p50 ≤ 2 × the raw advisory-lock handover",
           "SIGKILL holder → next holder", "coord (acquire() returned)", 2.0,
           "raw advisory-lock handover, holder of coord's size", at_most=True),
    Target("pg queue", "claim+ack ≥ 0.6 × the raw SKIP LOCKED queue", "claim+ack (1 consumer)",
           "coord", 0.6, "raw SKIP LOCKED queue"),
    Target("pg messages", "NOTIFY-woken request→reply p50 ≤ 1 ms", "request→reply round trip",
           "coord request (NOTIFY-woken)", 1000),
    Target("pg cli", "cold coord instances --json ≤ 0.4 s", "cold start: coord instances --json",
           "coord instances --json", 400_000),
    Target("cli", "coord instances --json cold start ≤ 4 × python -c pass",
           "cold start: coord instances --json", "coord instances --json", 4.0,
           "python -c pass", at_most=True),
    Target("cli", "coord queue put cold start ≤ 4 × python -c pass",
           "cold start: coord queue put", "coord queue put", 4.0, "python -c pass",
           at_most=True),
]


def _target_works(t: Target, results: list[Result]) -> list[tuple[str, str]]:
    """(work, the target's text for it) of every work ``t`` applies to in ``results``."""
    if not t.work.endswith("*"):
        return [(t.work, t.text)]
    works = dict.fromkeys(r.work for r in results if r.section == t.section
                          and r.work.startswith(t.work[:-1]))
    return [(w, t.text + (f" ({w[len(t.work) - 1:].strip(' ,)')})" if w[len(t.work) - 1:]
                          not in ("", ")") else "")) for w in works]


def check_targets(results: list[Result]) -> list[dict[str, Any]]:
    by = {(r.section, r.work, r.impl): r for r in results}
    out = []
    for t in TARGETS:
        for work, text in _target_works(t, results):
            row = by.get((t.section, work, t.impl))
            if row is None:
                continue  # not measured at this size
            met: bool | None
            limit_value = None
            if t.versus is not None:
                ref = by.get((t.section, work, t.versus))
                value = None if ref is None else ref.ratio(row)
                met = None if value is None else (value <= t.bound if t.at_most
                                                  else value >= t.bound)
                limit = next((r for r in results if r.section == t.section and r.work == work
                              and r.limit), None)
                if ref is not None and limit is not None and limit is not ref:
                    limit_value = ref.ratio(limit)  # what the limit itself reaches in this run
            else:
                value = row.pct(0.99) if t.value == "p99" else row.figure()
                met = None if value is None else value <= t.bound
            out.append({"section": t.section, "target": text, "value": value if t.versus
                        else round1(value), "unit": "ratio" if t.versus else "us", "met": met,
                        "limit_value": limit_value})
    return out


# -- output -------------------------------------------------------------------------------------


def summarise(results: list[Result]) -> list[dict[str, Any]]:
    ours = {(r.section, r.work): r for r in results if r.coord}
    return [r.summary(ours.get((r.section, r.work))) for r in results]


def section_objects(results: list[Result], run: dict[str, Any]) -> list[dict[str, Any]]:
    """One JSON object per section: every row, and per work coord's figure, each
    reference's figure and coord's ratio to each; the targets checked."""
    targets = check_targets(results)
    out = []
    for name in dict.fromkeys(r.section for r in results):
        rows = [r for r in results if r.section == name]
        works = []
        for work in dict.fromkeys(r.work for r in rows):
            group = [r for r in rows if r.work == work]
            ours = next((r for r in group if r.coord), None)
            refs = [r for r in group if r is not ours]
            works.append({
                "work": work,
                "metric": group[0].metric,
                "better": "higher" if group[0].metric == "ops/s" else "lower",
                "coord": None if ours is None else {
                    "impl": ours.impl, "figure": round1(ours.figure()),
                    "p99_us": round1(ours.pct(0.99)), "error": ours.error},
                "references": [{"impl": r.impl, "limit": r.limit, "figure": round1(r.figure()),
                                "p99_us": round1(r.pct(0.99)), "error": r.error,
                                "coord_ratio": None if ours is None else r.ratio(ours)}
                               for r in refs],
            })
        out.append({"section": name, "run": run, "works": works,
                    "targets": [t for t in targets if t["section"] == name],
                    "rows": summarise(rows)})
    return out


def _fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    ms = us / 1000
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _fmt_ratio(x: float | None, metric: str) -> str:
    if x is None:
        return ""
    text = f"{x:.2f}" if x < 10 else f"{x:.0f}"
    faster = x > 1 if metric == "ops/s" else x < 1
    return f"{text}× ({'faster' if faster else 'slower'})" if x != 1 else "1.00×"


def print_table(results: list[Result], out: Any = None) -> None:
    out = out or sys.stdout
    cols = ["WORK", "IMPLEMENTATION", "N", "OPS/S", "P50 ms", "P99 ms", "COORD ÷ THIS", "NOTE"]
    cells: list[list[str] | str] = []
    ours = {(r.section, r.work): r for r in results if r.coord}
    for name in dict.fromkeys(r.section for r in results):
        cells.append(f"== {name} ==")
        cells.append(cols)
        last_work = None
        for r in (x for x in results if x.section == name):
            mine = ours.get((r.section, r.work))
            ratio = "" if mine is None or r is mine else _fmt_ratio(r.ratio(mine), r.metric)
            if r.error is not None:
                row = [r.work, r.impl, "-", "-", "-", "-", "", f"FAILED: {r.error}"]
            else:
                ops = r.ops_per_s
                metric_mark = "*" if r.rates else ""
                row = [r.work if r.work != last_work else "", r.impl + (" (limit)" if r.limit
                                                                        else ""),
                       str(r.n), "-" if ops is None else f"{ops:,.0f}{metric_mark}",
                       _fmt_us(r.pct(0.5)), _fmt_us(r.pct(0.99)), ratio, r.note]
            last_work = r.work
            cells.append(row)
        for t in check_targets([r for r in results if r.section == name]):
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            value = "-" if t["value"] is None else (
                f"{t['value']:.2f}" if t["unit"] == "ratio" else f"{t['value'] / 1000:.2f} ms")
            also = "" if t["limit_value"] is None else \
                f" (the limit itself: {t['limit_value']:.2f})"
            cells.append(f"   target {t['target']}: {value} → {verdict}{also}")
        cells.append("")
    table = [c for c in cells if isinstance(c, list)]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols) - 1)]
    for c in cells:
        if isinstance(c, str):
            print(c, file=out)
            continue
        print("  ".join([x.ljust(w) if i < 2 else x.rjust(w)
                         for i, (x, w) in enumerate(zip(c[:-1], widths, strict=True))]
                        + [c[-1]]).rstrip(), file=out)
    print("COORD ÷ THIS: coord's figure over this row's: by OPS/S where marked * (the median "
          "over rounds; rows run in the same rounds\ngive the median of the per-round ratios), "
          "else by P50. (faster)/(slower) says which way coord stands.", file=out)
