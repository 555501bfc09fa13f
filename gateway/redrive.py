"""``gateway redrive``: DLQ records back to the requests topic, each once.

The DLQ holds the original records unchanged (value, key, the producer's
headers) plus the gateway's ``gateway.*`` headers that say why
(:func:`gateway.outcomes.dlq_headers`). A re-drive reads the DLQ up to its end
when the command started (records dead-lettered during the run wait for the
next one), picks records by reason, HTTP status, app and time, and publishes
each one's value and key unchanged to the topic it came from (the requests
topic, or the high-priority one), with the producer's headers and
``gateway.redrives`` counting its re-drives. A record already re-driven
``--max-redrives`` times is left in the DLQ and reported.

Idempotence: the ledger topic (``redrive_ledger_topic``, compacted) holds one
record per re-driven DLQ record, keyed ``<dlq topic>/<partition>/<offset>``. A
run reads the whole ledger first and skips what it names; a record's ledger
entry is written only after Kafka acknowledged the re-published record. So a
second run publishes nothing again, and a run that dies between the two writes
re-drives those few records once more on the next run (at-least-once; the
gateway's own ``request_id`` dedupe catches a copy of a record that was sent).
Two re-drives of one DLQ at the same time do not see each other's entries: run
one at a time. A tombstone (null value) written to a ledger key lets that DLQ
record be re-driven again.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from gateway.envelope import iso, peek_ids
from gateway.outcomes import dlq_headers
from gateway.settings import Settings

REDRIVES_HEADER = "gateway.redrives"
# Every header the gateway adds to a DLQ record, from the function that adds them.
DLQ_HEADERS = frozenset(
    name
    for name, _ in dlq_headers(
        "-", http_status=0, first_error_at=0.0, last_error_at=0.0, detail="-", source="-"
    )
)
BATCH = 500  # re-published records whose acknowledgements are awaited together
SAMPLES = 10  # records shown by --dry-run
IDLE_S = 30.0  # a partition short of its end that yields nothing this long is an error
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Headers = list[tuple[str, bytes]]


class RedriveError(Exception):
    """The re-drive cannot run or could not finish (Kafka, a missing topic)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """Which DLQ records to re-drive. Empty sets select everything.

    Times are unix milliseconds of the DLQ record (when it was dead-lettered):
    ``since_ms`` inclusive, ``until_ms`` exclusive. ``limit`` caps the records
    re-driven (already re-driven and over-limit ones do not count).
    """

    reasons: frozenset[str] = frozenset()
    http_statuses: frozenset[int] = frozenset()
    apps: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int | None = None
    max_redrives: int = 3


