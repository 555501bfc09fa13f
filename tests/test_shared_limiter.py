"""Shared buckets on a real redis-server: replicas are limiter instances, each its own client."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.limiter import Bucket, acquire
from gateway.shared_limiter import SharedBucket, SharedLimiter
from tests.conftest import RedisServer, wait_for
from tests.test_limiter import max_in_window

Factory = Callable[..., Awaitable[SharedLimiter]]


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Factory]:
    """Limiter instances on one Redis, with a key prefix of this test's own."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    async with AsyncExitStack() as stack:

        async def make(**kwargs: Any) -> SharedLimiter:
            lim = SharedLimiter(redis_server.url, key_prefix=prefix, **kwargs)
            return await stack.enter_async_context(lim)

        yield make


class Senders:
    """``n`` tasks per bucket set that acquire and note the send time, as lane workers do."""

    def __init__(self) -> None:
        self.sends: dict[str, list[float]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.clock = asyncio.get_running_loop().time

    def run(self, name: str, buckets: list[Bucket | SharedBucket], n: int) -> None:
        times = self.sends.setdefault(name, [])

        async def send() -> None:
            while True:
                await acquire(buckets, self.clock)
                times.append(self.clock())

        self.tasks += [asyncio.create_task(send()) for _ in range(n)]

    def all(self) -> list[float]:
        return sorted(t for ts in self.sends.values() for t in ts)

    def count(self) -> int:
        return sum(len(ts) for ts in self.sends.values())

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()


@pytest.fixture
async def senders() -> AsyncIterator[Senders]:
    s = Senders()
    yield s
    await s.stop()


async def run_for(seconds: float) -> None:
    """Let the senders run: the measurement period itself, not a wait for a condition."""
    await asyncio.sleep(seconds)


async def test_three_replicas_with_skewed_load_keep_one_cap_and_use_it(
    replicas: Factory, senders: Senders
) -> None:
    limiters = [await replicas() for _ in range(3)]
    buckets = [lim.bucket("project:p", 200, margin=0.01) for lim in limiters]
    # the third replica's partitions are idle: it holds the bucket and never draws
    senders.run("busy", [buckets[0]], 16)
    senders.run("less busy", [buckets[1]], 4)
    await run_for(3.2)
    await senders.stop()
    sends = senders.all()
    # the first and last slots bound the period: 0.2 s of tail is the pacing's own
    span = [t for t in sends if t < sends[0] + 3.0]
    per_send = sum(lim.roundtrips for lim in limiters) / len(sends)
    print(
        f"\nshared 200/s, 3 replicas (1 idle): {len(span)} sends in 3 s "
        f"({len(span) / 600:.3f} of the cap), max 1-s window {max_in_window(sends)}, "
        f"{per_send:.3f} round trips per send, {sum(b.lost for b in buckets)} slots lost"
    )
    assert max_in_window(sends) <= 200
    assert len(span) >= 0.95 * 200 * 3, len(span)
    assert len(senders.sends["less busy"]) > 0.1 * len(sends)  # both replicas drew slots
    assert buckets[2].drawn == 0
    assert per_send <= 1 / 3, per_send  # batches of up to 4 (the default): mostly full


async def test_an_app_keeps_its_window_when_it_moves_to_another_replica(
    replicas: Factory, senders: Senders
) -> None:
    a, b = await replicas(), await replicas()
    app_a = a.bucket("app:a1", 20, margin=0.01)
    app_b = b.bucket("app:a1", 20, margin=0.01)
    senders.run("a", [app_a], 1)  # one lane worker per app
    await wait_for(lambda: len(senders.sends["a"]) >= 20, 5, what="20 sends on replica a")
    await senders.stop()  # the app moves: a rebalance gives its partition to b
    senders.run("b", [app_b], 1)
    await wait_for(lambda: len(senders.sends["b"]) >= 30, 5, what="30 sends on replica b")
    await senders.stop()
    assert max_in_window(senders.all()) <= 20
    # the move costs the slots that a had drawn and not used, no more
    on_a, on_b = senders.sends["a"], senders.sends["b"]
    unused_on_a = app_a.drawn - len(on_a)
    assert on_b[0] - on_a[-1] <= (unused_on_a + 1) * app_a.interval + 0.02
    rate_b = (len(on_b) - 1) / (on_b[-1] - on_b[0])
    assert rate_b >= 0.95 * 20, (rate_b, app_b.lost)


def stall(seconds: float) -> None:
    """Block the event loop, as a long callback or a descheduled process does."""
    time.sleep(seconds)


async def test_stalls_of_the_loop_never_bunch_sends(replicas: Factory, senders: Senders) -> None:
    lim = await replicas()
    bucket = lim.bucket("project:p", 100, margin=0.01)
    senders.run("a", [bucket], 4)

    async def staller() -> None:
        while True:
            await asyncio.sleep(0.15)
            stall(0.03)

    task = asyncio.create_task(staller())
    try:
        await wait_for(lambda: senders.count() >= 200, 10, what="200 sends")
    finally:
        task.cancel()
    await senders.stop()
    sends = senders.all()
    assert max_in_window(sends) <= 100
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert min(gaps) >= bucket.interval - bucket.grace_s - 1e-4
    assert bucket.lost > 0  # the stalls did cost slots, and none of them was sent late
    # the metric's source counts them by kind, and keeps them when the bucket is forgotten
    assert lim.slots_lost("project") == bucket.lost
    assert lim.slots_lost("app") == 0
    lim.forget(bucket)
    assert lim.slots_lost("project") == bucket.lost


async def test_app_and_project_buckets_both_shared(replicas: Factory, senders: Senders) -> None:
    a, b = await replicas(), await replicas()
    for lim, apps in ((a, "wx"), (b, "yz")):
        project = lim.bucket("project:p", 50, margin=0.01)
        for app in apps:
            senders.run(app, [lim.bucket(f"app:{app}", 20, margin=0.01), project], 1)
    await run_for(2.2)
    await senders.stop()
    sends = senders.all()
    assert max_in_window(sends) <= 50
    for app in "wxyz":
        assert max_in_window(senders.sends[app]) <= 20
    span = [t for t in sends if t < sends[0] + 2.0]
    assert len(span) >= 0.9 * 50 * 2, len(span)
    print(f"\nboth shared: {len(span)} sends in 2 s; rt {a.roundtrips + b.roundtrips}")


async def test_redis_down_holds_sending_and_it_resumes_by_itself(
    redis_server: RedisServer, replicas: Factory, senders: Senders
) -> None:
    lim = await replicas(backoff_max_s=0.2)
    bucket = lim.bucket("project:p", 100, margin=0.01)
    senders.run("a", [bucket], 8)
    await wait_for(lambda: senders.count() >= 20, 5, what="first sends")
    assert lim.readiness() == (True, "connected")
    try:
        redis_server.stop()
        await wait_for(lambda: not lim.healthy(), 5, what="the limiter to notice")
        held_at = senders.count()
        ok, reason = lim.readiness()
        assert not ok
        assert reason.startswith("redis unreachable: ")
        failures = lim.failures
        await wait_for(lambda: lim.failures >= failures + 3, 5, what="three reconnect attempts")
        assert senders.count() == held_at  # held: nothing sent without a slot
        assert all(not t.done() for t in senders.tasks)  # and nothing raised to the caller
    finally:
        redis_server.start()
    await wait_for(lim.healthy, 5, what="the limiter to reconnect")
    await wait_for(lambda: senders.count() >= held_at + 20, 5, what="sending to resume")
    assert all(not t.done() for t in senders.tasks)


async def test_unreachable_at_start_is_not_an_error_and_holds(redis_server: RedisServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with SharedLimiter(f"redis://127.0.0.1:{port}/0", timeout_s=0.2) as lim:
        ok, reason = lim.readiness()
        assert not ok
        assert reason.startswith("redis unreachable: ")
        bucket = lim.bucket("project:p", 100)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(bucket.take(), 0.3)
        assert bucket.drawn == 0


async def test_a_rate_change_on_one_replica_applies_to_all(
    replicas: Factory, senders: Senders
) -> None:
    a, b = await replicas(), await replicas()
    changed: list[float] = []
    bucket_a = a.bucket("project:p", 100, margin=0.01)
    bucket_b = b.bucket("project:p", 100, margin=0.01, on_change=lambda x: changed.append(x.rate))
    senders.run("a", [bucket_a], 4)
    senders.run("b", [bucket_b], 4)
    await wait_for(lambda: senders.count() >= 100, 5, what="sends at the first rate")
    bucket_a.set_rate(40)
    await wait_for(lambda: bucket_b.rate == 40, 5, what="replica b to follow")
    assert changed == [40]
    since = senders.clock() + 0.2  # slots drawn before the change run out within a batch
    await wait_for(lambda: senders.clock() > since + 2.0, 5, what="two seconds at the new rate")
    after = [t for t in senders.all() if t >= since]
    assert max_in_window(after) <= 40
    assert len(after) >= 0.9 * 40 * 2
    assert all(any(t >= since for t in senders.sends[n]) for n in ("a", "b"))


async def test_the_newest_configuration_wins(replicas: Factory, senders: Senders) -> None:
    a = await replicas()
    old = a.bucket("channel:WHATSAPP", 80)
    senders.run("a", [old], 2)
    await wait_for(lambda: senders.count() >= 5, 5, what="sends at the old rate")
    b = await replicas()  # a new replica with a new configuration starts
    new = b.bucket("channel:WHATSAPP", 30)
    senders.run("b", [new], 2)
    await wait_for(lambda: old.rate == 30, 5, what="the old replica to follow")
    assert new.rate == 30


async def test_a_local_app_bucket_before_a_shared_project_bucket(
    replicas: Factory, senders: Senders
) -> None:
    lim = await replicas()
    project = lim.bucket("project:p", 30, margin=0.01)
    clock = senders.clock
    apps = [Bucket(f"app:{i}", 10, burst=2, margin=0.01, clock=clock) for i in range(4)]
    for i, app in enumerate(apps):
        senders.run(f"app{i}", [app, project], 1)
    await run_for(2.2)
    await senders.stop()
    assert max_in_window(senders.all()) <= 30
    for i in range(4):
        assert max_in_window(senders.sends[f"app{i}"]) <= 10
    assert senders.count() >= 0.9 * 30 * 2


async def test_batches_follow_the_pace(replicas: Factory) -> None:
    lim = await replicas(max_batch=16, batch_horizon_s=0.2)
    assert lim.bucket("project:p", 800).batch_size() == 16
    assert lim.bucket("app:a", 20).batch_size() == 4
    assert lim.bucket("app:slow", 1).batch_size() == 1
    with pytest.raises(ValueError, match="grace_s"):
        lim.bucket("app:b", 20, margin=0.01, grace_s=0.05)
    # the Redis key may differ from the name: one channel's limit per project
    a, b = lim.bucket("channel:WA", 20, key="p1:channel:WA"), lim.bucket("channel:WA", 20)
    assert a.key != b.key
    assert a.key.endswith("p1:channel:WA")


async def test_a_refused_login_holds_and_never_shows_the_password(
    redis_server: RedisServer,
) -> None:
    url = f"redis://nobody:s3cret-pw@127.0.0.1:{redis_server.port}/0"
    async with SharedLimiter(url, timeout_s=0.5) as lim:
        ok, reason = lim.readiness()
        assert not ok
        assert reason.startswith("redis unreachable: ")
        assert "s3cret" not in reason
        bucket = lim.bucket("project:p", 100)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(bucket.take(), 0.3)


async def test_stop_ends_even_when_a_redis_call_swallows_the_cancel(
    redis_server: RedisServer,
) -> None:
    """redis-py may turn a cancel that lands on a reply already read into a failed call
    (seen with a refused login under load): the watcher then goes on to its back-off,
    and ``stop()`` must not wait for it for ever."""
    lim = SharedLimiter(redis_server.url, timeout_s=0.5, ping_interval_s=0.01)
    await lim.start()
    assert lim._redis is not None
    entered = asyncio.Event()
    real_time = lim._redis.time

    async def time_swallowing_the_cancel() -> tuple[int, int]:
        if entered.is_set():  # once
            return await real_time()  # type: ignore[no-any-return]
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise RedisConnectionError("Connection closed by server.") from None
        return 0, 0

    lim._redis.time = time_swallowing_the_cancel  # type: ignore[method-assign]
    await asyncio.wait_for(entered.wait(), 5)
    stopping = asyncio.create_task(lim.stop())
    done, _ = await asyncio.wait([stopping], timeout=5)
    assert done, "stop() still waits for the watcher"
    assert lim._watcher is not None
    assert lim._watcher.done()


async def test_a_favoured_caller_does_not_queue_behind_the_crowd(
    replicas: Factory, senders: Senders
) -> None:
    """Two replicas, 80 callers each on a 400/s project: an app the shares give its whole
    rate draws its own slots near the end of the group's timeline instead of waiting its
    turn behind the 160 callers (0.4 s): the crowd does not reserve the timeline ahead."""
    limiters = [await replicas(), await replicas()]
    # the gateway's margin (rate_margin, 2 %): room for the one send a window may gain
    a, b = (lim.bucket("project:p", 400, margin=0.02) for lim in limiters)
    senders.run("crowd a", [a], 80)
    senders.run("crowd b", [b], 80)
    favoured: list[float] = []
    waits: list[float] = []
    clock = senders.clock
    await wait_for(lambda: senders.count() >= 200, 5, what="the crowd sending")
    for _ in range(40):
        t0 = clock()
        await a.take(ahead=0.1)
        favoured.append(clock())
        waits.append(clock() - t0)
    await senders.stop()
    sends = sorted(senders.all() + favoured)
    crowd_wait = 160 / a.pace
    print(f"\nfavoured waits: max {max(waits) * 1000:.0f} ms; the crowd's turn: {crowd_wait:.2f} s")
    assert max(waits) < 0.1 < crowd_wait, waits
    assert max_in_window(sends) <= 400  # its slots are the group's like any other
