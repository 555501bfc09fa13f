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
