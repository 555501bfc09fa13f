"""Intake with a scripted consumer, real lanes and outcomes, and a clock the test moves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from gateway.cli import sample_request
from gateway.consumer import Intake
from gateway.dedupe import RecentIds
from gateway.envelope import Request, decode
from gateway.lanes import Lane, Lanes
from gateway.limiter import Bucket
from gateway.metrics import Metrics
from gateway.outcomes import Outcomes
from gateway.settings import load
from tests.conftest import wait_for
from tests.fakes import TOPIC, FakeClock, FakeConsumer, Record, ScriptedPublisher

RESULTS = "sinch.outbound.results"
DLQ = "sinch.outbound.dlq"
SPILL = "sinch.outbound.spill"
HIGH = "sinch.outbound.requests.high"


class Rig:
    """Intake wired to lanes whose sender finishes a request when the test lets it."""

    def __init__(self, rates: dict[str, float] | None = None, **kw: Any) -> None:
        # each ending written as it comes: these tests follow intake's budget record by record
        base: dict[str, Any] = {
            "backoff_base_s": 0.005,
            "backoff_max_s": 0.02,
            "outcome_linger_ms": 0,
        }
        self.settings = load(env={}, **(base | kw))
        self.clock = FakeClock()
        self.consumer = FakeConsumer(partitions=2)

        def loop_back(topic: str, partition: int | None, value: bytes | None, **kw: Any) -> None:
            if topic == SPILL and partition is not None:
                self.consumer.append(topic, partition, value, **kw)

        self.publisher = ScriptedPublisher(sink=loop_back)
        rates = rates or {}
        self.metrics = Metrics(CollectorRegistry())
        self.sent: list[str] = []
        self.open = asyncio.Event()
        self.open.set()
        loop_clock = asyncio.get_running_loop().time
        sent_ids = RecentIds(1000, 3600, self.clock)
        self.outcomes = Outcomes(
            settings=self.settings,
            publisher=self.publisher,
            metrics=self.metrics,
            sent_ids=sent_ids,
            clock=self.clock,
            release=lambda ending, finished: self.intake.release(ending, finished),
        )
        self.lanes = Lanes(
            project_bucket=Bucket("project", 10_000, clock=loop_clock),
            make_app_bucket=lambda app, _project: Bucket(
                f"app:{app}", rates.get(app, 10_000), clock=loop_clock
            ),
            channel_buckets={},
            max_in_flight=100,
            sender=self.send,
            clock=loop_clock,
            hand_back=lambda req: self.intake.hand_back(req),
        )
        self.intake = Intake(
            settings=self.settings,
            metrics=self.metrics,
            lanes=self.lanes,
            outcomes=self.outcomes,
            sent_ids=sent_ids,
            clock=self.clock,
            consumer_factory=lambda _listener: self.consumer,
        )
        self.task: asyncio.Task[None] | None = None

    async def send(self, req: Request, _lane: Lane) -> None:
        await self.open.wait()
        self.sent.append(req.request_id)
        self.outcomes.sent(req, message_id="m", accepted_time="t", timings={})

    def publish(self, partition: int, app_id: str, **envelope: Any) -> dict[str, Any]:
        doc = sample_request(app_id, 0) | envelope
        self.consumer.add(partition, orjson.dumps(doc), key=app_id.encode())
        return doc

    async def start(self, partitions: tuple[int, ...] = (0, 1), spill: int = 4) -> None:
        await self.intake.start()
        tps = {TopicPartition(TOPIC, p) for p in partitions}
        tps |= {TopicPartition(SPILL, p) for p in range(spill)}
        tps.add(TopicPartition(HIGH, 0))
        self.consumer.assigned = set(tps)
        await self.intake.assign(tps)
        self.task = asyncio.create_task(self.intake.run())

    async def stop(self) -> None:
        self.open.set()
        self.intake.stop_fetching()
        if self.task is not None:
            await self.task
        await self.lanes.close()
        await self.outcomes.settle(None, 1.0)

    def results(self) -> list[dict[str, Any]]:
        return [orjson.loads(v or b"") for v, _k, _h in self.publisher.on(RESULTS)]


@pytest.fixture
async def rig() -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    made: list[Rig] = []

    async def make(**kw: Any) -> Rig:
        r = Rig(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        await r.stop()


async def test_records_are_routed_rejected_and_deduplicated(rig: Any) -> None:
    r = await rig()
    first = r.publish(0, "a1")
    r.publish(0, "a2")
    r.consumer.add(0, b"not json", key=b"a1", headers=(("trace", b"t-1"),))
    r.publish(0, "a1", request_id=first["request_id"])  # the same request again
    r.publish(1, "a3", payload={"app_id": "a3"})  # no recipient: rejected, ids readable
    await r.start()
    await wait_for(lambda: len(r.results()) == 4, 5, what="four results")
    assert sorted(r.sent) == sorted({first["request_id"], *r.sent})
    assert len(r.sent) == 2
    statuses = sorted(d["status"] for d in r.results())
    assert statuses == ["rejected", "rejected", "sent", "sent"]
    by_app = {d["app_id"]: d for d in r.results() if d["status"] == "rejected"}
    assert by_app["a3"]["request_id"] is not None  # what could be read is carried
    assert None in by_app  # the unreadable one has none
    dlq = r.publisher.on(DLQ)
    assert any(("trace", b"t-1") in headers for _v, _k, headers in dlq)
    await wait_for(lambda: r.intake.buffered == 0, 5, what="the budget to be free")
    await r.intake.commit()
    assert r.consumer.committed_offset(0) == 4
    assert r.consumer.committed_offset(1) == 1


async def test_the_budget_pauses_and_resumes_partitions(rig: Any) -> None:
    r = await rig(max_buffered_records=5, fetch_max_records=5)
    r.open.clear()  # nothing finishes
    for i in range(12):
        r.publish(i % 2, f"a{i % 3}")
    await r.start()
    await wait_for(lambda: r.intake.paused, 5, what="intake to pause")
    assert r.intake.buffered == 5
    assert r.consumer.paused == {TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)}
    r.open.set()
    await wait_for(lambda: len(r.sent) == 12, 10, what="every record to be sent")
    assert not r.consumer.paused


async def test_commits_cover_only_the_contiguous_finished_prefix(rig: Any) -> None:
    r = await rig()
    slow = asyncio.Event()
    fast_sent: list[str] = []

    async def send(req: Request, _lane: Lane) -> None:
        if req.app_id == "slow":
            await slow.wait()
        fast_sent.append(req.request_id)
        r.outcomes.sent(req, message_id="m", accepted_time="t", timings={})

    r.lanes._sender = send
    r.publish(0, "slow")
    for _ in range(5):
        r.publish(0, "fast")
    await r.start((0,))
    await wait_for(lambda: len(fast_sent) == 5, 5, what="the fast app's sends")
    await wait_for(lambda: r.intake.buffered == 1, 5, what="their results")
    await r.intake.commit()
    assert r.consumer.committed_offset(0) == 0  # the slow record holds the commit ...
    meta = r.consumer.commits[-1][TopicPartition(TOPIC, 0)].metadata
    assert meta.startswith("gw1:")  # ... and the five done beyond it are in the metadata
    slow.set()
    await wait_for(lambda: r.intake.buffered == 0, 5, what="the slow record")
    await r.intake.commit()
    assert r.consumer.committed_offset(0) == 6


async def test_a_refused_write_holds_the_commit_and_trips_the_watchdog(rig: Any) -> None:
    r = await rig(stall_timeout_s=60)
    r.publisher.refuse = lambda topic, _v: "fail" if topic == RESULTS else "ack"
    r.publish(0, "a1")
    r.publish(0, "a2")
    await r.start((0,))
    await wait_for(lambda: r.outcomes.failing() == 2, 5, what="the writes to fail")
    await r.intake.commit()
    assert r.consumer.committed_offset(0) in (None, 0)  # nothing committed past it
    assert r.intake.stalled() == []
    r.clock.advance(61)
    assert r.intake.stalled() == [f"{TOPIC}/0"]
    r.publisher.refuse = lambda topic, _v: "ack"
    await wait_for(lambda: r.intake.buffered == 0, 5, what="the writes to go through")
    await r.intake.commit()
    assert r.consumer.committed_offset(0) == 2
    assert r.intake.stalled() == []


async def test_revocation_hands_back_queued_work_and_commits(rig: Any) -> None:
    r = await rig(revoke_timeout_s=0.2)
    loop_clock = asyncio.get_running_loop().time
    r.lanes._make_app_bucket = lambda app, _project: Bucket(f"app:{app}", 1, clock=loop_clock)
    r.open.clear()
    for _ in range(4):
        r.publish(0, "a1")
    await r.start((0,))
    # the first is in flight (held by Sinch), the second waits for its slot, two are queued
    await wait_for(lambda: r.lanes.in_flight == 1, 5, what="one send in flight")
    assert r.intake.buffered == 4
    await r.intake.revoke({TopicPartition(TOPIC, 0)})
    assert 0 not in r.intake.trackers
    assert r.lanes.lanes["a1"].depth == 0  # the queued ones were handed back
    r.open.set()
    await wait_for(lambda: r.intake.buffered == 0, 5, what="the budget to be free")
    assert len(r.sent) == 1  # only the one in flight was sent; the next owner sends the rest
    assert r.consumer.committed_offset(0) in (None, 0)


async def test_pause_is_reapplied_after_a_new_assignment(rig: Any) -> None:
    r = await rig(max_buffered_records=2, fetch_max_records=2)
    r.open.clear()
    for _ in range(4):
        r.publish(0, "a1")
    await r.start((0,))
    await wait_for(lambda: r.intake.paused, 5, what="intake to pause")
    # a rebalance: aiokafka resumes everything it assigns
    r.consumer.paused.clear()
    r.consumer.assigned |= {TopicPartition(TOPIC, 1)}
    await r.intake.assign({TopicPartition(TOPIC, 1)})
    assert r.consumer.paused == {TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)}
    assert r.intake.buffered <= 2


async def test_a_campaign_spills_and_other_apps_in_its_partition_are_not_held(rig: Any) -> None:
    r = await rig(rates={"campaign": 50.0}, lane_horizon_s=0.2, lane_min_read_ahead=5)
    campaign = [r.publish(0, "campaign")["request_id"] for _ in range(60)]
    others = [r.publish(0, "otp")["request_id"] for _ in range(3)]
    await r.start((0,))
    await wait_for(lambda: set(others) <= set(r.sent), 5, what="the other app's sends")
    assert len([s for s in r.sent if s in set(campaign)]) < 30  # the campaign goes on at 50/s
    assert r.intake.spill.spilled > 0
    assert r.intake.buffered < 20  # memory holds the read-ahead, not the campaign
    await wait_for(lambda: len(r.sent) == 63, 10, what="the whole campaign")
    assert [s for s in r.sent if s in set(campaign)] == campaign  # in order, through the spill
    assert len(r.sent) == len(set(r.sent))
    await r.intake.commit()
    assert r.consumer.committed_offset(0) == 63


async def test_a_refused_write_in_a_spilled_run_holds_the_commit_and_goes_again_alone(
    rig: Any,
) -> None:
    """Records spilled one after the other share one ending: nothing of the run is finished
    while Kafka refuses one of its writes, and only that one is written again."""
    r = await rig(rates={"campaign": 50.0}, lane_horizon_s=0.2, lane_min_read_ahead=5)
    docs = [r.publish(0, "campaign") for _ in range(40)]
    stuck, refusing = orjson.dumps(docs[20]), [True]
    r.publisher.refuse = lambda topic, v: (
        "fail" if topic == SPILL and v == stuck and refusing[0] else "ack"
    )
    await r.start((0,))
    await wait_for(lambda: r.outcomes.failing() == 1, 5, what="the refused spill write")
    await r.intake.commit()
    assert (r.consumer.committed_offset(0) or 0) <= 20  # nothing past the refused record
    refusing[0] = False
    await wait_for(lambda: len(r.sent) == 40, 10, what="the whole campaign")
    assert sorted(r.sent) == sorted(d["request_id"] for d in docs)  # each once
    assert len(r.publisher.on(SPILL)) == r.intake.spill.spilled  # none of the run twice
    counted = sum(
        sample.value
        for metric in r.metrics.spilled.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    assert counted == r.intake.spill.spilled  # records, not runs
    await wait_for(lambda: r.intake.buffered == 0, 5, what="every ending")
    await r.intake.commit()
    assert r.consumer.committed_offset(0) == 40


async def test_high_priority_of_a_spilling_app_goes_out_with_its_next_slot(rig: Any) -> None:
    r = await rig(rates={"campaign": 20.0}, lane_horizon_s=0.5, lane_min_read_ahead=5)
    for _ in range(40):
        r.publish(0, "campaign")
    await r.start((0,))
    await wait_for(lambda: r.intake.spill.spilling("campaign"), 5, what="the campaign to spill")
    urgent = r.publish(0, "campaign", priority="high")["request_id"]
    on_high = orjson.dumps(sample_request("campaign", 0))
    r.consumer.append(HIGH, 0, on_high, key=b"campaign")
    high_id = orjson.loads(on_high)["request_id"]
    await wait_for(lambda: {urgent, high_id} <= set(r.sent), 5, what="both urgent sends")
    assert len(r.sent) < 25  # long before the campaign's backlog


async def test_only_records_that_are_surely_the_spilling_app_s_and_not_high_skip_decoding(
    rig: Any,
) -> None:
    """A record keyed by a spilling app goes to the spill topic undecoded only when it is
    surely that app's and not high priority: an escaped "high" and another app's record
    under that key are decoded and go to their lanes at once."""
    r = await rig(rates={"campaign": 20.0}, lane_horizon_s=0.5, lane_min_read_ahead=5)
    for _ in range(40):
        r.publish(0, "campaign")
    await r.start((0,))
    await wait_for(lambda: r.intake.spill.spilling("campaign"), 5, what="the campaign to spill")
    escaped = sample_request("campaign", 0) | {"priority": "high"}
    value = orjson.dumps(escaped).replace(b'"high"', b'"\\u0068igh"')
    r.consumer.append(TOPIC, 0, value, key=b"campaign")
    other = sample_request("otp", 0)
    r.consumer.append(TOPIC, 0, orjson.dumps(other), key=b"campaign")
    urgent = {escaped["request_id"], other["request_id"]}
    await wait_for(lambda: urgent <= set(r.sent), 5, what="both sends")
    assert len(r.sent) < 25  # long before the campaign's backlog


async def test_a_spill_partition_is_read_only_while_its_app_has_room(rig: Any) -> None:
    r = await rig(rates={"campaign": 20.0}, lane_horizon_s=0.25, lane_min_read_ahead=5)
    for _ in range(50):
        r.publish(0, "campaign")
    await r.start((0,))
    await wait_for(lambda: r.intake.spill.spilled >= 40, 5, what="the backlog to spill")
    part = r.intake.spill.partition_of["campaign"]
    await wait_for(
        lambda: TopicPartition(SPILL, part) in r.consumer.paused, 5, what="the spill partition"
    )
    lane = r.lanes.lanes["campaign"]
    assert lane.depth <= 6  # never more than the read-ahead in memory
    assert r.intake.buffered <= 8


async def test_a_wait_for_records_takes_a_slice_of_a_spill_partition_not_the_whole_room(
    rig: Any,
) -> None:
    """Reading a spill partition stops at the first app whose lane is full, and what was
    handed out beyond it is fetched again: with nothing at hand, the wait for records
    takes a spill partition's slice (fetch_max_records over the spill partitions read)."""
    r = await rig(fetch_max_records=100)
    await r.intake.start()
    tps = {TopicPartition(SPILL, p) for p in range(4)}
    r.consumer.assigned = set(tps)
    await r.intake.assign(tps)
    for n in range(500):
        r.consumer.append(SPILL, 0, orjson.dumps(sample_request("x", n)), key=b"x")
    at_hand = r.consumer.getmany

    async def nothing_prefetched(*tps: Any, timeout_ms: int = 0, **kw: Any) -> Any:
        return await at_hand(*tps, timeout_ms=timeout_ms, **kw) if timeout_ms else {}

    r.consumer.getmany = nothing_prefetched  # type: ignore[method-assign]
    batch = await r.intake._fetch(r.consumer, 2000)
    assert 0 < sum(len(records) for records in batch.values()) <= 25


