"""Sent request ids: the local window, and the group's in a real Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from gateway.dedupe import GroupSentIds, RecentIds
from tests.fakes import FakeClock


def test_recent_ids_forget_by_age_and_size_and_mirror_what_is_added() -> None:
    clock = FakeClock()
    mirrored: list[str] = []
    ids = RecentIds(2, 10, clock)
    ids.on_add = mirrored.append
    ids.add("a")
    ids.add("b", mirror=False)
    ids.add("c")
    assert "a" not in ids  # the oldest of three, over the size of 2
    assert {"b", "c"} <= {i for i in ("a", "b", "c") if i in ids}
    clock.advance(11)
    assert "c" not in ids
    assert mirrored == ["a", "c"]


async def test_what_one_replica_sent_another_finds_in_redis(redis_server) -> None:
    one = aioredis.Redis.from_url(redis_server.url)
    two = aioredis.Redis.from_url(redis_server.url)
    try:
        sender = GroupSentIds(one, ttl_s=60, prefix="t-sent:")
        successor = GroupSentIds(two, ttl_s=60, prefix="t-sent:")
        sender.remember("r-1")
        sender.remember("r-2")
        assert await successor.known(["r-1", "r-2", "r-3"]) == set()  # not flushed yet
        await sender.flush()
        assert await successor.known(["r-1", "r-2", "r-3"]) == {"r-1", "r-2"}
        await sender.close()
    finally:
        await one.aclose()
        await two.aclose()


async def test_redis_unreachable_costs_nothing_but_an_answer(redis_server) -> None:
    gone = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        ids = GroupSentIds(gone, ttl_s=60)
        ids.remember("r-1")
        await ids.flush()
        assert await ids.known(["r-1"]) == set()
        assert ids.failures == 2
    finally:
        await gone.aclose()
