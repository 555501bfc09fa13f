"""Several replicas in one consumer group, one limiter in Redis: the real broker, the
simulator in strict mode and a real ``redis-server``.

Replicas run in-process (``running``), each with its own admin port, registry, Kafka
clients and Redis client; stopping one is the path SIGTERM takes (the stop event). Every
figure is measured at the simulator: its accepted log (acceptance times, correlation ids)
and its counters (429s, duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from gateway.app import Gateway
from gateway.cli import sample_request
from gateway.envelope import request_id_in
from gateway.settings import Settings
from tests.conftest import Sim, wait_for
from tests.integration.harness import running, settings_for

# Sending starts within this long of a replica's assignment, and the tests' drains last
# several times longer than a rebalance (session_timeout_s 2 s, revoke_timeout_s 5 s).
JOIN_S = 30.0


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def most_in_one_second(times: Sequence[float]) -> int:
    """The largest number of ``times`` inside any window [t, t + 1 s)."""
    times = sorted(times)
    most, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - 1.0:
            lo += 1
        most = max(most, hi - lo + 1)
    return most


def requests_on(
    apps_by_partition: dict[int, list[str]], per_app: int
) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value): ``per_app`` requests of each app, apps interleaved."""
    return [
        (partition, app_id.encode(), orjson.dumps(sample_request(app_id, i)))
        for i in range(per_app)
        for partition, apps in apps_by_partition.items()
        for app_id in apps
    ]


def request_ids(docs: Sequence[tuple[int, bytes, bytes]]) -> set[str]:
    return {orjson.loads(value)["request_id"] for _, _, value in docs}


async def publish_to(bootstrap: str, topic: str, docs: Sequence[tuple[int, bytes, bytes]]) -> None:
    """Each record to the partition it names (not where its key would hash)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for partition, key, value in docs:
            await producer.send(topic, value, key=key, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


def partitions_of(gw: Gateway) -> set[int]:
    """The requests topic's partitions this replica owns now."""
    intake = gw.intake
    if intake is None:
        return set()
    topic = gw.settings.requests_topic
    return {tp.partition for tp in intake.trackers if tp.topic == topic}


def metric_sum(registry: CollectorRegistry, name: str) -> float:
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
    )


async def accepted_ids(sim: Sim) -> set[str]:
    return {request_id_in(a["correlation_id"]) or "" for a in await sim.accepted()}


class Replicas:
    """Gateways of one consumer group, started and stopped one by one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.members: list[tuple[Gateway, contextlib.AsyncExitStack]] = []

    @property
    def gateways(self) -> list[Gateway]:
        return [gw for gw, _ in self.members]

    async def add(self) -> Gateway:
        stack = contextlib.AsyncExitStack()
        gw = await stack.enter_async_context(running(self.settings))
        self.members.append((gw, stack))
        return gw

    async def stop(self, gw: Gateway) -> None:
        """Stop one replica the way SIGTERM does: it returns once it has exited."""
        stack = next(s for g, s in self.members if g is gw)
        self.members = [(g, s) for g, s in self.members if g is not gw]
        await stack.aclose()

    async def close(self) -> None:
        while self.members:
            await self.stop(self.members[-1][0])


@contextlib.asynccontextmanager
async def replicas(settings: Settings) -> AsyncIterator[Replicas]:
    group = Replicas(settings)
    try:
        yield group
    finally:
        await group.close()


async def all_assigned(gateways: Sequence[Gateway], partitions: int) -> None:
    """Every replica owns a share, and the shares cover the topic: the rebalance is over."""

    def done() -> bool:
        owned = [partitions_of(gw) for gw in gateways]
        return all(owned) and sum(len(o) for o in owned) == partitions

    await wait_for(done, JOIN_S, what=f"{len(gateways)} replicas to share {partitions} partitions")


def shared_settings(
    broker: Any, sim: Sim, topics: dict[str, str], redis_url: str, **kw: Any
) -> Settings:
    """One limiter in Redis for the group, under this test's own key prefix."""
    return settings_for(
        broker.bootstrap,
        sim.port,
        topics,
        redis_url=redis_url,
        redis_key_prefix=f"{topics['group_id']}:limiter:",
        http_port=0,
        **kw,
    )