async def test_apps_sharing_a_spill_partition_do_not_wait_for_each_other(rig: Any) -> None:
    """A full app's spilled record is taken while another app of the partition wants more,
    up to twice its read-ahead; past that (or when no other app wants more) the read stops."""
    r = await rig(rates={"x": 1.0, "y": 1.0}, lane_horizon_s=10, lane_min_read_ahead=1)
    await r.intake.start()
    tps = {TopicPartition(TOPIC, 0), TopicPartition(SPILL, 0)}
    r.consumer.assigned = set(tps)
    await r.intake.assign(tps)
    spill = r.intake.trackers[TopicPartition(SPILL, 0)]
    r.open.clear()  # nothing is sent: the lanes keep what they are given
    for app in ("x", "y"):
        r.intake.spill.note_spilled(app)
        r.intake.spill.partition_of[app] = 0
    x = r.lanes.lane("x")
    ahead = r.intake.read_ahead(x)  # about 10 records
    for n in range(int(ahead) + 1):
        r.lanes.put(decode(orjson.dumps(sample_request("x", n)), max_bytes=10_000))
    offsets = iter(range(1000))

    def x_record() -> Record:
        value = orjson.dumps(sample_request("x", 100 + next(offsets)))
        return Record(0, next(offsets), value, topic=SPILL, key=b"x")

    assert not r.intake.has_room("x")
    # y's lane is empty and wants more: x's records met on the way are taken
    assert r.intake.take_spilled(spill, x_record())
    while r.intake.has_room("x", 2.0):
        assert r.intake.take_spilled(spill, x_record())
    assert x.depth <= 2 * ahead + 1
    # twice the read-ahead: the read stops at x
    assert not r.intake.take_spilled(spill, x_record())
    assert r.intake.spill.head[0] == "x"
    assert r.intake.spill.wanted(0)  # y still wants more: the partition stays wanted
    # no other app wants more: a full app stops the read at once
    for n in range(int(ahead) + 1):
        r.lanes.put(decode(orjson.dumps(sample_request("y", n)), max_bytes=10_000))
    assert not r.intake.spill.wanted(0)


