"""Outcomes: the one place where a record read from Kafka ends.

Every record ends here exactly once, in one of these ways:

==========  ==========================================  ===========================
ending      written to Kafka                            then
sent        result + status                             request_id remembered as sent
failed      original record to the DLQ + result
expired     result
rejected    original record to the DLQ + result         (the record did not decode)
duplicate   nothing                                     (already sent or in flight)
==========  ==========================================  ===========================

A record is *finished* (its offset may be committed, its budget is freed) only
once Kafka has acknowledged everything its ending writes. A write that Kafka
refuses, or that the producer raises on at once, is retried with back-off for
as long as it takes; meanwhile its partition commits nothing past it, a metric
and an alert show it, and ``/readyz`` turns false after ``outcome_stuck_s``.
The outputs that were acknowledged are not written again.

Writes run in tasks of their own, so a slow or refusing Kafka never holds a
Sinch in-flight permit. On revocation the writes of the revoked partitions get
a bounded time; the ones still unwritten are abandoned (their offsets are not
committed, so the next owner reads the records again). A ``sent`` ending that
was abandoned is remembered: when the same record is read again in this
process it gets its result written, without a second send.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway.envelope import Request, Status, result_record
from gateway.offsets import Origin, PartitionTracker

if TYPE_CHECKING:
    from gateway.dedupe import RecentIds
    from gateway.metrics import Metrics
    from gateway.settings import Settings

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]

SPILL_HEADER = "gateway.spill."
SPILLED_FROM = "gateway.spill.from"  # topic/partition/offset the producer wrote it to
ORIGINAL_KEY = "gateway.spill.key"  # the producer's own key


class Publisher(Protocol):
    """What outcomes need of a Kafka producer: a send that returns the ack future."""

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class Output:
    """One record an ending writes."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: Headers | None = None
    partition: int | None = None
    timestamp_ms: int | None = None


@dataclass(slots=True, eq=False)
class Ending:
    """A record's ending and the outputs that are still to be acknowledged."""

    status: Status | None  # None: a duplicate or a spill, which count in no outcome
    origin: Origin
    request: Request | None
    outputs: list[Output]
    app_label: str = "none"
    failing_since: float | None = None
    spill: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def dlq_headers(
    reason: str,
    *,
    http_status: int | None = None,
    attempts: int = 0,
    first_error_at: float | None = None,
    last_error_at: float | None = None,
    detail: str = "",
    source: str | None = None,
) -> Headers:
    """The gateway's headers on a DLQ record: why, and where the record came from."""
    headers: Headers = [("gateway.reason", reason.encode())]
    if detail:
        headers.append(("gateway.detail", detail[:512].encode()))
    if http_status is not None:
        headers.append(("gateway.http_status", str(http_status).encode()))
    headers.append(("gateway.attempts", str(attempts).encode()))
    if first_error_at is not None:
        headers.append(("gateway.first_error_time", f"{first_error_at:.3f}".encode()))
    if last_error_at is not None:
        headers.append(("gateway.last_error_time", f"{last_error_at:.3f}".encode()))
    if source is not None:
        headers.append(("gateway.source", source.encode()))
    return headers


Release = Callable[[Ending, bool], None]


