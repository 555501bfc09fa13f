"""Outcomes: every ending is written before its record is finished, whatever Kafka does."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.cli import sample_request
from gateway.dedupe import RecentIds
from gateway.envelope import Request, decode
from gateway.metrics import LabelCap, Metrics
from gateway.offsets import Origin, PartitionTracker
from gateway.outcomes import Ending, Outcomes
from gateway.settings import Settings, load
from tests.conftest import wait_for
from tests.fakes import FakeClock, ScriptedPublisher

RESULTS = "sinch.outbound.results"
STATUS = "sinch.outbound.status"
DLQ = "sinch.outbound.dlq"


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {"backoff_base_s": 0.005, "backoff_max_s": 0.02, "outcome_stuck_s": 30}
    return load(env={}, **(base | kw))


class Harness:
    def __init__(self, publisher: ScriptedPublisher, **kw: Any) -> None:
        self.clock = FakeClock()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.sent_ids = RecentIds(100, 3600, self.clock)
        self.released: list[tuple[int, bool]] = []
        self.tracker = PartitionTracker(0)
        self.publisher = publisher
        self.outcomes = Outcomes(
            settings=settings(**kw),
            publisher=publisher,
            metrics=self.metrics,
            sent_ids=self.sent_ids,
            clock=self.clock,
            release=self.release,
        )

    def release(self, ending: Ending, finished: bool) -> None:
        self.released.append((ending.origin.offset, finished))
        if finished:
            ending.origin.tracker.done(ending.origin.offset)

    def request(self, offset: int, value: bytes | None = None, **origin: Any) -> Request:
        value = value or orjson.dumps(sample_request("app-1", offset))
        req = decode(value, max_bytes=100_000)
        self.tracker.add(offset)
        req.origin = Origin(self.tracker, offset, key=b"app-1", value=value, **origin)
        return req

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def sent(h: Harness, req: Request) -> None:
    h.outcomes.sent(req, message_id="m-1", accepted_time="t", timings={})


async def test_a_refused_result_write_is_retried_then_finished() -> None:
    refusals = {"n": 0}

    def refuse(topic: str, _value: bytes | None) -> str:
        if topic == RESULTS and refusals["n"] < 3:
            refusals["n"] += 1
            return "fail"
        return "ack"

    h = Harness(ScriptedPublisher(refuse))
    req = h.request(0)
    sent(h, req)
    await wait_for(lambda: h.released, 5, what="the ending to be written")
    assert h.released == [(0, True)]
    assert h.tracker.committable() == 1  # committed past it now
    assert len(h.publisher.on(RESULTS)) == 1
    assert len(h.publisher.on(STATUS)) == 1  # an acknowledged output is not written twice
    assert h.sample("gateway_outcome_write_failures_total", topic=RESULTS) == 3
    assert req.request_id in h.sent_ids


async def test_a_write_raising_at_once_is_retried_too() -> None:
    calls = {"n": 0}

    def refuse(topic: str, _value: bytes | None) -> str:
        calls["n"] += 1
        return "raise" if calls["n"] <= 2 else "ack"

    h = Harness(ScriptedPublisher(refuse))
    h.outcomes.expired(h.request(0))
    await wait_for(lambda: h.released, 5, what="the expired ending to be written")
    assert h.released == [(0, True)]
    assert len(h.publisher.on(RESULTS)) == 1


async def test_a_permanently_refused_dlq_write_holds_the_partition_and_readiness() -> None:
    h = Harness(ScriptedPublisher(lambda topic, _v: "fail" if topic == DLQ else "ack"))
    bad = h.request(0)
    good = h.request(1)
    h.outcomes.failed(bad, "http_400", http_status=400, error={"code": 400})
    sent(h, good)
    await wait_for(lambda: (1, True) in h.released, 5, what="the later record to finish")
    await wait_for(lambda: h.outcomes.failing() == 1, 5, what="the DLQ write to be failing")
    assert h.tracker.committable() == 0  # nothing past the refused record is committed
    assert h.outcomes.stuck()[0]  # not yet past outcome_stuck_s
    h.clock.advance(31)
    ok, reason = h.outcomes.stuck()
    assert not ok
    assert "Kafka refuses" in reason
    assert h.outcomes.oldest_failure_s() >= 31
    assert h.sample("gateway_outcome_write_failures_total", topic=DLQ) >= 1
    # the refusal ends: the record is finished and the partition moves on
    h.publisher.refuse = lambda topic, _v: "ack"
    await wait_for(lambda: (0, True) in h.released, 5, what="the DLQ write to go through")
    assert h.tracker.committable() == 2
    assert h.outcomes.stuck()[0]


async def test_the_sent_id_is_remembered_only_once_the_result_is_written() -> None:
    h = Harness(ScriptedPublisher(lambda topic, _v: "fail"))
    req = h.request(0)
    sent(h, req)
    await wait_for(lambda: h.outcomes.failing() == 1, 5, what="the write to fail")
    assert req.request_id not in h.sent_ids


async def test_an_abandoned_sent_ending_is_adopted_by_the_re_read_record() -> None:
    h = Harness(ScriptedPublisher(lambda topic, _v: "fail"))
    first = h.request(0)
    sent(h, first)
    await wait_for(lambda: h.outcomes.failing() == 1, 5, what="the write to fail")
    assert await h.outcomes.settle({h.tracker}, 0.05) is False  # revoked: abandoned
    assert h.released == [(0, False)]
    assert h.outcomes.writing == 0
    # the partition comes back; Kafka takes writes again; the record is read again
    h.publisher.refuse = lambda topic, _v: "ack"
    h.tracker = PartitionTracker(0)
    again = h.request(0, value=first.origin.value if first.origin else None)
    assert again.request_id == first.request_id
    assert h.outcomes.adopt(again)
    await wait_for(lambda: (0, True) in h.released, 5, what="the adopted result")
    results = [orjson.loads(v or b"") for v, _k, _h in h.publisher.on(RESULTS)]
    assert [r["status"] for r in results] == ["sent"]
    assert results[0]["message_id"] == "m-1"
    assert not h.outcomes.adopt(again)  # once


async def test_dlq_record_keeps_the_original_headers_and_adds_the_reason() -> None:
    h = Harness(ScriptedPublisher())
    req = h.request(0, headers=(("traceparent", b"00-abc"), ("tenant", b"t1")))
    h.outcomes.failed(req, "http_400", http_status=400, error={"code": 400})
    await wait_for(lambda: h.released, 5, what="the failure to be written")
    ((value, key, headers),) = h.publisher.on(DLQ)
    assert value == req.origin.value if req.origin else False
    assert key == b"app-1"
    assert headers[:2] == [("traceparent", b"00-abc"), ("tenant", b"t1")]
    assert dict(headers)["gateway.reason"] == b"http_400"


@pytest.mark.parametrize(
    ("rid", "app"), [("r-9", "app-9"), (None, None)], ids=["readable", "unreadable"]
)
async def test_a_rejected_result_carries_what_could_be_read(
    rid: str | None, app: str | None
) -> None:
    h = Harness(ScriptedPublisher())
    h.tracker.add(0)
    origin = Origin(h.tracker, 0, key=b"k", value=b"{}")
    h.outcomes.rejected(origin, "missing_field", "payload.recipient", request_id=rid, app_id=app)
    await wait_for(lambda: h.released, 5, what="the rejection to be written")
    ((value, key, _),) = h.publisher.on(RESULTS)
    result = orjson.loads(value or b"")
    assert (result["request_id"], result["app_id"], result["status"]) == (rid, app, "rejected")
    assert key == (rid.encode() if rid else b"k")


async def test_settle_waits_for_writes_in_progress() -> None:
    gate = asyncio.Event()

    class SlowPublisher(ScriptedPublisher):
        async def send(self, topic: str, value: bytes | None, **kw: Any) -> Any:
            await gate.wait()
            return await super().send(topic, value, **kw)

    h = Harness(SlowPublisher())
    sent(h, h.request(0))
    asyncio.get_running_loop().call_soon(gate.set)
    assert await h.outcomes.settle(None, 5.0)
    assert h.released == [(0, True)]


async def test_a_campaign_tag_reaches_the_result_and_its_bounded_metric() -> None:
    h = Harness(ScriptedPublisher(lambda _t, _v: "ack"))
    h.metrics.campaign_label = LabelCap(1)
    for offset, campaign in enumerate(("spring", "summer", None)):
        doc = sample_request("app-1", offset)
        if campaign:
            doc["campaign"] = campaign
        sent(h, h.request(offset, orjson.dumps(doc)))
    await wait_for(lambda: len(h.released) == 3, 5, what="the three endings to be written")
    results = [orjson.loads(value or b"") for value, _k, _h in h.publisher.on(RESULTS)]
    assert sorted(r["campaign"] or "" for r in results) == ["", "spring", "summer"]
    sample = "gateway_campaign_requests_finished_total"
    assert h.sample(sample, campaign="spring", status="sent") == 1
    assert h.sample(sample, campaign="other", status="sent") == 1  # past the label cap


async def test_a_cancelled_request_gets_its_result_then_is_finished() -> None:
    h = Harness(ScriptedPublisher(lambda _t, _v: "ack"))
    doc = sample_request("app-1", 0)
    doc["campaign"] = "spring"
    h.outcomes.cancelled(h.request(0, orjson.dumps(doc)), "dropped by ops")
    await wait_for(lambda: h.released == [(0, True)], 5, what="the cancelled ending")
    [(value, key, _headers)] = h.publisher.on(RESULTS)
    result = orjson.loads(value or b"")
    assert key == result["request_id"].encode()
    assert (result["status"], result["campaign"]) == ("cancelled", "spring")
    assert result["error"] == {"reason": "cancelled", "message": "dropped by ops"}
    assert h.publisher.on(DLQ) == []
    assert h.publisher.on(STATUS) == []
    assert h.sample("gateway_requests_finished_total", app_id="app-1", status="cancelled") == 1


class CountingPublisher(ScriptedPublisher):
    """Counts the hand-overs: each ``send_many`` call is one flush of the writer."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes: list[int] = []

    async def send_many(self, outputs: Any) -> Any:
        self.flushes.append(len(outputs))
        return await super().send_many(outputs)


