"""Intake: the aiokafka consumer loop, back-pressure, offsets and rebalances.

The loop reads batches, decodes each record and routes it to its app's lane; it
never waits for a send. Every record that does not go to a lane ends at once
through :class:`~gateway.outcomes.Outcomes`: a bad one is ``rejected`` (DLQ and a
result), a duplicate is skipped, an expired one gets its result.

Back-pressure: records read and not finished are counted against a budget of
records and bytes. Over budget, every assigned partition is paused; under 80 %
of it they are resumed. Memory stays flat whatever the backlog in Kafka.

Offsets: a :class:`PartitionTracker` per partition; the commit task commits the
contiguous finished prefix every ``commit_interval_s`` and on shutdown or
revocation, with the map of finished records beyond it in the metadata. A
partition whose committed offset stands still for ``stall_timeout_s`` while it
holds records is reported stalled (metric, alert, ``/readyz``).
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

from gateway.envelope import Request, decode, peek_ids
from gateway.errors import InvalidMessage
from gateway.offsets import Origin, PartitionTracker, decode_done, encode_done
from gateway.producer import kafka_options

if TYPE_CHECKING:
    from gateway.dedupe import RecentIds
    from gateway.lanes import Lanes
    from gateway.metrics import Metrics
    from gateway.outcomes import Ending, Outcomes
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


ConsumerFactory = Callable[[ConsumerRebalanceListener], Any]


class Intake:
    """Reads the requests topic and feeds the lanes."""

    def __init__(
        self,
        *,
        settings: Settings,
        metrics: Metrics,
        lanes: Lanes,
        outcomes: Outcomes,
        sent_ids: RecentIds,
        clock: Callable[[], float],
        on_share: Callable[[int, int], None] | None = None,
        consumer_factory: ConsumerFactory | None = None,
    ) -> None:
        self._s = settings
        self._m = metrics
        self._lanes = lanes
        self._outcomes = outcomes
        self._sent_ids = sent_ids
        self._clock = clock
        self._on_share = on_share
        self._consumer_factory = consumer_factory or self._make_consumer
        self.consumer: Any = None
        self.trackers: dict[int, PartitionTracker] = {}
        self.in_progress: set[str] = set()
        self.buffered = 0
        self.buffered_bytes = 0
        self.paused = False
        self.assigned = False
        self.joined = False
        self.connected = False
        self._stopping = asyncio.Event()
        self._commit_lock = asyncio.Lock()

    # -- lifecycle --------------------------------------------------------

    def _make_consumer(self, listener: ConsumerRebalanceListener) -> AIOKafkaConsumer:
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
            # a member has this long to finish its revocation and rejoin
            rebalance_timeout_ms=max(session_ms, int((s.revoke_timeout_s + 5.0) * 1000)),
            max_partition_fetch_bytes=max(1_048_576, s.max_message_bytes),
            fetch_max_bytes=max(52_428_800, s.max_message_bytes),
        )
        consumer.subscribe([s.requests_topic], listener=listener)
        return consumer

    async def start(self) -> None:
        if self.consumer is not None:
            return
        consumer = self._consumer_factory(_Listener(self))
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
        while not self._stopping.is_set():
            room = min(self._s.max_buffered_records - self.buffered, self._s.fetch_max_records)
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
            await self._take_batch(batch)
            self._apply_budget()

    async def _take_batch(self, batch: dict[Any, list[Any]]) -> None:
        for tp, records in batch.items():
            tracker = self.trackers.get(tp.partition)
            if tracker is None or tracker.revoked:
                continue
            for i, record in enumerate(records, 1):
                self.take(tracker, record)
                if i % YIELD_EVERY == 0:
                    # a long batch must not stall the loop: a late send bunches
                    # with the next one and can break Sinch's 1-second window
                    await asyncio.sleep(0)
                    if tracker.revoked:
                        break

    def _apply_budget(self) -> None:
        budget = self._s.max_buffered_records
        budget_bytes = self._s.max_buffered_bytes
        over = self.buffered >= budget or self.buffered_bytes >= budget_bytes
        if over and not self.paused:
            self._pause(True)
        elif self.paused and (
            self.buffered < budget * 0.8 and self.buffered_bytes < budget_bytes * 0.8
        ):
            self._pause(False)

    async def _fetch(self, consumer: Any, room: int) -> dict[Any, list[Any]]:
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
                if room <= 0:  # never past the budget, however many partitions
                    break
                got = await consumer.getmany(tp, timeout_ms=0, max_records=min(share, room))
                for records in got.values():
                    room -= len(records)
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

    def take(self, tracker: PartitionTracker, record: Any) -> None:
        """One record read from ``tracker``'s partition: to its lane, or ended at once."""
        offset = record.offset
        tracker.add(offset)
        value = record.value
        origin = Origin(
            tracker,
            offset,
            key=record.key,
            value=value,
            headers=tuple(record.headers or ()),
            timestamp_ms=record.timestamp or 0,
        )
        self.buffered += 1
        self.buffered_bytes += origin.size
        if offset in tracker.skip:  # finished before a crash or rebalance (commit metadata)
            tracker.skip.discard(offset)
            self._outcomes.duplicate(origin)
            return
        self._m.consumed.inc()
        try:
            req = decode(value, max_bytes=self._s.max_message_bytes)
        except InvalidMessage as exc:
            request_id, app_id = peek_ids(value, max_bytes=self._s.max_message_bytes)
            self._outcomes.rejected(
                origin, exc.reason, exc.detail, request_id=request_id, app_id=app_id
            )
            return
        req.origin = origin
        req.received_at = self._clock()
        rid = req.request_id
        if rid in self.in_progress or rid in self._sent_ids:
            self._outcomes.duplicate(origin)  # the original keeps its in-progress mark
            return
        self.in_progress.add(rid)
        if self._outcomes.adopt(req):
            return
        if req.expire_at is not None and req.expire_at <= time.time():
            self._outcomes.expired(req)
            return
        self._lanes.put(req)

    def release(self, ending: Ending, finished: bool) -> None:
        """``release`` for :class:`Outcomes`: the record's ending is written (or abandoned)."""
        origin = ending.origin
        if finished:
            origin.tracker.done(origin.offset)
        self.buffered -= 1
        self.buffered_bytes -= origin.size
        req = ending.request
        if req is not None:
            self.in_progress.discard(req.request_id)

    def hand_back(self, req: Request) -> None:
        """A request of a revoked partition leaves without an ending: the next owner sends it."""
        self.in_progress.discard(req.request_id)
        self.buffered -= 1
        self.buffered_bytes -= req.origin.size if req.origin is not None else 0

    # -- offsets ----------------------------------------------------------

    async def commit(self, partitions: set[int] | None = None) -> int:
        """Commit every tracker's finished prefix. Returns the number committed.

        A partition is committed when its offset moved or when the map of records
        finished beyond it changed, so a restart skips what is already done.
        """
        consumer = self.consumer
        if consumer is None:
            return 0
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        topic = self._s.requests_topic
        for partition, tracker in list(self.trackers.items()):
            if partitions is not None and partition not in partitions:
                continue
            off = tracker.committable()
            if off is None:
                continue
            meta = encode_done(off, tracker.finished_beyond())
            if off == tracker.committed and meta == tracker.committed_meta:
                continue
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
        now = self._clock()
        for tp, om in offsets.items():
            owned = self.trackers.get(tp.partition)
            if owned is not None:
                if om.offset != owned.committed:
                    owned.moved_at = now
                owned.committed = om.offset
                owned.committed_meta = om.metadata
        self._m.commits.labels("success").inc()
        return len(offsets)

    async def commit_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._s.commit_interval_s)
            await self.commit()
            self._update_lag()
            self._watch()
            self._share()  # metadata may have been stale at assignment

    def _watch(self) -> None:
        """The progress watchdog: how long each partition's commit has stood still."""
        now = self._clock()
        for partition, tracker in self.trackers.items():
            if tracker.pending == 0:
                tracker.moved_at = now  # holds nothing: nothing to wait for
            self._m.commit_stalled.labels(str(partition)).set(now - tracker.moved_at)

    def stalled(self) -> list[int]:
        """Partitions whose commit has stood still for ``stall_timeout_s`` while holding records."""
        now = self._clock()
        limit = self._s.stall_timeout_s
        return sorted(
            p for p, t in self.trackers.items() if t.pending and now - t.moved_at >= limit
        )

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
        """Hand back what lanes hold, let sends and writes end within a bound, commit."""
        parts = {tp.partition for tp in revoked if tp.topic == self._s.requests_topic}
        if not parts:
            return
        started = self._clock()
        for p in parts:
            if p in self.trackers:
                self.trackers[p].revoked = True
        dropped = 0
        for lane in list(self._lanes.lanes.values()):
            for req in lane.drop(lambda r: r.partition not in parts):
                self.hand_back(req)
                dropped += 1
        # the bound must fit inside the group's rebalance timeout
        bound = self._s.revoke_timeout_s
        await self._lanes.wait_in_flight(bound, partitions=parts)
        left = bound - (self._clock() - started)
        await self._outcomes.settle(parts, left)
        await self.commit(parts)
        for p in parts:
            self.trackers.pop(p, None)
            self._m.lag.remove(str(p))  # another member reports it now
            with contextlib.suppress(KeyError):
                self._m.commit_stalled.remove(str(p))
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

    async def assign(self, assigned: set[TopicPartition]) -> None:
        consumer = self.consumer
        now = self._clock()
        for tp in assigned:
            if tp.topic != self._s.requests_topic:
                continue
            tracker = PartitionTracker(tp.partition)
            tracker.moved_at = now
            if consumer is not None:
                committed = await self._committed(consumer, tp)
                if committed is not None:
                    tracker.committed = committed.offset
                    tracker.committed_meta = committed.metadata or ""
                    tracker.skip = decode_done(committed.offset, committed.metadata)
            self.trackers[tp.partition] = tracker
        self.assigned = bool(self.trackers)
        self.joined = True
        if self.paused and consumer is not None:
            # aiokafka resumes every partition after a rebalance; the budget still holds
            consumer.pause(*consumer.assignment())
            self._m.paused_partitions.set(len(consumer.assignment()))
        self._share()
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))

    @staticmethod
    async def _committed(consumer: Any, tp: TopicPartition) -> Any:
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
