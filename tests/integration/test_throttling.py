"""Lanes, hierarchical buckets, back-pressure and offsets on the real broker."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

import orjson
import pytest
from aiokafka import TopicPartition

from gateway.cli import sample_request
from gateway.settings import AppSettings
from tests.conftest import wait_for
from tests.integration.harness import (
    committed_total,
    publish,
    read_records,
    running,
    settings_for,
)


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def one_partition(docs: list[dict]) -> list[tuple[bytes, bytes]]:
    """Same key for all: every record lands in one partition, behind each other."""
    return [(b"same-partition", orjson.dumps(d)) for d in docs]


async def test_a_throttled_app_does_not_delay_other_apps(broker, simulator_factory, topics):
    sim = await simulator_factory(strict=True, app_rate=50, app_rates={"slow": 2})
    settings = settings_for(
        broker.bootstrap, sim.port, topics, app_rate=50, apps={"slow": AppSettings(rate=2)}
    )
    docs = [sample_request("slow", i) for i in range(50)]  # first in the partition
    docs += [sample_request(f"fast-{i % 10}", i) for i in range(500)]
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, one_partition(docs))

        async def fast_done() -> bool:
            stats = await sim.stats()
            by_app = stats["accepted_by_app"]
            return sum(n for a, n in by_app.items() if a.startswith("fast")) == 500

        await wait_for(fast_done, 30, what="the 500 fast messages")
        accepted = await sim.accepted()
    by_app = [(a["app_id"], ts(a["accepted_time"])) for a in accepted]
    fast = sorted(t for app, t in by_app if app.startswith("fast"))
    slow = [t for app, t in by_app if app == "slow" and t <= fast[-1]]
    first = min(t for _, t in by_app)
    # Simulator times, from the first send of all (the slow app's records are read first).
    # Behind the slow app's 50 at 2/s the fast apps would finish after slow_s; in their own
    # lanes (50 each at 50/s) in about 1 s.
    slow_s = 50 / 2
    fast_done_s = fast[-1] - first
    assert fast_done_s / slow_s < 0.25, (fast_done_s, slow_s)
    # meanwhile the slow app kept its own pace (2/s plus a burst) and still had a backlog
    assert len(slow) <= 2 * fast_done_s + 3, (len(slow), fast_done_s)
    assert len(slow) < 50
    stats = await sim.stats()
    assert stats["rejected_429"]["total"] == 0


@pytest.mark.parametrize("limiter", ["local", "redis"])
async def test_busy_apps_share_the_project_cap_fairly_and_the_longest_drain_goes_first(
    broker, simulator_factory, topics, request, limiter
):
    # 10 apps of 38/s under a 200/s project: the fair share is 20/s; each app gets at least
    # 90 % of it (18/s), and the rest (20/s) goes to app-0, whose backlog is 4x the others':
    # 18 + 20 = 38/s, its own rate. With the group's limiter in Redis there are no ceilings
    # (a replica sees only its own apps): app-0 draws its own project slots, the others
    # share the rest in turn
    sim = await simulator_factory(strict=True, app_rate=38, project_rate=200)
    extra = {}
    if limiter == "redis":  # under this test's own keys
        extra["redis_url"] = request.getfixturevalue("redis_server").url
        extra["redis_key_prefix"] = f"{topics['group_id']}:limiter:"
    settings = settings_for(
        broker.bootstrap, sim.port, topics, app_rate=38, project_rate=200, **extra
    )
    docs = [sample_request("app-0", i) for i in range(600)]
    docs += [sample_request(f"app-{1 + i % 9}", i) for i in range(9 * 150)]
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, one_partition(docs))

        async def enough() -> bool:
            return (await sim.stats())["accepted_total"] >= 1400

        await wait_for(enough, 40, what="1,400 accepted sends")
        accepted = await sim.accepted()
    times = sorted((ts(a["accepted_time"]), a["app_id"]) for a in accepted)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for t, app in times:
        first.setdefault(app, t)
        last[app] = t
    assert len(first) == 10
    # Simulator times while every app had work: after the last app's first send (and a
    # second for the shares to settle), up to the first app's last send.
    start, end = max(first.values()) + 1.0, min(last.values())
    window = Counter(app for t, app in times if start <= t <= end)
    assert len(window) == 10
    assert end - start >= 4.0, (start, end)  # long enough for rates to mean something
    pace = 1 - settings.rate_margin
    rates = {app: n / (end - start) for app, n in window.items()}
    fair = 200 / 10
    for app, rate in rates.items():
        assert rate >= 0.9 * fair * pace * 0.95, (app, rate, rates)  # 5 % for measurement
    assert rates["app-0"] >= 0.95 * 38 * pace, rates  # the longest drain: at its own rate
    rejected = (await sim.stats())["rejected_429"]
    assert rejected["total"] == 0, rejected


async def test_committed_offset_never_passes_an_unfinished_record(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(app_rate=200)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=200, topic_partitions=1)
    await sim.post("/_sim/hold", {"app_id": "held"})
    docs = [sample_request("free", i) for i in range(20)]
    docs += [sample_request("held", 0)]  # offset 20
    docs += [sample_request("free", i) for i in range(20, 100)]
    async with running(settings) as gw:
        await publish(broker.bootstrap, settings.requests_topic, one_partition(docs))

        async def free_done() -> bool:
            return (await sim.stats())["accepted_by_app"].get("free", 0) == 100

        await wait_for(free_done, 30, what="the free app's sends")
        assert gw.intake is not None
        tracker = gw.intake.trackers[TopicPartition(settings.requests_topic, 0)]
        await wait_for(lambda: tracker.committed == 20, 10, what="commit up to the held record")
        await gw.intake.commit()
        assert tracker.committed == 20  # not past the held record, though 80 after it are done
        await sim.post("/_sim/release")
        await wait_for(lambda: tracker.committed == 101, 10, what="commit of everything")
    assert (
        await committed_total(broker.bootstrap, settings.requests_topic, settings.group_id, 1)
        == 101
    )


async def test_backpressure_keeps_buffered_records_under_the_budget(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(app_rate=400, project_rate=800)
    budget = 50
    settings = settings_for(
        broker.bootstrap, sim.port, topics, app_rate=400, max_buffered_records=budget
    )
    docs = [sample_request(f"app-{i % 4}", i) for i in range(1500)]
    peak = 0
    paused_seen = False
    async with running(settings) as gw:
        await publish(broker.bootstrap, settings.requests_topic, one_partition(docs))
        assert gw.intake is not None
        intake = gw.intake

        async def sample() -> bool:
            nonlocal peak, paused_seen
            peak = max(peak, intake.buffered)
            paused_seen = paused_seen or intake.paused
            return (await sim.stats())["accepted_total"] >= 1500

        await wait_for(sample, 60, interval=0.005, what="the whole drain")
    assert 0 < peak <= budget
    assert paused_seen


async def test_priority_high_before_normal_before_low_within_a_lane(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(app_rate=5)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=5)
    docs = [
        sample_request("p", i, priority=p)
        for i, p in enumerate(["low"] * 3 + ["normal"] * 3 + ["high"] * 3)
    ]
    expected = [d["request_id"] for d in docs[6:] + docs[3:6] + docs[:3]]
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, one_partition(docs))
        results = await read_records(broker.bootstrap, settings.results_topic, 9, 30)
    assert len(results) == 9
    accepted = await sim.accepted()
    order = [a["correlation_id"] for a in sorted(accepted, key=lambda a: a["accepted_time"])]
    # the first record may already be on its way before the rest arrive; the others keep order
    assert order[1:] == [r for r in expected if r != order[0]]


async def test_two_replicas_share_the_project_cap_by_partitions(broker, simulator_factory, topics):
    sim = await simulator_factory(strict=True, app_rate=100, project_rate=100)
    settings = settings_for(
        broker.bootstrap, sim.port, topics, app_rate=100, project_rate=100, topic_partitions=2
    )
    docs = [sample_request(f"r{i % 8}", i) for i in range(600)]
    async with running(settings) as first, running(settings) as second:
        assert first.lanes is not None
        assert second.lanes is not None
        one, two = first.lanes.project_bucket, second.lanes.project_bucket

        def halves() -> bool:
            return one.rate == two.rate == 50

        await wait_for(halves, 30, what="each replica to own one of the two partitions")
        await publish(
            broker.bootstrap,
            settings.requests_topic,
            [(str(i).encode(), orjson.dumps(d)) for i, d in enumerate(docs)],
        )

        async def drained() -> bool:
            return (await sim.stats())["accepted_total"] >= 600

        await wait_for(drained, 60, what="the backlog drained by both replicas")
    stats = await sim.stats()
    assert stats["rejected_429"]["total"] == 0
    # what the two sent together (the simulator caps what it accepts, not what it receives)
    assert stats["max_received_per_s"]["project"] <= 100
    # and together they used the cap: the drain's rate (simulator clock) over the 100/s
    drain_s = stats["last_send_time"] - stats["first_send_time"]
    assert 600 / drain_s / 100 >= 0.6, drain_s


async def test_a_channel_bucket_caps_every_app_on_that_channel(broker, simulator_factory, topics):
    sim = await simulator_factory(app_rate=100)
    settings = settings_for(
        broker.bootstrap, sim.port, topics, app_rate=100, channel_rates={"SMS": 10.0}
    )
    docs = [sample_request(f"c{i % 3}", i) for i in range(30)]  # all SMS, three apps
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, one_partition(docs))

        async def all_sent() -> bool:
            return (await sim.stats())["accepted_total"] >= 30

        await wait_for(all_sent, 30, what="the 30 SMS")
    times = sorted(ts(a["accepted_time"]) for a in await sim.accepted())
    in_any_second = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert in_any_second <= 10  # the three apps together, not 3 x 100/s
    assert times[-1] - times[0] >= 2.5  # 30 at 10/s


async def test_the_longest_drain_keeps_its_rate_beside_a_crowd_of_apps(
    broker, simulator_factory, topics
):
    # 60 apps of 20/s under a 400/s project, 20 requests each, and app-hot with 120: the
    # shares give app-hot (the longest drain) its whole rate. The crowd queues 60 lanes for
    # the project's slots (0.15 s): app-hot must go ahead of all of them, not only 0.1 s
    sim = await simulator_factory(strict=True, app_rate=20, project_rate=400)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=20, project_rate=400)
    docs = [sample_request(f"app-{i:02d}", n) for n in range(20) for i in range(60)]
    docs[::10] = [sample_request("app-hot", n) for n in range(len(docs[::10]))]
    async with running(settings):
        await publish(
            broker.bootstrap,
            settings.requests_topic,
            [(d["payload"]["app_id"].encode(), orjson.dumps(d)) for d in docs],
        )

        async def crowd_done() -> bool:
            stats = await sim.stats()
            return stats["accepted_total"] >= len(docs) - 60  # app-hot's last ones may wait

        await wait_for(crowd_done, 40, what="the crowd sent")
        accepted = await sim.accepted()
    times = sorted((ts(a["accepted_time"]), a["app_id"]) for a in accepted)
    hot = [t for t, app in times if app == "app-hot"]
    crowd_end = max(t for t, app in times if app != "app-hot")
    during = [t for t in hot if t <= crowd_end]
    assert crowd_end - hot[0] >= 1.5, (hot[0], crowd_end)  # the crowd kept the cap busy
    rate = (len(during) - 1) / (during[-1] - hot[0])
    pace = 20 * (1 - settings.rate_margin)
    assert rate >= 0.9 * pace, (rate, len(during))
    rejected = (await sim.stats())["rejected_429"]
    assert rejected["total"] == 0, rejected