class _JoiningConsumer(FakeConsumer):
    """Like aiokafka with a subscription: start() joins the group, and the first
    assignment is handed to the listener before start() returns."""

    def __init__(self, listener: Any, committed: dict[TopicPartition, Any]) -> None:
        super().__init__(partitions=1)
        self._listener = listener
        self._committed = committed
        self._coordinator = self

    async def fetch_committed_offsets(self, tps: set[TopicPartition]) -> dict[TopicPartition, Any]:
        return {tp: self._committed[tp] for tp in tps if tp in self._committed}

    async def start(self) -> None:
        self.assigned = {TopicPartition(TOPIC, 0)}
        await self._listener.on_partitions_assigned(set(self.assigned))


async def test_the_first_assignment_reads_the_commit_and_skips_what_was_finished(
    rig: Any,
) -> None:
    from aiokafka.structs import OffsetAndMetadata

    from gateway.offsets import encode_done

    r = await rig()
    tp = TopicPartition(TOPIC, 0)
    committed = {tp: OffsetAndMetadata(5, encode_done(5, [(7, 9)]))}
    joining: list[_JoiningConsumer] = []

    def factory(listener: Any) -> _JoiningConsumer:
        consumer = _JoiningConsumer(listener, committed)
        joining.append(consumer)
        return consumer

    r.intake._consumer_factory = factory
    await r.intake.start()
    consumer = joining[0]
    ids = []
    for n in range(10):
        doc = sample_request("app-1", n)
        consumer.add(0, orjson.dumps(doc), key=b"app-1")
        ids.append(doc["request_id"])
    consumer.position[(TOPIC, 0)] = 5  # where Kafka starts a member: the committed offset
    r.task = asyncio.create_task(r.intake.run())
    await wait_for(lambda: len(r.sent) >= 3, 5, what="the records after the commit")
    await wait_for(lambda: r.intake.trackers[tp].committable() >= 10, 5, what="all to finish")
    assert r.sent == [ids[5], ids[6], ids[9]]  # 7 and 8 were finished by the last owner
    assert not r.intake.trackers[tp].skip  # read past: nothing left to look up per record


async def test_a_consumer_that_cannot_leave_the_group_does_not_hold_the_exit(
    rig: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A leave that never completes (a rebalance the broker does not finish) is given up
    after revoke_timeout_s + session_timeout_s, and says where it waited."""
    r = await rig(revoke_timeout_s=0.1, session_timeout_s=0.2)
    await r.start((0,))
    never = asyncio.Event()

    async def stuck_leave() -> None:
        await never.wait()

    r.consumer.stop = stuck_leave  # type: ignore[method-assign]
    r.consumer.closed_parts = []

    class Part:
        def __init__(self, name: str) -> None:
            self.name = name

        async def close(self) -> None:
            r.consumer.closed_parts.append(self.name)

    r.consumer._fetcher, r.consumer._client = Part("_fetcher"), Part("_client")
    loop_clock = asyncio.get_running_loop().time
    t0 = loop_clock()
    await asyncio.wait_for(r.intake.stop(), 5)
    assert 0.25 <= loop_clock() - t0 < 2.0
    assert "did not leave the group within" in caplog.text
    assert "stuck_leave" in caplog.text
    assert r.consumer.closed_parts == ["_fetcher", "_client"]  # what stop() closes after
