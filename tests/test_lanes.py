"""Lanes: order within an app, retries due in time, nothing dropped when a sender raises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from gateway.cli import sample_request
from gateway.envelope import Request, decode
from gateway.lanes import Lane, Lanes
from gateway.limiter import Bucket
from gateway.offsets import Origin, PartitionTracker
from tests.conftest import wait_for


def request(app_id: str, n: int, priority: str = "normal") -> Request:
    value = orjson.dumps(sample_request(app_id, n, priority=priority))
    req = decode(value, max_bytes=100_000)
    req.origin = Origin(PartitionTracker(0), n, value=value)
    return req


class Recorder:
    def __init__(self) -> None:
        self.sent: list[Request] = []
        self.fail_first: set[str] = set()
        self.handed_back: list[Request] = []

    async def send(self, req: Request, _lane: Lane) -> None:
        if req.request_id in self.fail_first:
            self.fail_first.discard(req.request_id)
            raise RuntimeError("a bug in the sender")
        self.sent.append(req)


@pytest.fixture
async def lanes() -> AsyncIterator[tuple[Lanes, Recorder]]:
    clock = asyncio.get_running_loop().time
    rec = Recorder()
    lanes = Lanes(
        project_bucket=Bucket("project", 10_000, clock=clock),
        make_app_bucket=lambda app, _project: Bucket(f"app:{app}", 10_000, clock=clock),
        channel_buckets={},
        max_in_flight=10,
        sender=rec.send,
        clock=clock,
        hand_back=rec.handed_back.append,
    )
    yield lanes, rec
    await lanes.close()


async def test_high_priority_goes_first_and_order_is_kept_within_a_priority(
    lanes: tuple[Lanes, Recorder],
) -> None:
    ls, rec = lanes
    lane = ls.lane("a1")
    ls.lanes["a1"].pause(asyncio.get_running_loop().time() + 0.2, "test")  # fill it first
    normal = [request("a1", i) for i in range(3)]
    low = request("a1", 10, "low")
    high = request("a1", 20, "high")
    for r in [*normal[:2], low, high, normal[2]]:
        lane.put(r)
    await wait_for(lambda: len(rec.sent) == 5, 5, what="all five sent")
    assert [r.request_id for r in rec.sent] == [r.request_id for r in [high, *normal, low]]


async def test_a_sender_that_raises_gets_the_request_back(
    lanes: tuple[Lanes, Recorder],
) -> None:
    ls, rec = lanes
    req = request("a1", 0)
    rec.fail_first.add(req.request_id)
    ls.put(req)
    await wait_for(lambda: len(rec.sent) == 1, 5, what="the retry after the error")
    assert rec.sent[0] is req
    assert ls.in_flight == 0


async def test_a_request_of_a_revoked_partition_is_handed_back_not_sent(
    lanes: tuple[Lanes, Recorder],
) -> None:
    ls, rec = lanes
    kept, revoked = request("a1", 0), request("a1", 1)
    assert revoked.origin is not None
    revoked.origin.tracker.revoked = True
    ls.put(revoked)
    ls.put(kept)
    await wait_for(lambda: len(rec.sent) == 1 and rec.handed_back, 5, what="both handled")
    assert rec.sent == [kept]
    assert rec.handed_back == [revoked]


async def test_a_held_lane_sends_nothing_and_sends_all_in_order_once_released() -> None:
    clock = asyncio.get_running_loop().time
    rec = Recorder()
    ls = Lanes(
        project_bucket=Bucket("project", 10_000, clock=clock),
        make_app_bucket=lambda app, _project: Bucket(f"app:{app}", 20, clock=clock),
        channel_buckets={},
        max_in_flight=10,
        sender=rec.send,
        clock=clock,
    )
    try:
        reqs = [request("a1", i) for i in range(10)]
        for r in reqs:
            ls.put(r)
        await wait_for(lambda: len(rec.sent) >= 2, 5, what="the first sends")
        ls.hold("a1", "ops")
        at_hold = len(rec.sent)
        other = request("a2", 0)
        ls.put(other)  # another app is not held
        await wait_for(lambda: other in rec.sent, 5, what="the other app's send")
        # a worker that held a request waiting for its slot puts it back: slots are 50 ms
        await wait_for(lambda: ls.lanes["a1"].current is None, 5, what="the worker to park")
        assert len([r for r in rec.sent if r.app_id == "a1"]) == at_hold
        assert ls.lanes["a1"].depth == 10 - at_hold
        ls.hold("a1", None)
        await wait_for(lambda: len(rec.sent) == 11, 5, what="the rest after the release")
        assert [r for r in rec.sent if r.app_id == "a1"] == reqs
    finally:
        await ls.close()


async def test_a_new_lane_of_a_held_app_starts_held(lanes: tuple[Lanes, Recorder]) -> None:
    ls, rec = lanes
    ls.hold("later", "ops")
    ls.put(request("later", 0))
    assert ls.lanes["later"].held == "ops"
    ls.put(request("a1", 0))
    await wait_for(lambda: len(rec.sent) == 1, 5, what="the free app's send")
    assert rec.sent[0].app_id == "a1"
    assert ls.lanes["later"].depth == 1


async def test_cancel_ends_the_waiting_requests_it_picks_and_screen_ends_new_ones(
    lanes: tuple[Lanes, Recorder],
) -> None:
    ls, rec = lanes
    cancelled: list[tuple[Request, str]] = []
    ls.on_cancel = lambda req, why: cancelled.append((req, why))
    ls.hold("a1", "ops")
    spring = [request("a1", i) for i in range(4)]
    for r in spring:
        r.campaign = "spring"
    other = request("a1", 9)
    retry = request("a1", 10)
    retry.campaign = "spring"
    for r in spring[:2]:
        ls.put(r)
    ls.put(other)
    for r in spring[2:]:
        ls.put(r)
    ls.lanes["a1"].put_retry(retry, 0.0)
    n = ls.cancel(lambda r: r.campaign == "spring", "dropped")
    assert n == 5
    assert sorted(r.request_id for r, _ in cancelled) == sorted(
        r.request_id for r in [*spring, retry]
    )
    assert {why for _, why in cancelled} == {"dropped"}
    assert ls.lanes["a1"].depth == 1
    ls.screen = lambda r: "rule" if r.campaign == "spring" else None
    late = request("a1", 11)
    late.campaign = "spring"
    ls.put(late)
    assert cancelled[-1] == (late, "rule")
    ls.hold("a1", None)
    await wait_for(lambda: len(rec.sent) == 1, 5, what="the kept request")
    assert rec.sent == [other]


async def test_the_request_waiting_for_its_slot_is_cancelled_not_sent() -> None:
    clock = asyncio.get_running_loop().time
    rec = Recorder()
    ls = Lanes(
        project_bucket=Bucket("project", 10_000, clock=clock),
        make_app_bucket=lambda app, _project: Bucket(f"app:{app}", 2, clock=clock),
        channel_buckets={},
        max_in_flight=10,
        sender=rec.send,
        clock=clock,
    )
    cancelled: list[Request] = []
    ls.on_cancel = lambda req, _why: cancelled.append(req)
    try:
        first, second = request("a1", 0), request("a1", 1)
        ls.put(first)
        ls.put(second)
        await wait_for(lambda: ls.lanes["a1"].current is second, 5, what="the second's wait")
        assert ls.cancel(lambda r: r is second, "dropped") == 1
        await wait_for(lambda: cancelled == [second], 5, what="its cancellation")
        assert rec.sent == [first]
    finally:
        await ls.close()
