"""``gateway redrive``: the command over :func:`gateway.redrive.redrive`.

Arguments are checked before Kafka is touched (exit 2, naming the option);
progress goes to stderr (one rewritten line on a terminal, else a line every
10,000 records) and the summary to stdout; exit 1 when Kafka cannot be reached
or refused a re-published record.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import TextIO

from gateway.envelope import iso
from gateway.redrive import RedriveError, Selection, Summary, redrive
from gateway.settings import Settings

_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> int:
    """Unix milliseconds of an RFC 3339 time (UTC if it names no offset) or of ``30m`` ago."""
    text = text.strip()
    ago = _AGO.fullmatch(text)
    if ago:
        seconds = float(ago.group(1)) * _UNIT_S[ago.group(2)]
        return int(((time.time() if now is None else now) - seconds) * 1000)
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an RFC 3339 time (2025-05-01T10:00:00Z) "
            "or a time ago (90s, 30m, 2h, 7d)"
        ) from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return int(at.timestamp() * 1000)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _http_status(text: str) -> int:
    if not (text.isdigit() and 100 <= int(text) <= 599):
        raise argparse.ArgumentTypeError(f"{text!r}: expected an HTTP status 100-599")
    return int(text)


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return text.strip()


def _topic(text: str) -> str:
    if not _TOPIC_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: not a Kafka topic name ([A-Za-z0-9._-])")
    return text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.cli import _HelpFormatter
    from gateway.settings import ENV_PREFIX

    p = sub.add_parser(
        "redrive",
        help="publish DLQ records again, each once",
        description="Publish dead-lettered records back to the requests topic they came "
        "from: value and key unchanged, the producer's headers, gateway.redrives counting "
        "re-drives. Reads the DLQ up to its end at start; records already re-driven (named "
        f"in the ledger topic) are skipped. Same TOML file and {ENV_PREFIX}* variables as run.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--config", help=f"TOML file (default: the file named by ${ENV_PREFIX}CONFIG, else none)"
    )
    p.add_argument(
        "--reason",
        action="append",
        type=_non_empty,
        help="only this gateway.reason, repeatable (default: every reason)",
    )
    p.add_argument(
        "--http-status",
        action="append",
        type=_http_status,
        help="only this gateway.http_status, repeatable (default: any)",
    )
    p.add_argument(
        "--app",
        action="append",
        type=_non_empty,
        help="only records of this payload.app_id, repeatable (default: every app)",
    )
    p.add_argument(
        "--since",
        type=parse_time,
        help="dead-lettered at or after: RFC 3339, or a time ago (30m, 2h, 7d) (default: the "
        "beginning)",
    )
    p.add_argument(
        "--until", type=parse_time, help="dead-lettered before, same forms (default: no bound)"
    )
    p.add_argument("--limit", type=_positive_int, help="re-drive at most this many (default: all)")
    p.add_argument(
        "--max-redrives",
        type=_positive_int,
        default=3,
        help="skip records already re-driven this many times",
    )
    p.add_argument(
        "--to-topic",
        type=_topic,
        help="publish here instead (default: the requests topic the record came from)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show what would be re-driven, publish nothing"
    )
    p.set_defaults(handler=_command)


async def _command(ns: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.settings import load

    logs.setup("WARNING", "text")
    settings = load(ns.config)
    if ns.since is not None and ns.until is not None and ns.since >= ns.until:
        return _usage("--since must be before --until")
    if ns.to_topic in (settings.dlq_topic, settings.redrive_ledger_topic):
        return _usage(f"--to-topic {ns.to_topic}: that is the DLQ or the ledger, not an input")
    selection = Selection(
        reasons=frozenset(ns.reason or ()),
        http_statuses=frozenset(ns.http_status or ()),
        apps=frozenset(ns.app or ()),
        since_ms=ns.since,
        until_ms=ns.until,
        limit=ns.limit,
        max_redrives=ns.max_redrives,
    )
    meter = Meter(sys.stderr)
    try:
        summary = await redrive(
            settings, selection, dry_run=ns.dry_run, to_topic=ns.to_topic, progress=meter
        )
    except RedriveError as exc:
        meter.end()
        print(f"gateway redrive: {exc}", file=sys.stderr)
        return 1
    meter.end()
    print(report(summary, settings, selection))
    return 1 if summary.refused else 0


def _usage(message: str) -> int:
    print(f"gateway redrive: error: {message}", file=sys.stderr)
    return 2


class Meter:
    """Progress on stderr: one rewritten line on a terminal, else a line every ``every``."""

    def __init__(self, out: TextIO, *, every: int = 10_000, interval_s: float = 0.2) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every = every
        self.interval_s = interval_s
        self._shown_at = 0.0
        self._drawn = False

    def __call__(self, sm: Summary) -> None:
        if self.tty:
            now = time.monotonic()
            if now - self._shown_at < self.interval_s:
                return
            self._shown_at = now
            self.out.write(f"\r{self.line(sm)}\x1b[K")
            self.out.flush()
            self._drawn = True
        elif sm.scanned % self.every == 0:
            print(self.line(sm), file=self.out)

    @staticmethod
    def line(sm: Summary) -> str:
        share = f" ({100 * sm.scanned / sm.total:.0f}%)" if sm.total else ""
        verb = "to re-drive" if sm.dry_run else "re-driven"
        done = sm.selected if sm.dry_run else sm.redriven
        return (
            f"scanned {sm.scanned:,} of {sm.total:,}{share}, matched {sm.matched:,}, "
            f"{verb} {done:,}"
        )

    def end(self) -> None:
        if self._drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()


def report(sm: Summary, settings: Settings, sel: Selection) -> str:
    """The run's summary for a human: totals, a table by reason, and samples on a dry run."""
    lines = []
    if sm.dry_run:
        lines.append(f"dry run: nothing published ({settings.dlq_topic})")
    lines.append(
        f"scanned {sm.scanned:,}, matched {sm.matched:,}, "
        + (f"would re-drive {sm.selected:,}" if sm.dry_run else f"re-driven {sm.redriven:,}")
        + f", skipped {sm.already:,} already re-driven and {sm.too_many:,} re-driven "
        f"{sel.max_redrives}+ times (--max-redrives)"
        + (f", refused by Kafka {sm.refused:,}" if sm.refused else "")
    )
    if sm.by_reason:
        cols = ["matched", "selected" if sm.dry_run else "redriven", "already", "too_many"]
        heads = ["reason", "matched", "to re-drive" if sm.dry_run else "re-driven"]
        heads += ["already", "too many"]
        if sm.refused:
            cols.append("refused")
            heads.append("refused")
        rows = [[r, *(str(c[k]) for k in cols)] for r, c in sorted(sm.by_reason.items())]
        lines.append(_table(heads, rows))
    if sm.dry_run and sm.by_app:
        rows = [[app, str(n)] for app, n in sm.by_app.most_common()]
        lines.append(_table(["app", "to re-drive"], rows))
    if sm.dry_run and sm.samples:
        heads = ["partition/offset", "dead-lettered", "reason", "http", "app", "request_id"]
        heads += ["redrives", "to"]
        rows = [
            [
                f"{s.partition}/{s.offset}",
                iso(s.timestamp_ms / 1000),
                s.reason,
                str(s.http_status or "-"),
                s.app_id or "-",
                s.request_id or "-",
                str(s.redrives),
                s.to_topic,
            ]
            for s in sm.samples
        ]
        lines.append(f"first {len(rows)}:\n" + _table(heads, rows))
    return "\n".join(lines)


def _table(heads: Collection[str], rows: list[list[str]]) -> str:
    table = [list(heads), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    # counts to the right, words to the left
    numeric = [all(row[i].isdigit() or row[i] == "-" for row in rows) for i in range(len(widths))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if numeric[i] else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    )