async def test_the_writer_gathers_endings_and_hands_them_over_at_once() -> None:
    h = Harness(CountingPublisher(), outcome_linger_ms=200)
    for offset in range(5):
        sent(h, h.request(offset))
        for _ in range(5):  # turns of the event loop: a writer that did not linger writes it
            await asyncio.sleep(0)
    await wait_for(lambda: len(h.released) == 5, 5, what="the five endings to be written")
    assert h.publisher.flushes == [10]  # type: ignore[attr-defined]  # 5 results + 5 statuses


async def test_settle_does_not_wait_for_the_linger() -> None:
    h = Harness(CountingPublisher(), outcome_linger_ms=1000)
    sent(h, h.request(0))
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await h.outcomes.settle(None, 30.0)
    assert loop.time() - start < 1.0  # flushed on request, not after the second of linger
    assert h.released == [(0, True)]


async def test_a_backlog_of_endings_is_written_without_lingering() -> None:
    h = Harness(CountingPublisher(), outcome_linger_ms=1000)
    for offset in range(600):  # past FLUSH_AT: a spill's worth
        sent(h, h.request(offset))
    loop = asyncio.get_running_loop()
    start = loop.time()
    await wait_for(lambda: len(h.released) >= 512, 5, what="the first chunk to be written")
    assert loop.time() - start < 1.0
    assert h.publisher.flushes[0] == 2 * 512  # type: ignore[attr-defined]  # one chunk
