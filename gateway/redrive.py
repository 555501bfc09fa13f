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

import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

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
SAMPLES = 10  # records kept in the summary (what --dry-run shows)
IDLE_S = 30.0  # a partition short of its end that yields nothing this long is an error

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
        async with contextlib.aclosing(_records(consumer, starts, ends)) as records:
            async for rec in records:
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
    try:
        async with asyncio.timeout(IDLE_S):
            while any(consumer.highwater(tp) is None for tp in tps):
                await consumer.getmany(*tps, timeout_ms=100)
    except TimeoutError:
        topic = tps[0].topic
        raise RedriveError(f"{topic}: no high watermark within {IDLE_S:.0f} s") from None
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
) -> AsyncGenerator[DlqRecord, None]:
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