# -- a: one exact cap for three replicas, one of them idle --------------------------------

CAP, APP_RATE, PER_APP = 200, 50, 200
BUSY = {0: [f"a{i}" for i in range(5)], 1: [f"b{i}" for i in range(5)]}  # partition 2 idle


@pytest.mark.timeout(60)
async def test_three_replicas_share_the_project_cap_exactly_while_one_is_idle(
    broker, simulator_factory, topics, redis_server
):
    sim = await simulator_factory(strict=True, project_rate=CAP, app_rate=APP_RATE)
    settings = shared_settings(
        broker, sim, topics, redis_server.url, project_rate=CAP, app_rate=APP_RATE
    )
    docs = requests_on(BUSY, PER_APP)
    wanted = request_ids(docs)
    async with replicas(settings) as group:
        for _ in range(3):
            await group.add()
        await all_assigned(group.gateways, 3)
        idle = [gw for gw in group.gateways if partitions_of(gw) == {2}]
        assert len(idle) == 1
        await publish_to(broker.bootstrap, settings.requests_topic, docs)

        async def drained() -> bool:
            return (await sim.stats())["accepted_total"] >= len(wanted)

        await wait_for(drained, 40, interval=0.25, what=f"{len(wanted)} accepted sends")
        assert metric_sum(idle[0].registry, "gateway_requests_consumed_total") == 0
    accepted = await sim.accepted()
    stats = await sim.stats()
    assert {request_id_in(a["correlation_id"]) for a in accepted} == wanted
    times = sorted(ts(a["accepted_time"]) for a in accepted)
    last: dict[str, float] = {}
    for a in accepted:
        last[a["app_id"]] = max(last.get(a["app_id"], 0.0), ts(a["accepted_time"]))
    # The backlog asks for more than the cap while at least 5 apps have work (5 x 49/s):
    # from the first acceptance until the fifth-last app's last one.
    start, end = times[0], sorted(last.values())[-5]
    used = sum(1 for t in times if start <= t <= end) / ((end - start) * CAP)
    most = most_in_one_second(times)
    per_second = Counter(int(t - start) for t in times)
    print(
        f"3 replicas, one idle: {len(times)} sends, most in 1 s {most} (cap {CAP}), "
        f"cap used {used:.3f} over {end - start:.1f} s, 429s {stats['rejected_429']}; "
        f"per second {[per_second[i] for i in range(max(per_second) + 1)]}"
    )
    assert end - start >= 5.0, (start, end)  # long enough for a rate to mean something
    assert most <= CAP
    # a lone 429 is arrival jitter at the strict window beyond the 2 % margin (three
    # gateways, Redis, the broker and the simulator share two cores here: one run of the
    # suite in five on 2026-12-04); more is a pattern: a limiter that overshoots
    assert stats["rejected_429"]["total"] <= 1, stats["rejected_429"]
    assert used >= 0.95
    assert stats["duplicates"]["total"] == 0


# -- b: a rolling restart of every replica during a drain --------------------------------

# 24 apps (4 per partition) at 20/s ask for more than the cap; 3,840 requests: ~20 s at it
ROLL_APPS_PER_PARTITION, ROLL_PER_APP, ROLL_APP_RATE = 4, 160, 20