class Outcomes:
    """Writes every ending and tells intake when a record is finished.

    ``release(ending, finished)`` is called once per record: ``finished`` is True
    when its outputs are acknowledged (commit it), False when the ending was
    abandoned on revocation (free its budget, commit nothing).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        publisher: Publisher,
        metrics: Metrics,
        sent_ids: RecentIds,
        clock: Callable[[], float],
        release: Release,
        orphans_size: int = 10_000,
    ) -> None:
        self._s = settings
        self._pub = publisher
        self._m = metrics
        self._sent_ids = sent_ids
        self._clock = clock
        self._release = release
        self._writing: dict[PartitionTracker, set[Ending]] = {}  # by the partition read
        self._failing: dict[Ending, float] = {}
        self._orphans: OrderedDict[str, Ending] = OrderedDict()
        self._orphans_size = orphans_size
        for topic in (settings.results_topic, settings.status_topic, settings.dlq_topic):
            metrics.outcome_write_failures.labels(topic)  # counted from 0, not first failure

    # -- the endings ------------------------------------------------------

    def sent(
        self,
        req: Request,
        *,
        message_id: str | None,
        accepted_time: str | None,
        timings: dict[str, float],
    ) -> None:
        s = self._s
        origin = self._origin(req)
        record = result_record(
            request_id=req.request_id,
            status=Status.SENT,
            app_id=req.app_id,
            attempts=req.attempts,
            http_status=200,
            message_id=message_id,
            accepted_time=accepted_time,
            timings=timings,
            partition=origin.partition,
            offset=origin.offset,
        )
        status_doc = orjson.dumps(
            {
                "request_id": req.request_id,
                "message_id": message_id,
                "status": "sent",
                "app_id": req.app_id,
                "event_time": accepted_time,
            }
        )
        key = req.request_id.encode()
        self._start(
            Status.SENT,
            origin,
            req,
            [Output(s.results_topic, record, key), Output(s.status_topic, status_doc, key)],
        )

    def failed(
        self,
        req: Request,
        reason: str,
        *,
        http_status: int | None = None,
        error: Any = None,
    ) -> None:
        """Terminal failure: the original record to the DLQ and a ``failed`` result."""
        s = self._s
        origin = self._origin(req)
        headers = list(origin.headers) + dlq_headers(
            reason,
            http_status=http_status,
            attempts=req.attempts,
            first_error_at=req.first_error_at,
            last_error_at=req.last_error_at,
            detail=orjson.dumps(error).decode() if error else "",
            source=origin.where(),
        )
        record = result_record(
            request_id=req.request_id,
            status=Status.FAILED,
            app_id=req.app_id,
            attempts=req.attempts,
            http_status=http_status,
            error=error,
            partition=origin.partition,
            offset=origin.offset,
        )
        self._m.dlq.labels(reason).inc()
        log.warning("request_id=%s failed: %s", req.request_id, reason)
        self._start(
            Status.FAILED,
            origin,
            req,
            [
                Output(s.dlq_topic, origin.value, origin.key, headers),
                Output(s.results_topic, record, req.request_id.encode()),
            ],
        )

    def expired(self, req: Request) -> None:
        origin = self._origin(req)
        record = result_record(
            request_id=req.request_id,
            status=Status.EXPIRED,
            app_id=req.app_id,
            attempts=req.attempts,
            error={"message": "expire_at passed before sending"},
            partition=origin.partition,
            offset=origin.offset,
        )
        self._start(
            Status.EXPIRED,
            origin,
            req,
            [Output(self._s.results_topic, record, req.request_id.encode())],
        )

    def rejected(
        self,
        origin: Origin,
        reason: str,
        detail: str,
        *,
        request_id: str | None = None,
        app_id: str | None = None,
    ) -> None:
        """A record that can never be sent: to the DLQ unchanged, and a ``rejected`` result.

        ``request_id`` and ``app_id`` are whatever could be read of the record, so
        that its producer can tell which of its requests was refused.
        """
        s = self._s
        headers = list(origin.headers) + dlq_headers(reason, detail=detail, source=origin.where())
        record = result_record(
            request_id=request_id,
            status=Status.REJECTED,
            app_id=app_id,
            attempts=0,
            error={"reason": reason, "message": detail},
            partition=origin.partition,
            offset=origin.offset,
        )
        self._m.dlq.labels(reason).inc()
        log.warning(
            "partition %d offset %d rejected: %s: %s",
            origin.partition,
            origin.offset,
            reason,
            detail,
            extra={"partition": origin.partition, "offset": origin.offset},
        )
        result_key = request_id.encode() if request_id else origin.key
        ending = self._start(
            Status.REJECTED,
            origin,
            None,
            [
                Output(s.dlq_topic, origin.value, origin.key, headers),
                Output(s.results_topic, record, result_key),
            ],
        )
        ending.app_label = self._m.app_label(app_id) if app_id else "none"

    def spilled(self, req: Request, *, topic: str, partition: int) -> None:
        """The record waits in the spill topic: the original is finished once that is written.

        The value and the producer's headers are kept unchanged; the record's key
        becomes its app_id, and the original key and place travel in headers.
        """
        origin = self._origin(req)
        headers: Headers = [h for h in origin.headers if not h[0].startswith(SPILL_HEADER)]
        headers.append((SPILLED_FROM, origin.where().encode()))
        if origin.key is not None:
            headers.append((ORIGINAL_KEY, origin.key))
        out = Output(
            topic,
            origin.value,
            req.app_id.encode(),
            headers,
            partition=partition,
            timestamp_ms=origin.timestamp_ms or None,
        )
        ending = self._start(None, origin, req, [out])
        ending.spill = True

    def duplicate(self, origin: Origin) -> None:
        """Already sent or in flight: finished at once, nothing written."""
        self._m.duplicates.inc()
        self._release(Ending(None, origin, None, []), True)

    def adopt(self, req: Request) -> bool:
        """Finish a re-read record whose ``sent`` ending was abandoned here; True if so.

        Its message went to Sinch already; what is missing is the result.
        """
        orphan = self._orphans.pop(req.request_id, None)
        if orphan is None:
            return False
        log.info("request_id=%s: writing the result of an earlier send", req.request_id)
        self._start(Status.SENT, self._origin(req), req, orphan.outputs)
        return True

    # -- writing ----------------------------------------------------------

    @staticmethod
    def _origin(req: Request) -> Origin:
        if req.origin is None:
            raise ValueError(f"request {req.request_id} has no origin to end")
        return req.origin

    def _start(
        self, status: Status | None, origin: Origin, req: Request | None, outputs: list[Output]
    ) -> Ending:
        ending = Ending(status, origin, req, outputs)
        if req is not None:
            ending.app_label = self._m.app_label(req.app_id)
        self._writing.setdefault(origin.tracker, set()).add(ending)
        ending.task = asyncio.create_task(self._write(ending))
        return ending

    async def _write(self, ending: Ending) -> None:
        attempt = 0
        try:
            while True:
                ending.outputs = await self._send_all(ending.outputs)
                if not ending.outputs:
                    break
                attempt += 1
                now = self._clock()
                if ending.failing_since is None:
                    ending.failing_since = now
                    self._failing[ending] = now
                    log.error(
                        "partition %d offset %d: Kafka refused its %s record(s) (%s); "
                        "retrying, nothing past it is committed",
                        ending.origin.partition,
                        ending.origin.offset,
                        ending.status.value if ending.status else "?",
                        ", ".join(sorted({o.topic for o in ending.outputs})),
                    )
                ceiling = min(self._s.backoff_max_s, self._s.backoff_base_s * 2 ** min(attempt, 16))
                await asyncio.sleep(random.uniform(ceiling / 2, ceiling))  # noqa: S311
        except asyncio.CancelledError:
            self._abandon(ending)
            raise
        self._done(ending)

    async def _send_all(self, outputs: list[Output]) -> list[Output]:
        """Send each output; return those Kafka did not acknowledge."""
        futures: list[Awaitable[Any] | BaseException] = []
        for out in outputs:
            try:
                futures.append(
                    await self._pub.send(
                        out.topic,
                        out.value,
                        key=out.key,
                        headers=out.headers,
                        partition=out.partition,
                        timestamp_ms=out.timestamp_ms,
                    )
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused at once (too large, unknown topic, ...)
                futures.append(exc)
        acks = await asyncio.gather(
            *(f for f in futures if not isinstance(f, BaseException)), return_exceptions=True
        )
        ack_iter = iter(acks)
        failed: list[Output] = []
        for out, fut in zip(outputs, futures, strict=True):
            result = fut if isinstance(fut, BaseException) else next(ack_iter)
            if isinstance(result, BaseException):
                self._m.outcome_write_failures.labels(out.topic).inc()
                failed.append(out)
        return failed

    def _forget(self, ending: Ending) -> None:
        writing = self._writing.get(ending.origin.tracker)
        if writing is not None:
            writing.discard(ending)
            if not writing:
                del self._writing[ending.origin.tracker]
        if self._failing.pop(ending, None) is not None:
            log.info(
                "partition %d offset %d: its outputs are written now",
                ending.origin.partition,
                ending.origin.offset,
            )

    def _done(self, ending: Ending) -> None:
        self._forget(ending)
        status = ending.status
        if status is Status.SENT and ending.request is not None:
            # only now: a result that was never written must not make a re-read
            # record look like a duplicate
            self._sent_ids.add(ending.request.request_id)
        if status is not None:
            self._m.outcomes.labels(ending.app_label, status.value).inc()
        elif ending.spill:
            self._m.spilled.labels(ending.app_label).inc()
        self._release(ending, True)

    def _abandon(self, ending: Ending) -> None:
        self._forget(ending)
        if ending.status is Status.SENT and ending.request is not None:
            orphans = self._orphans
            orphans[ending.request.request_id] = ending
            while len(orphans) > self._orphans_size:
                orphans.popitem(last=False)
        self._release(ending, False)

    # -- control ----------------------------------------------------------

    async def settle(self, partitions: set[PartitionTracker] | None, timeout: float) -> bool:
        """Wait for the writes of records read from ``partitions`` (all if None).

        What is left at the deadline is abandoned. True when every write finished.
        """
        tasks = self._tasks(partitions)
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return not pending

    def _tasks(self, partitions: set[PartitionTracker] | None) -> set[asyncio.Task[None]]:
        return {
            ending.task
            for partition, endings in self._writing.items()
            if partitions is None or partition in partitions
            for ending in endings
            if ending.task is not None
        }

    @property
    def writing(self) -> int:
        """Endings whose outputs are not all acknowledged yet."""
        return sum(len(endings) for endings in self._writing.values())

    def failing(self) -> int:
        return len(self._failing)

    def oldest_failure_s(self) -> float:
        """Seconds since the oldest write still being retried first failed (0: none)."""
        if not self._failing:
            return 0.0
        return max(0.0, self._clock() - min(self._failing.values()))

    def stuck(self) -> tuple[bool, str]:
        """Readiness: false while a write has failed for longer than ``outcome_stuck_s``."""
        age = self.oldest_failure_s()
        if age >= self._s.outcome_stuck_s:
            return False, (
                f"{len(self._failing)} record(s) whose outputs Kafka refuses, "
                f"the oldest for {age:.0f} s; their partitions do not commit"
            )
        return True, "written" if not self._failing else "retrying refused writes"
