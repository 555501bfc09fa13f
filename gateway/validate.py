"""``gateway validate FILE|-``: check send requests before they are published.

Each record is judged by :func:`gateway.envelope.decode`, the decoder the
gateway itself runs, so a record reported ``ok`` is never rejected for its form
(a ``project_id`` the gateway is not configured for is refused at run time as
``unknown_project``; that depends on the configuration and is not checked here).
The input is JSON Lines (one envelope per line, blank lines skipped) or one JSON
document, such as a pretty-printed envelope.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import orjson

from gateway.envelope import decode
from gateway.errors import InvalidMessage
from gateway.settings import Settings

DESCRIPTION = """\
Check send-request envelopes with the decoder the gateway itself runs: a record
reported ok is never rejected for its form. Prints "line N: ok" or
"line N: <reason>: <detail>" for each record, then a summary; exits 0 when every
record is valid, 1 otherwise (also when there is none), 2 when FILE cannot be read.

The input is JSON Lines (one envelope per line, blank lines skipped) or one JSON
document. A project_id the gateway is not configured for is refused at run time
(unknown_project); that depends on the configuration and is not checked here.
"""


def records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """``(line number, value)`` of each record of ``data``.

    Several non-blank lines that together parse as one JSON document are one
    record (numbered by its first line); otherwise every non-blank line is one.
    Whitespace around a record is not part of it.
    """
    lines = [(n, line.strip()) for n, line in enumerate(data.split(b"\n"), start=1)]
    lines = [(n, line) for n, line in lines if line]
    if len(lines) > 1:
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            yield lines[0][0], data.strip()
            return
    yield from lines


def check(data: bytes, *, max_bytes: int) -> Iterator[tuple[int, InvalidMessage | None]]:
    """``(line number, None if valid else why not)`` of each record."""
    for line, value in records(data):
        try:
            decode(value, max_bytes=max_bytes)
        except InvalidMessage as exc:
            yield line, exc
        else:
            yield line, None


def report(data: bytes, *, max_bytes: int, quiet: bool, out: TextIO) -> int:
    """Print one line per record (only the invalid ones when ``quiet``) and a summary.

    0 when every record is valid, 1 when one is not or there is none.
    """
    valid = invalid = 0
    for line, problem in check(data, max_bytes=max_bytes):
        if problem is None:
            valid += 1
            if not quiet:
                print(f"line {line}: ok", file=out)
        else:
            invalid += 1
            print(f"line {line}: {problem.reason}: {problem.detail}", file=out)
    total = valid + invalid
    if total == 0:
        print("no records", file=out)
        return 1
    print(f"{total} record{'s' if total != 1 else ''}: {valid} valid, {invalid} invalid", file=out)
    return 0 if invalid == 0 else 1


def _read(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    return Path(source).read_bytes()


async def _validate(ns: argparse.Namespace) -> int:
    try:
        data = _read(ns.file)
    except OSError as exc:
        print(f"gateway validate: cannot read {ns.file}: {exc.strerror}", file=sys.stderr)
        return 2
    return report(data, max_bytes=ns.max_bytes, quiet=ns.quiet, out=sys.stdout)


def _byte_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a whole number of bytes") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least 1")
    return count


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "validate",
        help="check send-request envelopes with the gateway's own decoder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "file",
        metavar="FILE|-",
        help="JSON Lines (one envelope per line) or one JSON document; - reads standard input",
    )
    parser.add_argument(
        "--max-bytes",
        type=_byte_count,
        default=Settings().max_message_bytes,
        help="largest record value the gateway takes, its max_message_bytes (default: %(default)s)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print only the invalid records and the summary (default: every record)",
    )
    parser.set_defaults(handler=_validate)