# ~35 s; more when the test broker leaves a member's LeaveGroup unanswered (the gateway then
# exits without it after revoke_timeout_s + session_timeout_s, and the group waits for it)
@pytest.mark.timeout(150)
async def test_a_rolling_restart_of_every_replica_sends_nothing_twice_and_loses_nothing(
    broker, simulator_factory, topics, redis_server
):
    sim = await simulator_factory(strict=True, project_rate=CAP, app_rate=ROLL_APP_RATE)
    # 6 partitions: 4 members during each step, every one with at least one partition
    settings = shared_settings(
        broker,
        sim,
        topics,
        redis_server.url,
        project_rate=CAP,
        app_rate=ROLL_APP_RATE,
        topic_partitions=6,
        shutdown_timeout_s=5.0,
    )
    apps = {p: [f"r{p}-{i}" for i in range(ROLL_APPS_PER_PARTITION)] for p in range(6)}
    docs = requests_on(apps, ROLL_PER_APP)
    wanted = request_ids(docs)
    steps: list[str] = []
    wall0 = time.time()
    async with replicas(settings) as group:
        for _ in range(3):
            await group.add()
        await all_assigned(group.gateways, 6)
        await publish_to(broker.bootstrap, settings.requests_topic, docs)

        async def some(n: int) -> None:
            async def past() -> bool:
                return (await sim.stats())["accepted_total"] >= n

            await wait_for(past, JOIN_S, interval=0.1, what=f"{n} accepted sends")

        await some(300)
        for old in list(group.gateways):
            new = await group.add()
            await wait_for(lambda gw=new: bool(partitions_of(gw)), JOIN_S, what="new partitions")
            await group.stop(old)
            await all_assigned(group.gateways, 6)
            done = (await sim.stats())["accepted_total"]
            steps.append(f"{time.time() - wall0:.1f} s: {done}")
            assert done < len(wanted), "the drain ended before the rolling restart did"
            await some(done + 200)  # the new members send before the next step

        async def everything() -> bool:
            return await accepted_ids(sim) >= wanted

        await wait_for(everything, 40, interval=0.5, what="every request accepted")
    stats = await sim.stats()
    dup_ids = set(stats["duplicates"]["ids"][:5])
    twice = [  # which app, and when each copy was accepted (s from the test's start)
        f"{a['app_id']}@{ts(a['accepted_time']) - wall0:.2f}"
        for a in await sim.accepted()
        if request_id_in(a["correlation_id"]) in dup_ids
    ]
    print(
        f"rolling restart of 3 replicas: steps {steps}; {stats['accepted_total']} accepted, "
        f"duplicates {stats['duplicates']['total']} (accepted at {twice}), "
        f"429s {stats['rejected_429']}"
    )
    # None is sent twice. The test broker keeps no commit metadata, so what the last owner
    # finished beyond its commit is found through the group's sent ids in Redis.
    assert stats["duplicates"]["total"] == 0, stats["duplicates"]
    assert await accepted_ids(sim) >= wanted


# -- c: a rebalance while partitions are paused ------------------------------------------

BUDGET = 50
# No slack: the intake never fetches more than the budget has room for. Records read back
# from the spill topic are held to their lane's read-ahead, not to the budget (up to
# apps x lane_min_read_ahead more); with a read-ahead of the whole budget no lane fills
# and nothing is spilled, which the test checks.
SLACK = 0


@pytest.mark.timeout(60)
async def test_a_rebalance_while_paused_keeps_buffered_records_under_the_budget(
    broker, simulator_factory, topics, redis_server
):
    sim = await simulator_factory(strict=True, project_rate=CAP, app_rate=5)
    settings = shared_settings(
        broker,
        sim,
        topics,
        redis_server.url,
        project_rate=CAP,
        app_rate=5,
        max_buffered_records=BUDGET,
        lane_min_read_ahead=BUDGET,
        shutdown_timeout_s=2.0,
    )
    apps = {p: [f"c{p}-{i}" for i in range(2)] for p in range(3)}  # 6 apps at ~4.9/s
    docs = requests_on(apps, 200)
    peaks: dict[int, int] = {}
    over: list[str] = []  # samples above the budget: replica, seconds from the start, value
    samples = 0
    began = time.monotonic()

    async def sample(group: Replicas, stop: asyncio.Event) -> None:
        nonlocal samples
        while not stop.is_set():
            for n, gw in enumerate(group.gateways):
                if gw.intake is not None:
                    value = gw.intake.buffered
                    peaks[id(gw)] = max(peaks.get(id(gw), 0), value)
                    if value > BUDGET + SLACK and len(over) < 10:
                        over.append(f"#{n}@{time.monotonic() - began:.2f}s:{value}")
            samples += 1
            await asyncio.sleep(0.002)

    async with replicas(settings) as group:
        first = await group.add()
        await all_assigned([first], 3)
        await publish_to(broker.bootstrap, settings.requests_topic, docs)
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(group, stop))
        try:
            await wait_for(
                lambda: first.intake is not None and first.intake.paused, 20, what="pause"
            )

            def sent(n: int) -> Callable[[], Awaitable[bool]]:
                async def past() -> bool:
                    return (await sim.stats())["accepted_total"] >= n

                return past

            await wait_for(sent(20), 20, what="20 accepted sends")
            joining = time.monotonic() - began
            second = await group.add()
            await all_assigned([first, second], 3)
            joined = time.monotonic() - began
            at_assign = (await sim.stats())["accepted_total"]
            await wait_for(sent(at_assign + 60), 20, what="60 sends after the rebalance")
            await wait_for(
                lambda: all(gw.intake is not None and gw.intake.paused for gw in (first, second)),
                10,
                what="both replicas paused at their budget",
            )
        finally:
            stop.set()
            await sampler
        first_peak, second_peak = peaks[id(first)], peaks[id(second)]
        spilled = [
            metric_sum(gw.registry, "gateway_spilled_records_total") for gw in group.gateways
        ]
    print(
        f"buffered records, budget {BUDGET}: peaks {first_peak} (first), {second_peak} "
        f"(joined mid-drain) over {samples} samples; second replica started at {joining:.2f} s, "
        f"rebalanced at {joined:.2f} s; above the budget: {over}"
    )
    assert spilled == [0, 0]
    assert first_peak <= BUDGET + SLACK
    assert second_peak <= BUDGET + SLACK
    # the budget was reached on both sides of the rebalance: the bound was exercised
    assert second_peak >= 0.8 * BUDGET


