"""Intake: the aiokafka consumer loop, back-pressure, offsets and rebalances.

The loop reads batches, decodes each record (a bad one goes to the DLQ with a
``rejected`` result), skips duplicates and expired requests, and routes the
rest to their app's lane. It never waits for a send.

Back-pressure: records read and not finished are counted against a budget of
records and bytes. Over budget, every assigned partition is paused; under 80 %
of it they are resumed. Memory stays flat whatever the backlog in Kafka.

Offsets: a :class:`PartitionTracker` per partition; the commit task commits the
contiguous finished prefix every ``commit_interval_s`` and on shutdown or
revocation, with the map of finished records beyond it in the metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from gateway.delivery import dlq_headers
from gateway.envelope import Request, Status, decode, result_record
from gateway.errors import InvalidMessage
from gateway.offsets import PartitionTracker, decode_done, encode_done
from gateway.producer import kafka_options

if TYPE_CHECKING:
    from gateway.dedupe import RecentIds
    from gateway.delivery import Delivery
    from gateway.lanes import Lanes
    from gateway.metrics import Metrics
    from gateway.producer import Publisher
    from gateway.settings import Settings

log = logging.getLogger(__name__)

YIELD_EVERY = 32  # records decoded between two turns of the event loop


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._intake.revoke(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._intake.assign(assigned)


class Intake:
    """Reads the requests topic and feeds the lanes."""

    def __init__(
        self,
        *,
        settings: Settings,
        metrics: Metrics,
        lanes: Lanes,
        delivery: Delivery,
        publisher: Publisher,
        sent_ids: RecentIds,
        clock: Callable[[], float],
        on_share: Callable[[int, int], None] | None = None,
    ) -> None:
        self._s = settings
        self._m = metrics
        self._lanes = lanes
        self._delivery = delivery
        self._pub = publisher
        self._sent_ids = sent_ids
        self._clock = clock
        self._on_share = on_share
        self.consumer: AIOKafkaConsumer | None = None
        self.trackers: dict[int, PartitionTracker] = {}
        self.in_progress: set[str] = set()
        self.buffered = 0
        self.buffered_bytes = 0
        self.paused = False
        self.assigned = False
        self.connected = False
        self._stopping = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._tasks: set[asyncio.Future[Any]] = set()

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        if self.consumer is not None:
            return
        s = self._s
        session_ms = int(s.session_timeout_s * 1000)
        consumer = AIOKafkaConsumer(
            **kafka_options(s),
            group_id=s.group_id,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,  # an idle partition must not delay a new record by 500 ms
            auto_offset_reset="earliest",
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 3),
            max_partition_fetch_bytes=max(1_048_576, s.max_message_bytes),
            fetch_max_bytes=max(52_428_800, s.max_message_bytes),
        )
        consumer.subscribe([s.requests_topic], listener=_Listener(self))
        await consumer.start()
        self.consumer = consumer
        self.connected = True

    def broker_connected(self) -> bool:
        """True while the consumer holds a live connection to a broker.

        aiokafka retries a lost broker quietly (``getmany`` returns empty
        batches), so the fetch loop alone cannot tell; its client keeps one
        entry per open connection and drops it when the connection closes.
        """
        consumer = self.consumer
        if consumer is None:
            return False
        conns = getattr(getattr(consumer, "_client", None), "_conns", None)
        if not isinstance(conns, dict):
            return self.connected
        return self.connected and any(conn.connected() for conn in conns.values())

    def stop_fetching(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await consumer.stop()

    # -- the loop ---------------------------------------------------------

    async def run(self) -> None:
        consumer = self.consumer
        if consumer is None:
            raise RuntimeError("Intake.run() before start()")
        budget = self._s.max_buffered_records
        budget_bytes = self._s.max_buffered_bytes
        while not self._stopping.is_set():
            room = min(budget - self.buffered, self._s.fetch_max_records)
            if room <= 0 and not self.paused:
                self._pause(True)
            try:
                # never take more than the budget has room for (paused: returns nothing)
                batch = await self._fetch(consumer, max(1, room))
                self.connected = True
            except KafkaError as exc:
                self.connected = False
                log.warning("kafka fetch failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in batch.items():
                tracker = self.trackers.get(tp.partition)
                if tracker is None or tracker.revoked:
                    continue
                for i, record in enumerate(records, 1):
                    self._take(tracker, record)
                    if i % YIELD_EVERY == 0:
                        # a long batch must not stall the loop: a late send bunches
                        # with the next one and can break Sinch's 1-second window
                        await asyncio.sleep(0)
                        if tracker.revoked:
                            break
            over = self.buffered >= budget or self.buffered_bytes >= budget_bytes
            if over and not self.paused:
                self._pause(True)
            elif self.paused and (
                self.buffered < budget * 0.8 and self.buffered_bytes < budget_bytes * 0.8
            ):
                self._pause(False)

    async def _fetch(self, consumer: AIOKafkaConsumer, room: int) -> dict[Any, list[Any]]:
        """Up to ``room`` records, a share from every partition that has some.

        aiokafka hands out one partition's buffer before the next one's; with keys
        by app, a backlog would then start app by app. Taking a slice of each
        partition in turn starts every app at once.
        """
        parts = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        if len(parts) > 1:
            share = max(1, room // len(parts))
            batch: dict[Any, list[Any]] = {}
            for tp in parts:
                got = await consumer.getmany(tp, timeout_ms=0, max_records=share)
                batch.update(got)
            if batch:
                return batch
        result: dict[Any, list[Any]] = await consumer.getmany(timeout_ms=200, max_records=room)
        return result

    def _pause(self, pause: bool) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        parts = list(consumer.assignment())
        if pause:
            consumer.pause(*parts)
        else:
            consumer.resume(*parts)
        self.paused = pause
        self._m.paused_partitions.set(len(parts) if pause else 0)

    def _take(self, tracker: PartitionTracker, record: Any) -> None:
        offset = record.offset
        tracker.add(offset)
        if offset in tracker.skip:  # finished before a crash or rebalance (commit metadata)
            tracker.skip.discard(offset)
            tracker.done(offset)
            self._m.duplicates.inc()
            return
        self._m.consumed.inc()
        value = record.value
        size = len(value) if value else 0
        self.buffered += 1
        self.buffered_bytes += size
        try:
            req = decode(value, max_bytes=self._s.max_message_bytes)
        except InvalidMessage as exc:
            self._spawn(self._reject(tracker, record, exc))
            return
        req.partition = record.partition
        req.offset = offset
        req.timestamp_ms = record.timestamp
        req.received_at = self._clock()
        req.raw = value
        req.key = record.key
        req.tracker = tracker
        rid = req.request_id
        if rid in self.in_progress or rid in self._sent_ids:
            self._m.duplicates.inc()
            self._finished(req)
            return
        self.in_progress.add(rid)
        if req.expire_at is not None and req.expire_at <= time.time():
            self._spawn(self._delivery.expire(req))
            return
        self._lanes.put(req)

    def _finished(self, req: Request) -> None:
        req.tracker.done(req.offset)
        self.in_progress.discard(req.request_id)
        self.buffered -= 1
        self.buffered_bytes -= req.size

    def finished(self, req: Request) -> None:
        """``on_finished`` for Delivery: the record's outputs are acknowledged."""
        self._finished(req)

    async def _reject(self, tracker: PartitionTracker, record: Any, exc: InvalidMessage) -> None:
        s = self._s
        headers = dlq_headers(
            exc.reason,
            detail=exc.detail,
            source=(s.requests_topic, record.partition, record.offset),
        )
        result = result_record(
            request_id=None,
            status=Status.REJECTED,
            app_id=None,
            attempts=0,
            error={"reason": exc.reason, "message": exc.detail},
            partition=record.partition,
            offset=record.offset,
        )
        self._m.dlq.labels(exc.reason).inc()
        self._m.outcomes.labels("none", Status.REJECTED.value).inc()
        log.warning(
            "partition %d offset %d rejected: %s",
            record.partition,
            record.offset,
            exc,
            extra={"partition": record.partition, "offset": record.offset},
        )
        futs = [
            await self._pub.send(
                s.dlq_topic,
                record.value,
                key=record.key,
                headers=list(record.headers or ()) + headers,
            ),
            await self._pub.send(s.results_topic, result, key=record.key),
        ]
        acks = await asyncio.gather(*futs, return_exceptions=True)
        if any(isinstance(a, BaseException) for a in acks):
            log.error(
                "partition %d offset %d: DLQ record not written; not committed",
                record.partition,
                record.offset,
            )
            return
        tracker.done(record.offset)
        self.buffered -= 1
        self.buffered_bytes -= len(record.value) if record.value else 0

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("intake task failed: %r", task.exception())

    # -- offsets ----------------------------------------------------------

    async def commit(self, partitions: set[int] | None = None) -> int:
        """Commit every tracker's finished prefix. Returns the number committed."""
        consumer = self.consumer
        if consumer is None:
            return 0
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        topic = self._s.requests_topic
        for partition, tracker in list(self.trackers.items()):
            if partitions is not None and partition not in partitions:
                continue
            off = tracker.committable()
            if off is None or off == tracker.committed:
                continue
            meta = encode_done(off, tracker.finished_beyond())
            offsets[TopicPartition(topic, partition)] = OffsetAndMetadata(off, meta)
        if not offsets:
            return 0
        async with self._commit_lock:
            try:
                await consumer.commit(offsets)
            except KafkaError as exc:
                self._m.commits.labels("failure").inc()
                log.warning("offset commit failed: %s", exc)
                return 0
        for tp, om in offsets.items():
            done = self.trackers.get(tp.partition)
            if done is not None:
                done.committed = om.offset
        self._m.commits.labels("success").inc()
        return len(offsets)

    async def commit_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._s.commit_interval_s)
            await self.commit()
            self._update_lag()
            self._share()  # metadata may have been stale at assignment

    def _update_lag(self) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        for tp in consumer.assignment():
            tracker = self.trackers.get(tp.partition)
            try:
                high = consumer.highwater(tp)
            except (KafkaError, AssertionError, KeyError):
                continue
            if high is None or tracker is None:
                continue
            next_read = tracker.next_read if tracker.next_read is not None else tracker.committed
            if next_read is not None:
                self._m.lag.labels(str(tp.partition)).set(max(0, high - next_read))

    # -- rebalance --------------------------------------------------------

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        parts = {tp.partition for tp in revoked if tp.topic == self._s.requests_topic}
        if not parts:
            return
        for p in parts:
            if p in self.trackers:
                self.trackers[p].revoked = True
        dropped = 0
        for lane in list(self._lanes.lanes.values()):
            for req in lane.drop(lambda r: r.partition not in parts):
                self._finished_without_commit(req)
                dropped += 1
        await self._lanes.wait_in_flight(self._s.shutdown_timeout_s)
        await self.commit(parts)
        for p in parts:
            self.trackers.pop(p, None)
            self._m.lag.remove(str(p))  # another member reports it now
        log.info("partitions %s revoked (%d queued records handed back)", sorted(parts), dropped)
        self.assigned = bool(self.trackers)
        self._share()

    def _share(self) -> None:
        """Tell how many of the topic's partitions this replica owns now."""
        consumer = self.consumer
        if self._on_share is None or consumer is None:
            return
        total = len(consumer.partitions_for_topic(self._s.requests_topic) or ())
        if total:
            self._on_share(len(self.trackers), total)

    def _finished_without_commit(self, req: Request) -> None:
        self.in_progress.discard(req.request_id)
        self.buffered -= 1
        self.buffered_bytes -= req.size

    async def assign(self, assigned: set[TopicPartition]) -> None:
        consumer = self.consumer
        for tp in assigned:
            if tp.topic != self._s.requests_topic:
                continue
            tracker = PartitionTracker(tp.partition)
            if consumer is not None:
                committed = await self._committed(consumer, tp)
                if committed is not None:
                    tracker.committed = committed.offset
                    tracker.skip = decode_done(committed.offset, committed.metadata)
            self.trackers[tp.partition] = tracker
        self.assigned = bool(self.trackers)
        self._share()
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))

    @staticmethod
    async def _committed(consumer: AIOKafkaConsumer, tp: TopicPartition) -> Any:
        # aiokafka's public committed() drops the metadata; the coordinator keeps it.
        coordinator = getattr(consumer, "_coordinator", None)
        if coordinator is None:
            return None
        try:
            found = await coordinator.fetch_committed_offsets({tp})
        except KafkaError:
            return None
        om = found.get(tp)
        if om is None or om.offset < 0:
            return None
        return om
