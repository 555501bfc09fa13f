"""Faults: kills, signals, broken input, Sinch errors and a broker that is not there yet."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import aiohttp
import orjson
import pytest

from gateway.app import Gateway
from gateway.broker import EmbeddedBroker, free_port
from gateway.cli import sample_request
from tests.conftest import wait_for
from tests.integration.harness import (
    publish,
    read_records,
    requests_for,
    running,
    settings_for,
    spawn,
)


async def accepted_ids(sim) -> set[str]:
    return {a["correlation_id"] for a in await sim.accepted()}


# Deadlines of the process tests, from their work: a gateway process starts, joins the
# group and takes its partitions within START_S (after a SIGKILL the dead member's 2 s
# session has to run out first); it sends at no less than 1 / SLOW of the configured rate;
# a SIGTERM'd process exits within its shutdown timeout plus EXIT_S.
START_S = 15.0
SLOW = 2.0
EXIT_S = 5.0
SHUTDOWN_S = 5.0
KILL_RATE, KILL_APPS, KILL_DOCS, KILL_IN_FLIGHT = 10, 20, 3000, 64
KILL_AT = (500, 1200, 1900)


def sending_s(count: int, rate: float) -> float:
    """Deadline for ``count`` sends at ``rate``/s, started from a fresh process."""
    return START_S + SLOW * count / rate


KILL_PHASES_S = [
    sending_s(n - before, KILL_RATE * KILL_APPS)
    for before, n in zip((0, *KILL_AT[:-1]), KILL_AT, strict=True)
]
# after the last kill: the rest, and what was finished but not committed (sent again)
KILL_REST_S = sending_s(KILL_DOCS - KILL_AT[-1] + KILL_IN_FLIGHT, KILL_RATE * KILL_APPS)
KILL_TEST_S = sum(KILL_PHASES_S) + len(KILL_AT) * EXIT_S + KILL_REST_S + SHUTDOWN_S + EXIT_S


async def exited(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The process's exit code, waited for off the loop (the simulator runs on it)."""
    return await asyncio.to_thread(proc.wait, timeout)


def reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(EXIT_S)


@pytest.mark.timeout(KILL_TEST_S + 30)  # + broker, publish and simulator reads
async def test_sigkill_three_times_during_a_drain_loses_nothing(
    broker, simulator_factory, topics, tmp_path
):
    sim = await simulator_factory(app_rate=KILL_RATE)
    settings = settings_for(
        broker.bootstrap,
        sim.port,
        topics,
        app_rate=KILL_RATE,
        max_in_flight=KILL_IN_FLIGHT,
        session_timeout_s=2.0,
        shutdown_timeout_s=SHUTDOWN_S,
        http_port=0,
    )
    docs = requests_for([f"k{i}" for i in range(KILL_APPS)], KILL_DOCS)
    wanted = {orjson.loads(v)["request_id"] for _, v in docs}
    await publish(broker.bootstrap, settings.requests_topic, docs)
    log = str(tmp_path / "gateway.log")
    procs: list[subprocess.Popen[bytes]] = []
    took: list[float] = []
    try:
        for threshold, deadline in zip(KILL_AT, KILL_PHASES_S, strict=True):
            procs.append(proc := spawn(settings, log))
            started = time.monotonic()

            async def past(n: int = threshold) -> bool:
                return (await sim.stats())["accepted_total"] >= n

            await wait_for(past, deadline, what=f"{threshold} accepted sends")
            took.append(time.monotonic() - started)
            proc.kill()
            assert await exited(proc, EXIT_S) == -signal.SIGKILL
        procs.append(proc := spawn(settings, log))
        started = time.monotonic()

        async def all_sent() -> bool:
            return await accepted_ids(sim) >= wanted

        await wait_for(all_sent, KILL_REST_S, interval=0.5, what="every request accepted")
        took.append(time.monotonic() - started)
        proc.send_signal(signal.SIGTERM)
        assert await exited(proc, SHUTDOWN_S + EXIT_S) == 0
    finally:
        reap(procs)
    stats = await sim.stats()
    duplicates = stats["duplicates"]["total"]
    print(f"duplicates after 3 SIGKILLs: {duplicates} of {len(wanted)}; phases {took} s")
    assert duplicates <= 3 * settings.max_in_flight