def requests_paused(gw: Gateway) -> bool:
    """The consumer itself holds every requests partition this replica owns paused."""
    intake = gw.intake
    assert intake is not None
    assert intake.consumer is not None
    topic = gw.settings.requests_topic
    owned = {tp for tp in intake.trackers if tp.topic == topic}
    return bool(owned) and owned <= intake.consumer.paused()


@pytest.mark.timeout(60)
async def test_a_replica_still_at_its_budget_when_reassigned_pauses_its_new_partitions(
    broker, simulator_factory, topics, redis_server
):
    # Sends held at the simulator stay in flight past the revoke bound (1 s), so the first
    # replica is still at its budget, paused, when its new assignment arrives: aiokafka
    # resumes what it assigns, and only the intake's re-pause keeps the budget.
    sim = await simulator_factory(strict=True, project_rate=CAP, app_rate=APP_RATE)
    settings = shared_settings(
        broker,
        sim,
        topics,
        redis_server.url,
        project_rate=CAP,
        app_rate=APP_RATE,
        max_buffered_records=BUDGET,
        lane_min_read_ahead=BUDGET,
        revoke_timeout_s=1.0,
        request_timeout_s=30.0,
        shutdown_timeout_s=1.0,
    )
    # one send in flight per app; more records in each partition than the budget, so that
    # whichever replica gets one partition fills its budget from it
    apps = {p: [f"h{p}-{i}" for i in range(20)] for p in range(3)}
    docs = requests_on(apps, 3)
    await sim.post("/_sim/hold", {})
    peaks: dict[int, int] = {}
    stop = asyncio.Event()

    async def sample(group: Replicas) -> None:
        while not stop.is_set():
            for gw in group.gateways:
                if gw.intake is not None:
                    peaks[id(gw)] = max(peaks.get(id(gw), 0), gw.intake.buffered)
            await asyncio.sleep(0.002)

    async with replicas(settings) as group:
        first = await group.add()
        await all_assigned([first], 3)
        await publish_to(broker.bootstrap, settings.requests_topic, docs)
        sampler = asyncio.create_task(sample(group))
        try:
            await wait_for(lambda: requests_paused(first), 20, what="the first replica to pause")
            second = await group.add()
            await all_assigned([first, second], 3)
            assert first.intake is not None
            held_over = first.intake.buffered  # sends held in flight past the revoke bound
            await wait_for(lambda: requests_paused(second), 20, what="the second to pause")
            first_paused = requests_paused(first)
        finally:
            stop.set()
            await sampler
            await sim.post("/_sim/release", {})
        first_peak, second_peak = peaks[id(first)], peaks[id(second)]
        spilled = [
            metric_sum(gw.registry, "gateway_spilled_records_total") for gw in group.gateways
        ]
    print(
        f"reassigned at its budget: {held_over} records buffered by the first replica at its new "
        f"assignment; peaks {first_peak} and {second_peak} (budget {BUDGET}); "
        f"first replica's new partitions paused: {first_paused}"
    )
    assert held_over >= 0.8 * BUDGET  # still paused by the budget when reassigned
    assert spilled == [0, 0]
    assert first_paused
    assert first_peak <= BUDGET + SLACK
    assert second_peak <= BUDGET + SLACK


