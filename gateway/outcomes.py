"""Outcomes: the one place where a record read from Kafka ends.

Every record ends here exactly once, in one of these ways:

==========  ==========================================  ===========================
ending      written to Kafka                            then
sent        result + status                             request_id remembered as sent
failed      original record to the DLQ + result
expired     result
cancelled   result                                      (an operator dropped it)
rejected    original record to the DLQ + result         (the record did not decode)
duplicate   nothing                                     (already sent or in flight)
==========  ==========================================  ===========================

A record is *finished* (its offset may be committed, its budget is freed) only
once Kafka has acknowledged everything its ending writes. A write that Kafka
refuses, or that the producer raises on at once, is retried with back-off for
as long as it takes; meanwhile its partition commits nothing past it, a metric
and an alert show it, and ``/readyz`` turns false after ``outcome_stuck_s``.
The outputs that were acknowledged are not written again.

One writer task hands every ending's outputs to the producer in order, so a
slow or refusing Kafka never holds a Sinch in-flight permit and a spill of
thousands of records does not become thousands of tasks. The writer lingers
(``outcome_linger_ms``) and then hands what gathered to Kafka as one record batch
per topic-partition: at 800 messages/s that is a few dozen records a flush instead
of a ``send()`` each time a send ends, at a fraction of the CPU. On
revocation the writes of the revoked partitions get a bounded time; the ones
still unwritten are abandoned (their offsets are not committed, so the next owner reads the
records again). A ``sent`` ending that was abandoned is remembered: when the
same record is read again in this process it gets its result written, without
a second send.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway.aio import cancel_and_wait, wait_within
from gateway.envelope import Request, Status, result_record
from gateway.offsets import Origin, PartitionTracker
from gateway.producer import Handed, Headers, Output

if TYPE_CHECKING:
    from gateway.dedupe import RecentIds
    from gateway.metrics import Metrics
    from gateway.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 512  # endings handed to the producer between two turns of the event loop
FLUSH_AT = 256  # endings waiting: the writer does not linger

SPILL_HEADER = "gateway.spill."
SPILLED_FROM = "gateway.spill.from"  # topic/partition/offset the producer wrote it to
ORIGINAL_KEY = "gateway.spill.key"  # the producer's own key


class Publisher(Protocol):
    """What outcomes need of a Kafka producer (:meth:`gateway.producer.Publisher.send_many`).

    Records handed over together, each batch with the future of its acknowledgement
    (or what refused it at once) and the indices of its records.
    """

    async def send_many(self, outputs: Sequence[Output]) -> list[Handed]: ...


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
    attempt: int = 0
    waiting: int = 0  # outputs handed to the producer and not answered yet
    abandoned: bool = False
    # a spill of records read one after the other: the ones after ``origin``, finished with it
    others: tuple[Origin, ...] = ()


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
        self._linger_s = settings.outcome_linger_ms / 1000
        self._hurry: asyncio.Future[None] | None = None  # set: stop lingering
        self._pub = publisher
        self._m = metrics
        self._children: dict[tuple[Any, ...], Any] = {}  # per-message counters' children
        self._sent_ids = sent_ids
        self._clock = clock
        self._release = release
        self._writing: dict[PartitionTracker, set[Ending]] = {}  # by the partition read
        self._failing: dict[Ending, float] = {}
        self._orphans: OrderedDict[str, Ending] = OrderedDict()
        self._orphans_size = orphans_size
        self._queue: deque[Ending] = deque()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()  # an ending was finished or abandoned
        self._writer: asyncio.Task[None] | None = None
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
            campaign=req.campaign,
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
            campaign=req.campaign,
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
        self._result_only(req, Status.EXPIRED, {"message": "expire_at passed before sending"})

    def cancelled(self, req: Request, reason: str) -> None:
        """An operator dropped the request before it was sent: a ``cancelled`` result."""
        self._result_only(req, Status.CANCELLED, {"reason": "cancelled", "message": reason})

    def _result_only(self, req: Request, status: Status, error: dict[str, str]) -> None:
        """An ending that writes its result and nothing else (it never reached Sinch)."""
        origin = self._origin(req)
        record = result_record(
            request_id=req.request_id,
            status=status,
            app_id=req.app_id,
            campaign=req.campaign,
            attempts=req.attempts,
            error=error,
            partition=origin.partition,
            offset=origin.offset,
        )
        self._start(
            status, origin, req, [Output(self._s.results_topic, record, req.request_id.encode())]
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

    def spilled(
        self, origins: Sequence[Origin], app_id: str, *, topic: str, partition: int
    ) -> None:
        """Records wait in the spill topic: the originals are finished once those are written.

        The values and the producer's headers are kept unchanged; each record's key
        becomes its app_id, and the original key and place travel in headers. Records
        of one app read one after the other share one ending, written and finished
        together (a spill of a million is bookkept in runs, not record by record); only
        the records are kept until then, not their decoded requests.
        """
        key = app_id.encode()
        outputs: list[Output] = []
        tracker = origins[0].tracker  # a run is read from one partition
        here = f"{tracker.topic}/{tracker.partition}/"
        for origin in origins:
            headers: Headers = (
                [h for h in origin.headers if not h[0].startswith(SPILL_HEADER)]
                if origin.headers
                else []
            )
            source = origin.source or f"{here}{origin.offset}"  # origin.where()
            headers.append((SPILLED_FROM, source.encode()))
            if origin.key is not None:
                headers.append((ORIGINAL_KEY, origin.key))
            outputs.append(
                Output(topic, origin.value, key, headers, partition, origin.timestamp_ms or None)
            )
        ending = self._start(None, origins[0], None, outputs)
        ending.app_label = self._m.app_label(app_id)
        ending.spill = True
        ending.others = tuple(origins[1:])

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
        writing = self._writing.get(origin.tracker)
        if writing is None:
            writing = self._writing[origin.tracker] = set()
        writing.add(ending)
        queue = self._queue
        queue.append(ending)
        self._wake.set()
        if len(queue) >= FLUSH_AT:
            self.flush()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._run(), name="outcomes")
        return ending

    async def _run(self) -> None:
        """The one writer: hands the endings' outputs to the producer, in order.

        It lingers first (``outcome_linger_ms``, unless ``FLUSH_AT`` endings wait or
        :meth:`flush` hurries it), then hands over what waits in chunks of
        ``CHUNK`` endings, letting other tasks in between two chunks (a spill of
        thousands). Acknowledgements arrive as callbacks on the batches' futures.
        """
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._linger_s > 0 and len(queue) < FLUSH_AT:
                hurry = self._hurry = loop.create_future()
                timer = loop.call_later(self._linger_s, _settle_future, hurry)
                try:
                    await hurry
                finally:
                    timer.cancel()
                    self._hurry = None
            left = len(queue)  # what gathered; later endings wait for the next flush
            while left > 0 and queue:
                chunk: list[Ending] = []
                while queue and left > 0 and len(chunk) < CHUNK:
                    ending = queue.popleft()
                    left -= 1
                    if not ending.abandoned:
                        chunk.append(ending)
                await self._send(chunk)
                if left > 0:
                    await asyncio.sleep(0)

    async def _send(self, chunk: list[Ending]) -> None:
        outs: list[Output] = []
        owners: list[Ending] = []  # the ending of each of outs
        for ending in chunk:
            outputs, ending.outputs = ending.outputs, []
            ending.waiting = len(outputs)
            outs.extend(outputs)
            owners.extend([ending] * len(outputs))
        try:
            handed = await self._pub.send_many(outs)
        except Exception:  # the producer refuses everything (closed, ...): retried
            log.exception("the producer refused %d record(s)", len(outs))
            handed = [(RuntimeError("refused"), list(range(len(outs))))]
        for answer, indices in handed:
            if isinstance(answer, Exception):  # refused at once (too large, unknown topic)
                for i in indices:
                    self._acked(owners[i], outs[i], False)
            else:
                done = functools.partial(self._batch_done, owners, outs, indices)
                answer.add_done_callback(done)

    def _batch_done(
        self, owners: list[Ending], outs: list[Output], indices: list[int], fut: asyncio.Future[Any]
    ) -> None:
        if fut.cancelled() or fut.exception() is not None:
            for i in indices:
                self._acked(owners[i], outs[i], False)
            return
        # written: count each ending's outputs at once (a spilled run has one per record)
        last: Ending | None = None
        n = 0
        for i in indices:
            ending = owners[i]
            if ending is last:
                n += 1
                continue
            if last is not None:
                self._answered(last, n)
            last, n = ending, 1
        if last is not None:
            self._answered(last, n)

    def _acked(self, ending: Ending, out: Output, ok: bool) -> None:
        """One output answered: what Kafka did not take is written again."""
        if ending.abandoned:
            return
        if not ok:
            self._m.outcome_write_failures.labels(out.topic).inc()
            ending.outputs.append(out)
        self._answered(ending, 1)

    def _answered(self, ending: Ending, n: int) -> None:
        """``n`` more of the ending's outputs answered; when all have, it is done or retried."""
        if ending.abandoned:
            return
        ending.waiting -= n
        if ending.waiting > 0:
            return
        if not ending.outputs:
            self._done(ending)
            return
        ending.attempt += 1
        if ending.failing_since is None:
            ending.failing_since = self._clock()
            self._failing[ending] = ending.failing_since
            log.error(
                "partition %d offset %d: Kafka refused its %s record(s) (%s); "
                "retrying, nothing past it is committed",
                ending.origin.partition,
                ending.origin.offset,
                ending.status.value if ending.status else "spill",
                ", ".join(sorted({o.topic for o in ending.outputs})),
            )
        s = self._s
        ceiling = min(s.backoff_max_s, s.backoff_base_s * 2 ** min(ending.attempt, 16))
        delay = random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter
        asyncio.get_running_loop().call_later(delay, self._retry, ending)

    def _retry(self, ending: Ending) -> None:
        if not ending.abandoned:
            self._queue.append(ending)
            self._wake.set()

    def _forget(self, ending: Ending) -> None:
        self._changed.set()
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
            self._child(self._m.outcomes.labels, ending.app_label, status.value).inc()
            campaign = ending.request.campaign if ending.request is not None else None
            if campaign is not None:
                self._m.campaign_outcomes.labels(
                    self._m.campaign_label(campaign), status.value
                ).inc()
        elif ending.spill:
            self._child(self._m.spilled.labels, ending.app_label).inc(1 + len(ending.others))
        self._release(ending, True)

    def _child(self, labels_of: Callable[..., Any], *labels: str) -> Any:
        """``labels_of(*labels)`` (a metric's ``labels``), once per label set, not per message."""
        key = (labels_of, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = labels_of(*labels)
        return child

    def _abandon(self, ending: Ending) -> None:
        self._forget(ending)
        if ending.status is Status.SENT and ending.request is not None:
            orphans = self._orphans
            orphans[ending.request.request_id] = ending
            while len(orphans) > self._orphans_size:
                orphans.popitem(last=False)
        self._release(ending, False)

    # -- control ----------------------------------------------------------

    def flush(self) -> None:
        """Hand what is waiting to the producer now, without lingering."""
        if self._hurry is not None:
            _settle_future(self._hurry)

    async def settle(self, partitions: set[PartitionTracker] | None, timeout: float) -> bool:
        """Wait for the writes of records read from ``partitions`` (all if None).

        What is left at the deadline is abandoned. True when every write finished.
        """
        loop_time = asyncio.get_running_loop().time  # real time: this waits for Kafka
        deadline = loop_time() + max(0.0, timeout)
        while left := self._endings(partitions):
            self.flush()
            remaining = deadline - loop_time()
            if remaining <= 0:
                for ending in left:
                    ending.abandoned = True
                    self._abandon(ending)
                return False
            self._changed.clear()
            await wait_within(self._changed.wait(), min(remaining, 0.05))
        return True

    def _endings(self, partitions: set[PartitionTracker] | None) -> list[Ending]:
        return [
            ending
            for tracker, endings in self._writing.items()
            if partitions is None or tracker in partitions
            for ending in endings
        ]

    async def close(self) -> None:
        """Stop the writer (after :meth:`settle`)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            await cancel_and_wait([writer])

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


def _settle_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
