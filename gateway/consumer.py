"""Intake: the aiokafka consumer loop, isolation, back-pressure, offsets and rebalances.

Three topics are read: the high-priority requests topic first (never paused
for the budget), the requests topic, and the spill topic. The loop decodes each
record and routes it to its app's lane; it never waits for a send. (A record keyed by
an app that is spilling, which surely is that app's and not high priority, follows the
app's records to the spill topic undecoded: it is decoded when taken back.) Every record
that does not go to a lane ends at once through
:class:`~gateway.outcomes.Outcomes`: a bad one is ``rejected`` (DLQ and a
result), a duplicate is skipped, an expired one gets its result, and a normal
or low-priority one of an app whose lane is full is *spilled*
(:mod:`gateway.spill`): one app's backlog never stops intake from reading the
partition for other apps.

Back-pressure: records read and not finished are counted against a budget of
records and bytes. Over budget, the requests partitions are paused; under 80 %
of it they are resumed. Spill partitions are read only while a lane they
serve wants more. Memory stays flat whatever the backlog in Kafka.

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
from prometheus_client import Gauge

from gateway.aio import wait_within
from gateway.envelope import Priority, Request, decode, peek_ids, surely_not_high
from gateway.errors import InvalidMessage
from gateway.offsets import Origin, PartitionTracker, decode_done, encode_done
from gateway.outcomes import ORIGINAL_KEY, SPILL_HEADER, SPILLED_FROM
from gateway.producer import kafka_options
from gateway.spill import SpillState

if TYPE_CHECKING:
    from gateway.dedupe import GroupSentIds, RecentIds
    from gateway.lanes import Lane, Lanes
    from gateway.metrics import Metrics
    from gateway.outcomes import Ending, Outcomes
    from gateway.settings import Settings

log = logging.getLogger(__name__)

YIELD_EVERY = 32  # records decoded between two turns of the event loop
# The most one fetch answer may carry, over all partitions. aiokafka keeps what a
# partition's answer brought until it is read, also while the partition is paused, and
# some brokers (Tansu) fill a partition's part up to this total whatever the
# per-partition limit: with aiokafka's 50 MB, 24 spill partitions being taken back held
# a few MB each and RSS climbed past 200 MB. 1 MB answers hold one partition or two.
FETCH_MAX_BYTES = 1024 * 1024
# A spill partition read to its end, with none of this replica's records on their way to
# it, is left out of the fetches but for a look of SPILL_LOOK_S every SPILL_QUIET_S: only
# a previous owner's late writes can still arrive. Every fetch, one each fetch_max_wait_ms
# even when idle, is encoded and its answer decoded partition by partition: with the
# default partitions 36 of them, 12 without the spill topic's.
SPILL_QUIET_S = 5.0
SPILL_LOOK_S = 1.0


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._intake.revoke(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._intake.assign(assigned)


ConsumerFactory = Callable[[ConsumerRebalanceListener], Any]


class Intake:
    """Reads the requests, high-priority and spill topics and feeds the lanes."""

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
        group_sent: GroupSentIds | None = None,
    ) -> None:
        self._s = settings
        self._m = metrics
        self._lanes = lanes
        self._outcomes = outcomes
        self._sent_ids = sent_ids
        self._clock = clock
        self._on_share = on_share
        self._consumer_factory = consumer_factory or self._make_consumer
        self._group_sent = group_sent
        # partitions taken over without commit metadata: up to which offset to ask
        # the group's sent ids whether a record re-read was sent by the last owner
        self._suspect: dict[TopicPartition, int] = {}
        self._topics = (settings.requests_high_topic, settings.requests_topic, settings.spill_topic)
        self._projects = frozenset(settings.all_projects())
        self.consumer: Any = None
        self.trackers: dict[TopicPartition, PartitionTracker] = {}
        self._owned: dict[str, list[TopicPartition]] = {}  # _of's answers until trackers change
        self._spill_parts: list[int] | None = None  # the owned spill partitions' numbers
        # records spilled one after the other, not handed to Outcomes yet: (tracker, app, partition)
        self._run: list[Origin] = []
        self._run_key: tuple[PartitionTracker, str, int] | None = None
        self._consumed = 0  # records read since the consumed counter was last updated
        self.spill = SpillState(self.wants_more)
        self.in_progress: set[str] = set()
        self.buffered = 0
        self.buffered_bytes = 0
        self.paused = False  # the requests partitions, for the budget
        self._spill_paused: set[TopicPartition] = set()
        self._spill_quiet: dict[TopicPartition, float] = {}  # read out since (a clock time)
        self.assigned = False
        self.joined = False
        self.connected = False
        self._stopping = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self.assigned_at: float | None = None

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
            fetch_max_bytes=max(FETCH_MAX_BYTES, s.max_message_bytes),
        )
        consumer.subscribe(list(dict.fromkeys(self._topics)), listener=listener)
        return consumer

    async def start(self) -> None:
        if self.consumer is not None:
            return
        consumer = self._consumer_factory(_Listener(self))
        # Known before start(): with a subscription, start() joins the group, and the
        # first assignment (made inside it) reads the committed offsets through it.
        self.consumer = consumer
        try:
            await consumer.start()
        except BaseException:
            self.consumer = None
            raise
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
        """Leave the group (revoking and committing what is owned), within a bound.

        A consumer that cannot leave in time (a rebalance the broker never completes)
        must not keep the process from exiting: the group then moves its partitions
        after the session timeout, and they are read again from their last commit.
        """
        consumer, self.consumer = self.consumer, None
        if consumer is None:
            return
        bound = self._s.revoke_timeout_s + self._s.session_timeout_s
        task = asyncio.ensure_future(consumer.stop())
        done, _ = await asyncio.wait({task}, timeout=bound)
        if done:
            task.result()
            return
        where = _awaiting(task)
        task.cancel()
        log.error(
            "the consumer did not leave the group within %.0f s; exiting without it "
            "(its partitions move after the session timeout); it waited in %s",
            bound,
            where,
        )
        # what stop() does after leaving, which the cancel skipped: its fetcher and its
        # connections (no public call for them; a process that goes on must not keep them)
        for part in ("_fetcher", "_client"):
            close = getattr(getattr(consumer, part, None), "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(close(), 2.0)

    # -- the loop ---------------------------------------------------------

    async def run(self) -> None:
        consumer = self.consumer
        if consumer is None:
            raise RuntimeError("Intake.run() before start()")
        while not self._stopping.is_set():
            room = min(self._s.max_buffered_records - self.buffered, self._s.fetch_max_records)
            if room <= 0 and not self.paused:
                self._pause(True)
            self._steer_spill()
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
            if self._consumed:  # one metric update per batch, not per record
                self._m.consumed.inc(self._consumed)
                self._consumed = 0
            self._apply_budget()

    async def _take_batch(self, batch: dict[Any, list[Any]]) -> None:
        spill_topic = self._s.spill_topic
        for tp, records in batch.items():
            tracker = self.trackers.get(tp)
            if tracker is None or tracker.revoked:
                continue
            if tp in self._suspect:
                self._flush_spills()
                await self._ask_group(tp, records)
            take = self.take_spilled if tp.topic == spill_topic else self.take
            for i, record in enumerate(records, 1):
                if not take(tracker, record):
                    break
                if i % YIELD_EVERY == 0:
                    # a long batch must not stall the loop: a late send bunches
                    # with the next one and can break Sinch's 1-second window
                    self._flush_spills()
                    await asyncio.sleep(0)
                    if tracker.revoked:
                        break
        self._flush_spills()

    async def _ask_group(self, tp: TopicPartition, records: list[Any]) -> None:
        """Learn which of the records re-read after a takeover the group already sent."""
        until = self._suspect[tp]
        if self._group_sent is None or not records:
            return
        limit = self._s.max_message_bytes
        rids = [peek_ids(r.value, max_bytes=limit)[0] for r in records if r.offset < until]
        found = await self._group_sent.known([r for r in rids if r])
        for rid in found:
            self._sent_ids.add(rid, mirror=False)
        if found:
            log.info(
                "%s/%d: %d of %d records read again were sent by the last owner",
                tp.topic,
                tp.partition,
                len(found),
                len(rids),
            )
        if records[-1].offset + 1 >= until:
            del self._suspect[tp]

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

    def _trackers_changed(self) -> None:
        self._owned.clear()
        self._spill_parts = None

    def _of(self, topic: str) -> list[TopicPartition]:
        """The partitions of ``topic`` this consumer owns, by number (asked per spilled record)."""
        owned = self._owned.get(topic)
        if owned is None:
            owned = self._owned[topic] = sorted(
                (tp for tp in self.trackers if tp.topic == topic), key=lambda tp: tp.partition
            )
        return owned

    async def _fetch(self, consumer: Any, room: int) -> dict[Any, list[Any]]:
        """High priority first, the wanted spill partitions, then ``room`` requests records.

        aiokafka hands out one partition's buffer before the next one's; with keys
        by app, a backlog would then start app by app. Taking a slice of each
        partition in turn starts every app at once. Spill partitions are not held
        to the budget's room: reading one stops at its lane's read-ahead anyway,
        and a lane must refill while the budget is busy with other work.
        """
        s = self._s
        batch: dict[Any, list[Any]] = {}
        if s.requests_high_topic != s.requests_topic:
            high = self._of(s.requests_high_topic)
            if high:  # never held for the budget: urgent traffic is small and must not wait
                batch.update(
                    await consumer.getmany(*high, timeout_ms=0, max_records=s.fetch_max_records)
                )
        spill = [tp for tp in self._of(s.spill_topic) if tp not in self._spill_paused]
        each = max(1, s.fetch_max_records // max(1, len(spill)))
        if spill:
            for tp in spill:
                batch.update(await consumer.getmany(tp, timeout_ms=0, max_records=each))
        parts = self._of(s.requests_topic)
        if len(parts) > 1 or batch:
            share = max(1, room // max(1, len(parts)))
            for tp in parts:
                if room <= 0:  # never past the budget, however many partitions
                    break
                got = await consumer.getmany(tp, timeout_ms=0, max_records=min(share, room))
                for records in got.values():
                    room -= len(records)
                batch.update(got)
            if batch:
                return batch
        # Nothing at hand: wait for whatever comes first. A spill partition's slice stays a
        # slice here too: reading it stops at the first app whose lane is full, and
        # what was handed out beyond that is dropped (seek back) and fetched again.
        limit = min(room, each) if spill else room
        result: dict[Any, list[Any]] = await consumer.getmany(timeout_ms=200, max_records=limit)
        return result

    def _pause(self, pause: bool) -> None:
        """Pause or resume the requests partitions (the budget)."""
        consumer = self.consumer
        if consumer is None:
            return
        parts = self._of(self._s.requests_topic)
        if pause:
            consumer.pause(*parts)
        else:
            consumer.resume(*parts)
        self.paused = pause
        self._m.paused_partitions.set(len(parts) if pause else 0)

    def _steer_spill(self) -> None:
        """Read a spill partition only while a lane it serves wants more."""
        consumer = self.consumer
        if consumer is None:
            return
        hungry = self.spill.hungry()  # once, not once per spill partition
        occupied = self.spill.occupied()
        now = self._clock()
        for tp in self._of(self._s.spill_topic):
            wanted = self.spill.wanted(tp.partition, hungry) and not self._read_out(
                consumer, tp, occupied, now
            )
            if wanted and tp in self._spill_paused:
                consumer.resume(tp)
                self._spill_paused.discard(tp)
            elif not wanted and tp not in self._spill_paused:
                consumer.pause(tp)
                self._spill_paused.add(tp)

    def _read_out(self, consumer: Any, tp: TopicPartition, occupied: set[int], now: float) -> bool:
        """A spill partition with nothing known to wait in it, between two looks.

        Read out: no app is known to be next in it, none of this replica's spilled
        records go there, and it is read up to the high watermark of the last fetch.
        """
        quiet = self._spill_quiet
        tracker = self.trackers.get(tp)
        if tp.partition in occupied or tracker is None or self.spill.head.get(tp.partition):
            quiet.pop(tp, None)
            return False
        try:
            high = consumer.highwater(tp)
        except (KafkaError, AssertionError, KeyError):
            high = None
        at = tracker.next_read if tracker.next_read is not None else tracker.committed
        if high is None or (high > 0 and (at is None or at < high)):
            quiet.pop(tp, None)
            return False
        since = quiet.setdefault(tp, now)
        return (now - since) % SPILL_QUIET_S >= SPILL_LOOK_S

    # -- taking records ---------------------------------------------------

    def read_ahead(self, lane: Lane) -> float:
        """How many records a lane holds in memory: about ``lane_horizon_s`` of its rate.

        No more than its part of half the record budget, so that many busy apps spill
        too instead of filling the budget (which would pause every partition).
        """
        s = self._s
        part = 0.5 * s.max_buffered_records / max(1, len(self._lanes.lanes))
        ahead = min(lane.bucket.pace * s.lane_horizon_s, part)
        return max(float(s.lane_min_read_ahead), ahead)

    def has_room(self, app_id: str, times: float = 1.0) -> bool:
        """The app's lane holds less than ``times`` its read-ahead."""
        lane = self._lanes.lanes.get(app_id)
        return lane is None or lane.depth < times * self.read_ahead(lane)

    def wants_more(self, app_id: str) -> bool:
        """A lane drained to half its read-ahead: worth a fetch from its spill partition."""
        lane = self._lanes.lanes.get(app_id)
        return lane is None or lane.depth < self.read_ahead(lane) / 2

    def _origin(self, tracker: PartitionTracker, record: Any) -> Origin:
        return Origin(
            tracker,
            record.offset,
            key=record.key,
            value=record.value,
            headers=tuple(record.headers or ()),
            timestamp_ms=record.timestamp or 0,
        )

    def take(self, tracker: PartitionTracker, record: Any) -> bool:
        """One record of the requests topics: to its lane, spilled, or ended at once."""
        offset = record.offset
        tracker.add(offset)
        origin = self._origin(tracker, record)
        key, value = origin.key, origin.value
        if (
            key is not None
            and value is not None
            and self.spill.spilling(app_id := key.decode(errors="replace"))
            and len(value) <= self._s.max_message_bytes
            and tracker.topic != self._s.requests_high_topic
            and surely_not_high(value, key)
        ):
            # keyed by an app that is spilling, and surely not high priority: it follows
            # the app's other records to the spill topic as read, without decoding (it is
            # decoded and checked when taken back, as every spilled record is)
            run = self._run_key
            if run is not None and run[0] is tracker and run[1] == app_id:
                partition: int | None = run[2]  # the run being gathered keeps its partition
            else:
                partition = self._spill_partition(app_id)
            if partition is not None:
                if self._enter(tracker, origin):
                    self._gather_spill(origin, app_id, partition)
                return True
        req = self._admit(tracker, origin)
        if req is None:
            return True
        if tracker.topic == self._s.requests_high_topic:
            req.priority = Priority.HIGH
        lane = self._lanes.lane(req.app_id, req.project_id)
        if req.priority is not Priority.HIGH and (
            self.spill.spilling(req.app_id) or lane.depth >= self.read_ahead(lane)
        ):
            self._spill_out(req)
        else:
            self._lanes.put(req)
        return True

    def take_spilled(self, tracker: PartitionTracker, record: Any) -> bool:
        """One record of the spill topic; False (and a seek back) if its lane is full."""
        app_id = record.key.decode(errors="replace") if record.key else ""
        if (
            app_id
            and not self.has_room(app_id)
            and not (
                self.has_room(app_id, 2.0) and self.spill.others_want(tracker.partition, app_id)
            )
        ):
            self.spill.blocked(tracker.partition, app_id)
            self.consumer.seek(TopicPartition(tracker.topic, tracker.partition), record.offset)
            return False
        self.spill.read_on(tracker.partition)
        tracker.add(record.offset)
        origin = self._origin(tracker, record)
        headers = dict(origin.headers)
        origin.key = headers.get(ORIGINAL_KEY)
        source = headers.get(SPILLED_FROM)
        origin.source = source.decode(errors="replace") if source else None
        origin.headers = tuple(h for h in origin.headers if not h[0].startswith(SPILL_HEADER))
        req = self._admit(tracker, origin)
        self.spill.note_taken(req.app_id if req is not None else app_id, tracker.partition)
        self._m.spill_taken.labels(self._m.app_label(app_id)).inc()
        if req is not None:
            self._lanes.put(req)
        return True

    def _enter(self, tracker: PartitionTracker, origin: Origin) -> bool:
        """Count one record against the budget; False when it was ended at once."""
        self.buffered += 1
        self.buffered_bytes += origin.size
        skip = tracker.skip  # finished before a crash or rebalance
        if skip:
            if origin.offset in skip:
                self._outcomes.duplicate(origin)
                return False
            skip.drop_below(origin.offset)  # read in order: what is passed is not met again
        self._consumed += 1
        return True

    def _admit(self, tracker: PartitionTracker, origin: Origin) -> Request | None:
        """Decode and check one record; None when it ended at once."""
        if not self._enter(tracker, origin):
            return None
        try:
            req = decode(origin.value, max_bytes=self._s.max_message_bytes)
        except InvalidMessage as exc:
            request_id, app_id = peek_ids(origin.value, max_bytes=self._s.max_message_bytes)
            self._outcomes.rejected(
                origin, exc.reason, exc.detail, request_id=request_id, app_id=app_id
            )
            return None
        req.origin = origin
        req.received_at = self._clock()
        rid = req.request_id
        if req.project_id is not None and req.project_id not in self._projects:
            # a Sinch key belongs to one project: one this gateway has no key for
            self._outcomes.rejected(
                origin,
                "unknown_project",
                f"project_id {req.project_id} is not configured",
                request_id=rid,
                app_id=req.app_id,
            )
            return None
        if rid in self.in_progress or rid in self._sent_ids:
            self._outcomes.duplicate(origin)  # the original keeps its in-progress mark
            return None
        self.in_progress.add(rid)
        if self._outcomes.adopt(req):
            return None
        if req.expire_at is not None and req.expire_at <= time.time():
            self._outcomes.expired(req)
            return None
        return req

    def _spill_out(self, req: Request) -> None:
        partition = self._spill_partition(req.app_id)
        if partition is None or req.origin is None:  # no spill partition here: the budget
            self._lanes.put(req)  # alone bounds memory
            return
        # the copy may be read back before Kafka's acknowledgement arrives here:
        # it must not be taken for a duplicate of its own original
        self.in_progress.discard(req.request_id)
        self._gather_spill(req.origin, req.app_id, partition)

    def _spill_partition(self, app_id: str) -> int | None:
        owned = self._spill_parts
        if owned is None:
            owned = self._spill_parts = [tp.partition for tp in self._of(self._s.spill_topic)]
        return self.spill.choose(app_id, owned)

    def _gather_spill(self, origin: Origin, app_id: str, partition: int) -> None:
        """Spill ``origin`` with the run of the same app's records read just before it.

        Every spill goes through here, decoded or not, so an app's records reach the
        spill topic in the order they were read.
        """
        # What the lane holds stays there: it is sent first, while the spill waits. (A
        # broker that keeps no commit metadata re-sends, after a crash, what was finished
        # beyond the commit that those records hold; the group's sent ids in Redis cover it.)
        key = (origin.tracker, app_id, partition)
        if key != self._run_key:
            self._flush_spills()
            self._run_key = key
        self._run.append(origin)
        self.spill.note_spilled(app_id)

    def _flush_spills(self) -> None:
        """Hand the gathered run to :class:`Outcomes` (before any wait of the loop, so that
        a revocation never finds a run that is read and neither spilled nor held)."""
        run, key = self._run, self._run_key
        if run and key is not None:
            self._run = []
            self._outcomes.spilled(run, key[1], topic=self._s.spill_topic, partition=key[2])
        self._run_key = None

    def release(self, ending: Ending, finished: bool) -> None:
        """``release`` for :class:`Outcomes`: the record's ending is written (or abandoned)."""
        origin = ending.origin
        if finished:
            origin.tracker.done(origin.offset)
        self.buffered -= 1
        self.buffered_bytes -= origin.size
        for other in ending.others:  # the rest of a spilled run
            if finished:
                other.tracker.done(other.offset)
            self.buffered -= 1
            self.buffered_bytes -= other.size
        req = ending.request
        if req is not None and not ending.spill:  # a spill's mark went when it was spilled
            self.in_progress.discard(req.request_id)

    def sending(self) -> None:
        """A send starts: the first after an assignment is timed."""
        at, self.assigned_at = self.assigned_at, None
        if at is not None:
            self._m.first_send_after_assign.observe(self._clock() - at)

    def hand_back(self, req: Request) -> None:
        """A request of a revoked partition leaves without an ending: the next owner sends it."""
        self.in_progress.discard(req.request_id)
        self.buffered -= 1
        self.buffered_bytes -= req.origin.size if req.origin is not None else 0

    # -- offsets ----------------------------------------------------------

    async def commit(self, partitions: set[TopicPartition] | None = None) -> int:
        """Commit every tracker's finished prefix. Returns the number committed.

        A partition is committed when its offset moved or when the map of records
        finished beyond it changed, so a restart skips what is already done.
        """
        consumer = self.consumer
        if consumer is None:
            return 0
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, tracker in list(self.trackers.items()):
            if partitions is not None and tp not in partitions:
                continue
            off = tracker.committable()
            if off is None:
                continue
            meta = encode_done(off, tracker.finished_beyond())
            if off == tracker.committed and meta == tracker.committed_meta:
                continue
            offsets[tp] = OffsetAndMetadata(off, meta)
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
            owned = self.trackers.get(tp)
            if owned is not None:
                if om.offset != owned.committed:
                    owned.moved_at = now
                owned.committed = om.offset
                owned.committed_meta = om.metadata
        self._m.commits.labels("success").inc()
        return len(offsets)

    async def commit_loop(self) -> None:
        while not self._stopping.is_set():
            await wait_within(self._stopping.wait(), self._s.commit_interval_s)
            await self.commit()
            self._update_lag()
            self._watch()
            self._share()  # metadata may have been stale at assignment

    def _watch(self) -> None:
        """The progress watchdog: how long each partition's commit has stood still."""
        now = self._clock()
        requests = self._s.requests_topic
        for tp, tracker in self.trackers.items():
            if tracker.pending == 0:
                tracker.moved_at = now  # holds nothing: nothing to wait for
            if tp.topic == requests:
                self._m.commit_stalled.labels(str(tp.partition)).set(now - tracker.moved_at)

    def stalled(self) -> list[str]:
        """Partitions whose commit stood still for ``stall_timeout_s`` while holding records."""
        now = self._clock()
        limit = self._s.stall_timeout_s
        return sorted(
            f"{tp.topic}/{tp.partition}"
            for tp, t in self.trackers.items()
            if t.pending and now - t.moved_at >= limit
        )

    def _update_lag(self) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        s = self._s
        for tp, tracker in self.trackers.items():
            try:
                high = consumer.highwater(tp)
            except (KafkaError, AssertionError, KeyError):
                continue
            if high is None:
                continue
            next_read = tracker.next_read if tracker.next_read is not None else tracker.committed
            if next_read is None:
                continue
            lag = max(0, high - next_read)
            if tp.topic == s.requests_topic:
                self._m.lag.labels(str(tp.partition)).set(lag)
            elif tp.topic == s.spill_topic:
                self._m.spill_lag.labels(str(tp.partition)).set(lag)

    # -- rebalance --------------------------------------------------------

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        """Hand back what lanes hold, let sends and writes end within a bound, commit."""
        parts = {tp for tp in revoked if tp in self.trackers}
        if not parts:
            return
        started = self._clock()
        gone = {self.trackers[tp] for tp in parts}
        for tracker in gone:
            tracker.revoked = True
        dropped = 0
        for lane in list(self._lanes.lanes.values()):
            for req in lane.drop(lambda r: r.origin is None or not r.origin.tracker.revoked):
                self.hand_back(req)
                dropped += 1
        # the bound must fit inside the group's rebalance timeout
        bound = self._s.revoke_timeout_s
        await self._lanes.wait_in_flight(bound, trackers=gone)
        left = bound - (self._clock() - started)
        await self._outcomes.settle(gone, left)
        if self._group_sent is not None:
            await self._group_sent.flush()  # before the next owner can look
        await self.commit(parts)
        for tp in parts:
            self.trackers.pop(tp, None)
            self._suspect.pop(tp, None)
            self._spill_paused.discard(tp)
            self._spill_quiet.pop(tp, None)
            self._forget_gauges(tp)
        self._trackers_changed()
        self.spill.revoked(tp.partition for tp in parts if tp.topic == self._s.spill_topic)
        self._m.rebalances.labels("revoked").inc()
        self._m.handed_back.inc(dropped)
        self._m.revoke_duration.observe(self._clock() - started)
        log.info("partitions %s revoked (%d queued records handed back)", _names(parts), dropped)
        self.assigned = bool(self.trackers)
        self._share()

    def _forget_gauges(self, tp: TopicPartition) -> None:
        """Another member reports this partition now."""
        s = self._s
        gauges: dict[str, tuple[Gauge, ...]] = {
            s.requests_topic: (self._m.lag, self._m.commit_stalled),
            s.spill_topic: (self._m.spill_lag,),
        }
        for gauge in gauges.get(tp.topic, ()):
            with contextlib.suppress(KeyError):
                gauge.remove(str(tp.partition))

    def _share(self) -> None:
        """Tell how many of the requests topic's partitions this replica owns now."""
        consumer = self.consumer
        if self._on_share is None or consumer is None:
            return
        total = len(consumer.partitions_for_topic(self._s.requests_topic) or ())
        if total:
            self._on_share(len(self._of(self._s.requests_topic)), total)

    async def assign(self, assigned: set[TopicPartition]) -> None:
        consumer = self.consumer
        now = self._clock()
        for tp in assigned:
            if tp.topic not in self._topics:
                continue
            tracker = PartitionTracker(tp.partition, topic=tp.topic)
            tracker.moved_at = now
            if consumer is not None:
                committed = await self._committed(consumer, tp)
                if committed is not None:
                    tracker.committed = committed.offset
                    tracker.committed_meta = committed.metadata or ""
                    tracker.skip = decode_done(committed.offset, committed.metadata)
                    if not tracker.skip and self._group_sent is not None:
                        # no map of what was finished beyond the commit (a broker that
                        # keeps no commit metadata): ask the group's sent ids instead
                        self._suspect[tp] = committed.offset + self._s.max_buffered_records
                    log.info(
                        "%s/%d: resuming at offset %d, %d records beyond it already finished",
                        tp.topic,
                        tp.partition,
                        committed.offset,
                        len(tracker.skip),
                    )
            self.trackers[tp] = tracker
            self._trackers_changed()
            if tp.topic == self._s.spill_topic:
                self.spill.read_on(tp.partition)  # what waits there is not known yet
        self.assigned = any(tp.topic == self._s.requests_topic for tp in self.trackers)
        self.joined = True
        self._m.rebalances.labels("assigned").inc()
        if any(tp.topic == self._s.requests_topic for tp in assigned):
            self.assigned_at = now  # the next send tells how long a new owner takes
        self._spill_paused.clear()  # aiokafka resumes every partition it assigns
        self._spill_quiet.clear()
        if self.paused:
            self._pause(True)  # the budget still holds
        self._share()
        log.info("partitions assigned: %s", _names(assigned))

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


def _awaiting(task: asyncio.Future[Any]) -> str:
    """Where a task and the consumer's own tasks wait: each one's chain of coroutines."""

    def chain(t: asyncio.Task[Any]) -> str:
        coro: Any = t.get_coro()
        where: list[str] = []
        while coro is not None and len(where) < 20:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                code = frame.f_code
                where.append(f"{code.co_name} ({code.co_filename}:{frame.f_lineno})")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        return " -> ".join(where) or "?"

    def kafka(t: asyncio.Task[Any]) -> bool:
        code = getattr(t.get_coro(), "cr_code", None)
        return code is not None and "aiokafka" in code.co_filename

    tasks = [t for t in asyncio.all_tasks() if t is task or kafka(t)]
    return "; ".join(chain(t) for t in tasks)


def _names(parts: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in parts)