# -- d: Redis stopped and restarted mid-drain --------------------------------------------

GRACE_S = 0.5  # slots drawn before Redis went away (0.2 s of pace) may still be used


async def readyz(http: aiohttp.ClientSession, gw: Gateway) -> tuple[int, dict[str, Any]]:
    async with http.get(f"http://127.0.0.1:{gw.http_port}/readyz") as resp:
        return resp.status, await resp.json()


@pytest.mark.timeout(60)
async def test_redis_stopped_and_restarted_mid_drain_holds_sending_then_resumes_losing_nothing(
    broker, simulator_factory, topics, redis_server
):
    sim = await simulator_factory(strict=True, project_rate=CAP, app_rate=APP_RATE)
    settings = shared_settings(
        broker, sim, topics, redis_server.url, project_rate=CAP, app_rate=APP_RATE
    )
    docs = requests_on(BUSY, 150)  # 1,500 requests, ~8 s at the cap
    wanted = request_ids(docs)
    async with aiohttp.ClientSession() as http, replicas(settings) as group:
        for _ in range(2):
            await group.add()
        await all_assigned(group.gateways, 3)
        await publish_to(broker.bootstrap, settings.requests_topic, docs)

        async def some() -> bool:
            return (await sim.stats())["accepted_total"] >= 300

        await wait_for(some, 20, what="300 accepted sends")
        stopped_at = time.time()
        try:
            await asyncio.to_thread(redis_server.stop)

            async def held() -> bool:
                answers = [await readyz(http, gw) for gw in group.gateways]
                return all(status == 503 and "redis" in body["reason"] for status, body in answers)

            await wait_for(held, 10, what="/readyz 503 naming redis on both replicas")
            _, body = await readyz(http, group.gateways[0])
            reason = body["reason"]
            # the hold is seen at the simulator: no acceptance for 1.5 s
            seen = [(await sim.stats())["accepted_total"], time.monotonic()]

            async def quiet() -> bool:
                now = (await sim.stats())["accepted_total"]
                if now != seen[0]:
                    seen[:] = [now, time.monotonic()]
                return time.monotonic() - seen[1] >= 1.5

            await wait_for(quiet, 10, interval=0.1, what="1.5 s without an acceptance")
        finally:
            restarted_at = time.time()
            await asyncio.to_thread(redis_server.start)
        held_count = seen[0]

        async def everything() -> bool:
            return await accepted_ids(sim) >= wanted

        await wait_for(everything, 30, interval=0.5, what="every request accepted")

        async def ready() -> bool:
            answers = [await readyz(http, gw) for gw in group.gateways]
            return all(status == 200 for status, _ in answers)

        await wait_for(ready, 10, what="/readyz 200 again")
        dead = sum(metric_sum(gw.registry, "gateway_dlq_records_total") for gw in group.gateways)
    accepted = await sim.accepted()
    stats = await sim.stats()
    during = [
        t
        for t in (ts(a["accepted_time"]) for a in accepted)
        if stopped_at + GRACE_S < t < restarted_at
    ]
    by_time = Counter(math.floor(ts(a["accepted_time"]) - stopped_at) for a in accepted)
    print(
        f"redis down {restarted_at - stopped_at:.1f} s after {held_count} sends: "
        f"{len(during)} acceptances meanwhile, /readyz {reason!r}; then "
        f"{stats['accepted_total']} accepted, {dead:.0f} dead-lettered, 429s "
        f"{stats['rejected_429']['total']}, "
        f"per second from the stop {sorted(by_time.items())}"
    )
    assert during == []
    assert restarted_at - stopped_at >= 1.5
    assert await accepted_ids(sim) >= wanted
    assert dead == 0
    assert stats["duplicates"]["total"] == 0
    assert most_in_one_second([ts(a["accepted_time"]) for a in accepted]) <= CAP