# more work after TERM_AT than the shutdown deadline can send: the restart has some left
TERM_RATE, TERM_APPS, TERM_DOCS, TERM_AT = 10, 8, 1000, 200
assert (TERM_DOCS - TERM_AT) / (TERM_RATE * TERM_APPS) > 1.5 * SHUTDOWN_S
TERM_FIRST_S = sending_s(TERM_AT, TERM_RATE * TERM_APPS)
TERM_REST_S = sending_s(TERM_DOCS - TERM_AT, TERM_RATE * TERM_APPS)
TERM_TEST_S = TERM_FIRST_S + TERM_REST_S + 2 * (SHUTDOWN_S + EXIT_S)


@pytest.mark.timeout(TERM_TEST_S + 30)
async def test_sigterm_mid_drain_exits_0_commits_and_restart_sends_no_duplicates(
    broker, simulator_factory, topics, tmp_path
):
    sim = await simulator_factory(app_rate=TERM_RATE)
    settings = settings_for(
        broker.bootstrap,
        sim.port,
        topics,
        app_rate=TERM_RATE,
        shutdown_timeout_s=SHUTDOWN_S,
        session_timeout_s=2.0,
    )
    docs = requests_for([f"t{i}" for i in range(TERM_APPS)], TERM_DOCS)
    wanted = {orjson.loads(v)["request_id"] for _, v in docs}
    await publish(broker.bootstrap, settings.requests_topic, docs)
    log = str(tmp_path / "gateway.log")
    procs = [spawn(settings, log)]
    try:

        async def some() -> bool:
            return (await sim.stats())["accepted_total"] >= TERM_AT

        await wait_for(some, TERM_FIRST_S, what=f"{TERM_AT} accepted sends")
        started = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        # exits 0 within its shutdown deadline (a TimeoutExpired here fails the test)
        assert await exited(procs[0], SHUTDOWN_S + EXIT_S) == 0
        print(f"SIGTERM to exit: {time.monotonic() - started:.1f} s")
        # the restart has work left: the shutdown handed records back rather than sending all
        assert (await sim.stats())["accepted_total"] < len(wanted)
        procs.append(spawn(settings, log))

        async def rest() -> bool:
            return await accepted_ids(sim) >= wanted

        await wait_for(rest, TERM_REST_S, interval=0.5, what="the rest of the backlog")
        procs[1].send_signal(signal.SIGTERM)
        assert await exited(procs[1], SHUTDOWN_S + EXIT_S) == 0
    finally:
        reap(procs)
    assert (await sim.stats())["duplicates"]["total"] == 0


