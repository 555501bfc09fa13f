"""Read Locust's ``*_stats.csv`` and judge a run: rate reached, no failures, latencies.

No Locust import: the tests and ``run.py`` use it on the CSV files alone.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

PRODUCE = ("kafka", "produce")
E2E = ("e2e", "result")
PERCENTILES = ("50%", "90%", "95%", "99%", "100%")


@dataclass(frozen=True, slots=True)
class Row:
    kind: str
    name: str
    count: int
    failures: int
    average_ms: float
    rps: float
    percentiles_ms: dict[str, float]


def read_stats(path: Path) -> dict[tuple[str, str], Row]:
    """Rows of Locust's ``<prefix>_stats.csv`` by (Type, Name); the total is ("", "Aggregated")."""
    rows: dict[tuple[str, str], Row] = {}
    with path.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            pct = {p: float(rec[p]) for p in PERCENTILES if rec.get(p) not in (None, "", "N/A")}
            row = Row(
                kind=rec["Type"],
                name=rec["Name"],
                count=int(rec["Request Count"]),
                failures=int(rec["Failure Count"]),
                average_ms=float(rec["Average Response Time"]),
                rps=float(rec["Requests/s"]),
                percentiles_ms=pct,
            )
            rows[(row.kind, row.name)] = row
    return rows


def problems(
    rows: dict[tuple[str, str], Row], *, target_rate: float, tolerance: float = 0.1
) -> list[str]:
    """Why the run does not pass; empty when it does.

    Passing means: requests were published at the target rate (within ``tolerance``),
    every one of them came back on the results topic as sent, and no request of any
    kind (produce, result, webhook) failed.
    """
    found: list[str] = []
    produce, e2e = rows.get(PRODUCE), rows.get(E2E)
    if produce is None or e2e is None:
        return [f"missing rows: {[k for k in (PRODUCE, E2E) if k not in rows]}"]
    # Locust's own rate: requests over the span from the test start to the last one.
    if abs(produce.rps - target_rate) > tolerance * target_rate:
        found.append(f"published {produce.rps:.1f}/s, target {target_rate:g}/s")
    if e2e.count != produce.count:
        found.append(f"{produce.count} published but {e2e.count} results")
    for (kind, name), row in rows.items():
        if row.failures:
            found.append(f"{row.failures} failures in {kind or 'all'} {name}")
    return found


def table(rows: dict[tuple[str, str], Row]) -> str:
    """A Markdown table of every row: count, Locust's rate, failures, latencies (ms)."""
    head = [
        "type",
        "name",
        "requests",
        "req/s",
        "failures",
        "avg ms",
        *(f"p{p.rstrip('%')} ms" if p != "100%" else "max ms" for p in PERCENTILES),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows.values():
        if not row.kind and row.name == "Aggregated":
            continue
        cells = [
            row.kind,
            row.name,
            str(row.count),
            f"{row.rps:.1f}",
            str(row.failures),
            f"{row.average_ms:.1f}",
            *(
                f"{row.percentiles_ms[p]:g}" if p in row.percentiles_ms else "-"
                for p in PERCENTILES
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