@dataclass(slots=True)
class DlqRecord:
    """One DLQ record as the re-drive sees it."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers

    def header(self, name: str) -> str | None:
        for key, raw in reversed(self.headers):  # the last one: the latest ending's
            if key == name:
                return raw.decode(errors="replace")
        return None

    @property
    def reason(self) -> str:
        return self.header("gateway.reason") or "unknown"

    @property
    def http_status(self) -> int | None:
        text = self.header("gateway.http_status")
        return int(text) if text and text.isdigit() else None

    @property
    def redrives(self) -> int:
        text = self.header(REDRIVES_HEADER)
        return int(text) if text and text.isdigit() else 0

    @property
    def source_topic(self) -> str | None:
        source = self.header("gateway.source")
        return source.rsplit("/", 2)[0] if source and source.count("/") >= 2 else None

    def ids(self, max_bytes: int) -> tuple[str | None, str | None]:
        """(request_id, app_id) as far as the value tells them."""
        return peek_ids(self.value, max_bytes=max_bytes)

    def republished_headers(self) -> Headers:
        """The producer's headers, without the DLQ's, and the re-drive count plus one."""
        kept = [h for h in self.headers if h[0] not in DLQ_HEADERS and h[0] != REDRIVES_HEADER]
        return [*kept, (REDRIVES_HEADER, str(self.redrives + 1).encode())]


def matches(rec: DlqRecord, sel: Selection, app_id: str | None) -> bool:
    """Whether ``rec`` passes the filters (``app_id``: read from its value)."""
    if sel.since_ms is not None and rec.timestamp_ms < sel.since_ms:
        return False
    if sel.until_ms is not None and rec.timestamp_ms >= sel.until_ms:
        return False
    if sel.reasons and rec.reason not in sel.reasons:
        return False
    if sel.http_statuses and rec.http_status not in sel.http_statuses:
        return False
    return not sel.apps or app_id in sel.apps


@dataclass(frozen=True, slots=True)
class Sample:
    partition: int
    offset: int
    timestamp_ms: int
    reason: str
    http_status: int | None
    app_id: str | None
    request_id: str | None
    redrives: int
    to_topic: str


@dataclass(slots=True)
class Summary:
    """What one run did. ``selected``: re-driven, or that would be with --dry-run."""

    dry_run: bool = False
    total: int = 0  # records between the start positions and the ends
    scanned: int = 0
    matched: int = 0
    selected: int = 0
    redriven: int = 0
    already: int = 0
    too_many: int = 0
    refused: int = 0
    by_reason: dict[str, Counter[str]] = field(default_factory=dict)
    by_app: Counter[str] = field(default_factory=Counter)
    samples: list[Sample] = field(default_factory=list)

    def count(self, reason: str, what: str) -> None:
        self.by_reason.setdefault(reason, Counter())[what] += 1


Progress = Callable[[Summary], None]


async def redrive(
    settings: Settings,
    selection: Selection,
    *,
    dry_run: bool = False,
    to_topic: str | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Re-drive the DLQ records ``selection`` picks; the summary of the run.

    Raises :class:`RedriveError` when Kafka cannot be reached or the DLQ topic does
    not exist; records Kafka refused are counted in ``refused`` (no ledger entry:
    the next run tries them again).
    """
    summary = Summary(dry_run=dry_run)
    ledger_ready = await _ledger_topic(settings, create=not dry_run)
    done = await _read_ledger(settings) if ledger_ready else {}
    consumer = _consumer(settings)
    producer = None if dry_run else _producer(settings)
    try:
        await _start(consumer, settings)
        if producer is not None:
            await _start(producer, settings)
        tps = await _partitions(consumer, settings.dlq_topic)
        ends = await _ends(consumer, tps)
        starts = await _starts(consumer, tps, selection.since_ms)
        summary.total = sum(max(0, ends[tp] - starts[tp]) for tp in tps)
        run = _Run(settings, selection, summary, done, producer, to_topic)
        async for rec in _records(consumer, starts, ends):
            if not await run.take(rec):
                break
            if progress is not None:
                progress(summary)
        await run.flush()
    except KafkaError as exc:
        raise RedriveError(f"Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        await consumer.stop()
        if producer is not None:
            await producer.stop()
    return summary


class _Run:
    """The decisions of one run, and the re-published records awaiting acknowledgement."""

    def __init__(
        self,
        settings: Settings,
        selection: Selection,
        summary: Summary,
        done: dict[int, set[int]],
        producer: AIOKafkaProducer | None,
        to_topic: str | None,
    ) -> None:
        self.s = settings
        self.sel = selection
        self.summary = summary
        self.done = done
        self.producer = producer
        self.to_topic = to_topic
        self.pending: list[tuple[DlqRecord, asyncio.Future[Any]]] = []

    def target(self, rec: DlqRecord) -> str:
        if self.to_topic:
            return self.to_topic
        high = self.s.requests_high_topic
        return high if rec.source_topic == high else self.s.requests_topic

    async def take(self, rec: DlqRecord) -> bool:
        """Count and maybe re-drive one record; False once the limit is reached."""
        sm, sel = self.summary, self.sel
        sm.scanned += 1
        request_id, app_id = rec.ids(self.s.max_message_bytes)
        if not matches(rec, sel, app_id):
            return True
        sm.matched += 1
        reason = rec.reason
        sm.count(reason, "matched")
        if rec.offset in self.done.get(rec.partition, ()):
            sm.already += 1
            sm.count(reason, "already")
            return True
        if rec.redrives >= sel.max_redrives:
            sm.too_many += 1
            sm.count(reason, "too_many")
            return True
        sm.selected += 1
        sm.count(reason, "selected")
        sm.by_app[app_id or "unknown"] += 1
        topic = self.target(rec)
        if len(sm.samples) < SAMPLES:
            sm.samples.append(
                Sample(
                    rec.partition,
                    rec.offset,
                    rec.timestamp_ms,
                    reason,
                    rec.http_status,
                    app_id,
                    request_id,
                    rec.redrives,
                    topic,
                )
            )
        if self.producer is not None:
            fut = await self.producer.send(
                topic, rec.value, key=rec.key, headers=rec.republished_headers()
            )
            self.pending.append((rec, fut))
            if len(self.pending) >= BATCH:
                await self.flush()
        return sel.limit is None or sm.selected < sel.limit

    async def flush(self) -> None:
        """Await the pending records, then write the ledger entries of those acknowledged."""
        pending, self.pending = self.pending, []
        if not pending or self.producer is None:
            return
        answers = await asyncio.gather(*(fut for _, fut in pending), return_exceptions=True)
        entries: list[asyncio.Future[Any]] = []
        acked: list[DlqRecord] = []
        dlq, ledger = self.s.dlq_topic, self.s.redrive_ledger_topic
        for (rec, _), meta in zip(pending, answers, strict=True):
            if isinstance(meta, BaseException):
                self.summary.refused += 1
                self.summary.count(rec.reason, "refused")
                print(
                    f"gateway redrive: {dlq}/{rec.partition}/{rec.offset} refused: {meta}",
                    file=sys.stderr,
                )
                continue
            value = orjson.dumps(
                {
                    "redriven_to": f"{meta.topic}/{meta.partition}/{meta.offset}",
                    "redrives": rec.redrives + 1,
                    "at": iso(time.time()),
                }
            )
            key = f"{dlq}/{rec.partition}/{rec.offset}".encode()
            entries.append(await self.producer.send(ledger, value, key=key))
            acked.append(rec)
        # The re-published records are in; a crash before these land re-drives them once more.
        await asyncio.gather(*entries)
        for rec in acked:
            self.done.setdefault(rec.partition, set()).add(rec.offset)
            self.summary.redriven += 1
            self.summary.count(rec.reason, "redriven")


# -- Kafka ------------------------------------------------------------------


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    from gateway.producer import kafka_options

    return AIOKafkaConsumer(
        **kafka_options(settings),
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=max(1_048_576, 2 * settings.max_message_bytes),
        fetch_max_bytes=max(52_428_800, 2 * settings.max_message_bytes),
    )


def _producer(settings: Settings) -> AIOKafkaProducer:
    from gateway.producer import kafka_options

    # the default partitioner (murmur2, as Java clients): a key goes where its
    # producer's records go
    return AIOKafkaProducer(
        **kafka_options(settings),
        acks="all",
        enable_idempotence=settings.producer_idempotence,
        linger_ms=10,
        max_request_size=max(8 << 20, 2 * settings.max_message_bytes),
    )


async def _start(client: AIOKafkaConsumer | AIOKafkaProducer, settings: Settings) -> None:
    try:
        await client.start()
    except KafkaError as exc:
        await client.stop()
        raise RedriveError(f"Kafka at {settings.kafka_bootstrap} refused: {exc}") from exc


async def _ledger_topic(settings: Settings, *, create: bool) -> bool:
    """Whether the ledger exists, creating it (with the gateway's topics) if allowed."""
    from aiokafka.admin import AIOKafkaAdminClient

    from gateway.producer import ensure_topics, kafka_options

    topic = settings.redrive_ledger_topic
    admin = AIOKafkaAdminClient(**kafka_options(settings))
    try:
        await admin.start()
        exists = topic in await admin.list_topics()
        if exists or not create:
            return exists
        if not settings.create_topics:
            raise RedriveError(
                f"the ledger topic {topic} (redrive_ledger_topic) does not exist and "
                "create_topics is off: create it with cleanup.policy=compact"
            )
        await ensure_topics(settings)
        return True
    except KafkaError as exc:
        raise RedriveError(f"Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        await admin.close()


async def _read_ledger(settings: Settings) -> dict[int, set[int]]:
    """The DLQ offsets already re-driven, by partition (this DLQ's entries only)."""
    prefix = f"{settings.dlq_topic}/"
    done: dict[int, set[int]] = {}
    consumer = _consumer(settings)
    try:
        await _start(consumer, settings)
        tps = await _partitions(consumer, settings.redrive_ledger_topic)
        ends = await _ends(consumer, tps)
        starts = await consumer.beginning_offsets(tps)
        async for rec in _records(consumer, starts, ends):
            key = (rec.key or b"").decode(errors="replace")
            if not key.startswith(prefix):
                continue
            partition, _, offset = key[len(prefix) :].partition("/")
            if not (partition.isdigit() and offset.isdigit()):
                continue
            entries = done.setdefault(int(partition), set())
            if rec.value is None:  # a tombstone: may be re-driven again
                entries.discard(int(offset))
            else:
                entries.add(int(offset))
    except KafkaError as exc:
        raise RedriveError(f"reading the ledger {settings.redrive_ledger_topic}: {exc}") from exc
    finally:
        await consumer.stop()
    return done


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    await consumer.topics()  # metadata of every topic
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise RedriveError(f"topic {topic} does not exist")
    return [TopicPartition(topic, p) for p in sorted(parts)]


async def _ends(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """Each partition's high watermark now: where this run stops reading.

    ListOffsets(latest) is the end on Kafka; some Kafka-protocol brokers (Tansu)
    answer where the last batch starts + 1, so a fetch from there reads the high
    watermark too, and the larger of the two is the end.
    """
    latest = await consumer.end_offsets(tps)
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, max(0, latest[tp] - 1))
    async with asyncio.timeout(IDLE_S):
        while any(consumer.highwater(tp) is None for tp in tps):
            await consumer.getmany(*tps, timeout_ms=100)
    return {tp: max(latest[tp], consumer.highwater(tp) or 0) for tp in tps}


async def _starts(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], since_ms: int | None
) -> dict[TopicPartition, int]:
    """Where each partition is read from: its beginning, or the first record at ``since_ms``."""
    starts: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
    if since_ms is None:
        return starts
    found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
    for tp, at in found.items():
        # None: nothing that recent; records are still filtered by time one by one
        starts[tp] = max(starts[tp], at.offset) if at is not None else 1 << 62
    return starts


async def _records(
    consumer: AIOKafkaConsumer,
    starts: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
) -> AsyncIterator[DlqRecord]:
    """The records from ``starts`` up to (not including) ``ends``, partition by partition."""
    left = {tp: end for tp, end in ends.items() if starts[tp] < end}
    if not left:
        return
    # only partitions with a position: one without would be reset (a request that
    # some brokers leave unanswered, holding up even the consumer's stop)
    consumer.assign(list(left))
    for tp in left:
        consumer.seek(tp, starts[tp])
    last_seen = time.monotonic()
    while left:
        batch = await consumer.getmany(*left, timeout_ms=200, max_records=BATCH)
        for tp, records in batch.items():
            end = left.get(tp)
            if end is None:
                continue
            for r in records:
                if r.offset >= end:
                    break
                last_seen = time.monotonic()
                yield DlqRecord(
                    r.partition, r.offset, r.timestamp, r.key, r.value, list(r.headers or ())
                )
        for tp in list(left):
            if await consumer.position(tp) >= left[tp]:
                del left[tp]
        if left and time.monotonic() - last_seen > IDLE_S:
            where = ", ".join(f"{tp.topic}/{tp.partition} up to {end}" for tp, end in left.items())
            raise RedriveError(f"no records for {IDLE_S:.0f} s while reading {where}")


# -- the command ------------------------------------------------------------


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
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    )