async def test_injected_5xx_and_a_429_burst_deliver_everything_and_the_rate_adapts(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(strict=True, app_rate=100, project_rate=160, error_rate=0.1)
    settings = settings_for(
        broker.bootstrap,
        sim.port,
        topics,
        app_rate=100,
        project_rate=160,
        backoff_base_s=0.1,
        backoff_max_s=2.0,
    )
    docs = requests_for([f"f{i}" for i in range(4)], 160 * 14)
    wanted = {orjson.loads(v)["request_id"] for _, v in docs}
    async with running(settings) as gw:
        await publish(broker.bootstrap, settings.requests_topic, docs)
        assert gw.lanes is not None
        project = gw.lanes.project_bucket

        async def some() -> bool:
            return (await sim.stats())["accepted_total"] >= 300

        await wait_for(some, 30, what="300 accepted sends")
        full = project.pace
        await sim.post("/_sim/config", {"project_rate": 80})  # Sinch's cap drops to half

        async def slowed() -> bool:
            return project.pace < full * 0.75

        await wait_for(slowed, 10, what="the pace to drop while the cap is halved")
        await sim.post("/_sim/config", {"project_rate": 160})

        async def recovered() -> bool:
            return project.pace >= full * 0.99

        await wait_for(recovered, 30, what="the effective rate to recover")

        async def everything() -> bool:
            return await accepted_ids(sim) >= wanted

        await wait_for(everything, 60, interval=0.5, what="every message delivered")
        results = await read_records(broker.bootstrap, settings.results_topic, len(docs), 30)
    statuses = [orjson.loads(r.value)["status"] for r in results]
    assert statuses.count("sent") == len(docs)
    stats = await sim.stats()
    assert stats["injected_5xx"]["total"] > 0
    assert stats["rejected_429"]["project"] > 0
    # What the gateway sent, retries included (the simulator caps what it accepts itself):
    # no app over its own rate (strict simulator), and the project's busiest second at the
    # simulator within 5 % of the configured rate. The 5 % is arrival jitter: the limiter
    # stamps a send when its slot comes, the request reaches the simulator a task switch
    # later, on the event loop the simulator shares with the gateway here (162 and 164
    # seen); retries that skipped the bucket would add about 10 % (error_rate).
    assert stats["rejected_429"]["app"] == 0
    assert stats["max_received_per_s"]["project"] / 160 <= 1.05, stats["max_received_per_s"]


def malformed(i: int, good: dict) -> bytes:
    kind = i % 8
    if kind == 0:
        return b"{not json " + str(i).encode()
    if kind == 1:
        return orjson.dumps(good)[: 20 + i % 30]  # truncated
    if kind == 2:
        return orjson.dumps({**good, "request_id": i})  # wrong type
    if kind == 3:
        return b'{"request_id": "\xff\xfe", "payload": {}}'  # invalid UTF-8
    if kind == 4:
        return orjson.dumps({**good, "request_id": f"bad-exp-{i}", "expire_at": "not a date"})
    if kind == 5:
        return orjson.dumps({**good, "request_id": f"bad-prio-{i}", "priority": "asap"})
    if kind == 6:
        return orjson.dumps({**good, "request_id": f"no-payload-{i}", "payload": None})
    return orjson.dumps({**good, "request_id": f"big-{i}", "pad": "x" * (2 * 1024 * 1024)})


async def test_a_thousand_malformed_records_go_to_the_dlq_and_good_ones_are_sent(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(app_rate=200)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=200)
    good_docs = requests_for(["m0", "m1", "m2", "m3"], 400)
    template = orjson.loads(good_docs[0][1])
    bad = [malformed(i, template) for i in range(1000)]
    mixed: list[tuple[bytes | None, bytes]] = []
    for i in range(1000):
        mixed.append((b"x", bad[i]))
        if i % 5 == 0:
            mixed.extend(good_docs[i // 5 * 2 : i // 5 * 2 + 2])
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, mixed)
        dlq = await read_records(broker.bootstrap, settings.dlq_topic, 1000, 90)
        results = await read_records(broker.bootstrap, settings.results_topic, len(mixed), 60)
    assert len(dlq) == 1000
    assert all(dict(r.headers).get("gateway.reason") for r in dlq)
    assert sorted(r.value for r in dlq) == sorted(bad)
    statuses = [orjson.loads(r.value)["status"] for r in results]
    assert statuses.count("rejected") == 1000
    assert statuses.count("sent") == len(good_docs)


async def test_broker_down_at_start_then_up_becomes_ready_and_drains(simulator_factory, topics):
    sim = await simulator_factory(app_rate=50)
    port = free_port()
    late = EmbeddedBroker(port=port)
    settings = settings_for(late.bootstrap, sim.port, topics, app_rate=50)
    gateway = Gateway(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await wait_for(lambda: gateway.http_port is not None, 10, what="the admin server")
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{gateway.http_port}/readyz"

            last: list[object] = []

            async def status() -> int:
                async with http.get(url) as resp:
                    last[:] = [await resp.json()]
                    return resp.status

            assert await status() == 503
            async with late:
                await wait_for(gateway.started.wait, 60, what="the gateway to start")

                async def ready() -> bool:
                    return await status() == 200

                try:
                    await wait_for(ready, 30, what="/readyz 200")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}: {last}") from None
                docs = [(b"k", orjson.dumps(sample_request("late", i))) for i in range(50)]
                await publish(late.bootstrap, settings.requests_topic, docs)
                results = await read_records(late.bootstrap, settings.results_topic, 50, 30)
                assert [orjson.loads(r.value)["status"] for r in results] == ["sent"] * 50
                stop.set()
                await asyncio.wait_for(task, 30)
    finally:
        stop.set()
        if not task.done():
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_unknown_app_holds_its_lane_not_the_others_and_gives_up_after_max_retry_time(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(app_rate=50, apps={"known": "us"})
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=50, max_retry_time_s=1.0)
    docs = [sample_request("ghost", i) for i in range(3)] + [
        sample_request("known", i) for i in range(30)
    ]
    async with running(settings) as gw:
        await publish(
            broker.bootstrap, settings.requests_topic, [(b"k", orjson.dumps(d)) for d in docs]
        )
        results = await read_records(broker.bootstrap, settings.results_topic, 33, 30)
        assert gw.lanes is not None
        assert gw.lanes.lanes["ghost"].pause_reason == "404"
    by_status: dict[str, set[str]] = {}
    for r in results:
        doc = orjson.loads(r.value)
        by_status.setdefault(doc["status"], set()).add(doc["app_id"])
    assert by_status == {"sent": {"known"}, "failed": {"ghost"}}
    stats = await sim.stats()
    assert stats["not_found_404"] <= 3 * 2  # held, not hammered


async def test_in_doubt_timeouts_go_to_the_dlq_when_so_configured(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(latency_s=1.0)
    settings = settings_for(
        broker.bootstrap, sim.port, topics, request_timeout_s=0.3, retry_in_doubt=False
    )
    async with running(settings) as gw:
        await publish(
            broker.bootstrap,
            settings.requests_topic,
            [(b"k", orjson.dumps(sample_request("slow", 0)))],
        )
        dlq = await read_records(broker.bootstrap, settings.dlq_topic, 1, 30)
        assert gw.metrics.in_doubt._value.get() == 1
    assert dict(dlq[0].headers)["gateway.reason"] == b"in_doubt"


async def test_refused_credentials_hold_sending_without_dead_letters(
    broker, simulator_factory, topics
):
    sim = await simulator_factory()
    settings = settings_for(
        broker.bootstrap,
        sim.port,
        topics,
        key_secret="wrong-secret",
        backoff_base_s=0.2,
        backoff_max_s=1.0,
    )
    async with running(settings) as gw, aiohttp.ClientSession() as http:
        await publish(
            broker.bootstrap,
            settings.requests_topic,
            [(b"k", orjson.dumps(sample_request("a", i))) for i in range(20)],
        )
        url = f"http://127.0.0.1:{gw.http_port}/readyz"

        async def held() -> bool:
            assert gw.intake is not None
            return gw.intake.buffered == 20

        await wait_for(held, 20, what="the records to be read and held")
        async with http.get(url) as resp:
            body = await resp.json()
            assert resp.status == 503
        assert body["checks"]["token"]["ok"] is False
        token_calls_before = (await sim.stats())["token_requests"]
        span_started = time.monotonic()
        await asyncio.sleep(2.0)  # a span of time: how often the token endpoint is tried in it
        token_calls = (await sim.stats())["token_requests"] - token_calls_before
        span_s = time.monotonic() - span_started
    # backed off: at least half of backoff_max_s between tries once it has failed a few
    # times (it has: the records were held first), not hammered by every waiting sender
    assert token_calls <= span_s / (settings.backoff_max_s / 2) + 1, (token_calls, span_s)
    stats = await sim.stats()
    assert stats["accepted_total"] == 0
    assert await read_records(broker.bootstrap, settings.dlq_topic, 1, 2) == []


async def test_expired_requests_are_not_sent_and_duplicates_are_sent_once(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(app_rate=50)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=50)
    late = {**sample_request("e", 0), "expire_at": "2020-01-01T00:00:00Z"}
    timely = {**sample_request("e", 1), "expire_at": "2999-01-01T00:00:00Z"}
    twice = sample_request("e", 2)
    docs = [late, timely, twice, twice]
    async with running(settings):
        await publish(
            broker.bootstrap, settings.requests_topic, [(b"k", orjson.dumps(d)) for d in docs]
        )
        results = await read_records(broker.bootstrap, settings.results_topic, 3, 30)

        async def counted() -> bool:
            return (await sim.stats())["accepted_total"] >= 2

        await wait_for(counted, 10, what="two accepted sends")
    statuses = {
        orjson.loads(r.value)["request_id"]: orjson.loads(r.value)["status"] for r in results
    }
    assert statuses == {
        late["request_id"]: "expired",
        timely["request_id"]: "sent",
        twice["request_id"]: "sent",
    }
    assert sorted(a["correlation_id"] for a in await sim.accepted()) == sorted(
        [timely["request_id"], twice["request_id"]]
    )
