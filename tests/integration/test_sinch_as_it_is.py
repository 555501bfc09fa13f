"""The gateway against Sinch as it is: the simulator in its default queue mode.

Sinch accepts sends above an app's rate into the app's ingress queue (200, not
429) and drains it at the rate it sells; the gateway must find that rate itself,
follow it when it changes, slow down when the queue grows anyway, and keep to the
field limits (``ttl`` >= 3 s, ``correlation_id`` <= 128) and retry hints
(``google.rpc.RetryInfo``). Times are the simulator's ``accepted_time`` (or, for the
fake upstream, the loop clock at each request); waits are conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.cli import sample_request
from gateway.envelope import MAX_CORRELATION_ID, correlation_for
from gateway.settings import Settings
from tests.conftest import Sim, wait_for
from tests.integration.harness import publish, read_records, running, settings_for

MakeSim = Callable[..., Awaitable[Sim]]


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def backlog(counts: dict[str, int]) -> list[tuple[bytes | None, bytes]]:
    """``counts[app]`` requests per app, interleaved, keyed by app_id."""
    out: list[tuple[bytes | None, bytes]] = []
    left = dict(counts)
    n = 0
    while any(left.values()):
        for app_id in counts:
            if left[app_id]:
                left[app_id] -= 1
                out.append((app_id.encode(), orjson.dumps(sample_request(app_id, n))))
                n += 1
    return out


def accepted_times(accepted: list[dict[str, Any]], app_id: str) -> list[float]:
    return sorted(ts(a["accepted_time"]) for a in accepted if a["app_id"] == app_id)


def most_in_a_second(times: list[float]) -> int:
    """The most of ``times`` (sorted) inside any 1-second window [t, t + 1)."""
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def gauge(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def accepted_count(sim: Sim, app_id: str) -> int:
    return int((await sim.stats())["accepted_by_app"].get(app_id, 0))


# -- rates from Sinch ----------------------------------------------------------------


async def test_rates_it_was_not_told_are_found_and_a_backlog_drains_at_them(
    broker: Any, simulator_factory: MakeSim, topics: dict[str, str]
) -> None:
    rates = {"fast": 100.0, "slow": 10.0}
    counts = {"fast": 1000, "slow": 100}
    sim = await simulator_factory(app_rates=rates)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=20)
    async with running(settings) as gateway:
        await publish(broker.bootstrap, settings.requests_topic, backlog(counts))

        async def drained() -> bool:
            return int((await sim.stats())["accepted_total"]) >= sum(counts.values())

        await wait_for(drained, 60, interval=0.2, what="the backlog drained")
        registry = gateway.registry
        for app_id, rate in rates.items():
            source = gauge(registry, "gateway_app_rate_source", app_id=app_id, source="sinch")
            assert source == 1.0, app_id
            configured = gauge(
                registry, "gateway_rate_limit_configured", scope="app", bucket=app_id
            )
            assert configured == rate, app_id
    stats = await sim.stats()
    accepted = await sim.accepted()
    assert stats["accepted_by_app"] == counts
    assert stats["rejected_429"]["total"] == 0
    assert stats["invalid"]["total"] == 0
    times = {app_id: accepted_times(accepted, app_id) for app_id in counts}
    first = min(t[0] for t in times.values())
    last = max(t[-1] for t in times.values())
    # what the rates allow: the slowest app's backlog at its own rate
    ideal = max((counts[a] - 1) / rates[a] for a in counts)
    efficiency = ideal / (last - first)
    per_app = {a: (counts[a] - 1) / rates[a] / (t[-1] - t[0]) for a, t in times.items()}
    print(
        f"drain {last - first:.2f} s, ideal {ideal:.2f} s, efficiency {efficiency:.3f}, {per_app}"
    )
    assert efficiency >= 0.95, (efficiency, per_app, last - first, ideal)


async def test_a_rate_lowered_on_sinch_is_followed_within_the_refresh_interval(
    broker: Any, simulator_factory: MakeSim, topics: dict[str, str]
) -> None:
    refresh_s = 1.0
    sim = await simulator_factory(app_rates={"fast": 100})
    settings = settings_for(
        broker.bootstrap,
        sim.port,
        topics,
        app_rate=20,
        # an app with a non-empty queue is read every app_queue_refresh_s instead
        app_rate_refresh_s=refresh_s,
        app_queue_refresh_s=refresh_s,
        shutdown_timeout_s=5.0,
    )
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, backlog({"fast": 1200}))

        async def sending_fast() -> bool:
            return await accepted_count(sim, "fast") >= 200

        await wait_for(sending_fast, 30, interval=0.1, what="200 sent at 100/s")
        changed = datetime.now(UTC).timestamp()
        await sim.post("/_sim/config", {"app_rates": {"fast": 20}})
        settled = changed + refresh_s

        async def measured() -> bool:
            return datetime.now(UTC).timestamp() >= settled + 5.0

        await wait_for(measured, 10, interval=0.1, what="5 s at the new rate")
    after = [t for t in accepted_times(await sim.accepted(), "fast") if t >= settled]
    before = [t for t in accepted_times(await sim.accepted(), "fast") if t < changed]
    print(f"most in a second: before {most_in_a_second(before)}, after {most_in_a_second(after)}")
    assert most_in_a_second(before) >= 90  # it was sending at the old rate
    assert len(after) >= 40  # and still sends at the new one (5 s at up to 20/s)
    assert most_in_a_second(after) <= 20 + 1, most_in_a_second(after)
    assert (await sim.stats())["rejected_429"]["total"] == 0


async def test_a_queue_that_grows_slows_the_app_and_stays_bounded(
    broker: Any, simulator_factory: MakeSim, topics: dict[str, str]
) -> None:
    rate, drain = 20.0, 0.5  # Sinch reports 20/s, its queue drains 10/s
    sim = await simulator_factory(app_rates={"q": rate}, drain_factors={"q": drain})
    settings = settings_for(
        broker.bootstrap,
        sim.port,
        topics,
        app_queue_refresh_s=1.0,
        shutdown_timeout_s=5.0,
    )
    sizes: list[int] = []
    async with running(settings) as gateway:
        await publish(broker.bootstrap, settings.requests_topic, backlog({"q": 600}))

        async def watched_15_s() -> bool:
            stats = await sim.stats()
            sizes.append(int(stats["queue_size_by_app"].get("q", 0)))
            first = stats["first_send_time"]
            return first is not None and stats["last_send_time"] - first >= 15.0

        await wait_for(watched_15_s, 45, interval=0.2, what="15 s of sending")
        pace = gauge(gateway.registry, "gateway_rate_limit_effective", scope="app", bucket="q")
    times = accepted_times(await sim.accepted(), "q")
    last_7_s = [t for t in times if t >= times[-1] - 7.0]
    print(f"queue max {max(sizes)}, last 7 s {len(last_7_s) / 7.0:.1f}/s, pace {pace}")
    # the queue never held more than 3 s of the app's rate ...
    assert max(sizes) <= 3 * rate, (max(sizes), sizes)
    # ... because the app was slowed below the rate Sinch reports: in the last 7 s it
    # sent about what the queue drains (10/s), not 20/s
    assert len(last_7_s) / 7.0 <= 0.75 * rate, len(last_7_s)
    assert len(last_7_s) / 7.0 >= 0.4 * rate * drain, len(last_7_s)  # and kept sending
    assert pace is not None
    assert pace < 0.75 * rate, pace


# -- field limits and retry hints ------------------------------------------------------


async def test_a_short_expiry_and_a_long_request_id_give_valid_requests(
    broker: Any, simulator_factory: MakeSim, topics: dict[str, str]
) -> None:
    sim = await simulator_factory()
    settings = settings_for(broker.bootstrap, sim.port, topics)
    short = sample_request("limits", 0)
    long = sample_request("limits", 1)
    long["request_id"] = "L" * 170 + uuid.uuid4().hex[:30]
    assert len(long["request_id"]) == 200
    async with running(settings):
        short["expire_at"] = rfc3339(datetime.now(UTC).timestamp() + 2.5)
        docs = [(b"limits", orjson.dumps(short)), (b"limits", orjson.dumps(long))]
        await publish(broker.bootstrap, settings.requests_topic, docs)
        results = await read_records(broker.bootstrap, settings.results_topic, 2, timeout_s=30)
    by_id = {r["request_id"]: r for r in (orjson.loads(x.value) for x in results)}
    assert by_id[short["request_id"]]["status"] == "sent", by_id[short["request_id"]]
    assert by_id[long["request_id"]]["status"] == "sent", by_id[long["request_id"]]
    stats = await sim.stats()
    assert stats["invalid"]["total"] == 0, stats["invalid"]
    assert stats["bad_request_400"] == 0
    correlations = {a["correlation_id"] for a in await sim.accepted()}
    digest = correlation_for(long["request_id"], None)
    assert len(digest) <= MAX_CORRELATION_ID
    assert correlations == {short["request_id"], digest}


def _retry_info_upstream(
    delay: str, sends: list[float]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A send endpoint that answers 429 with only a RetryInfo hint, then 200."""

    async def send(request: web.Request) -> web.Response:
        sends.append(asyncio.get_running_loop().time())
        await request.read()
        if len(sends) == 1:
            hint = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
            error = {
                "code": 429,
                "message": "Too many requests",
                "status": "RESOURCE_EXHAUSTED",
                "details": [hint],
            }
            return web.json_response({"error": error}, status=429)  # no Retry-After
        return web.json_response(
            {"accepted_time": rfc3339(datetime.now(UTC).timestamp()), "message_id": "m-1"}
        )

    return send


async def _token(request: web.Request) -> web.Response:
    return web.json_response({"access_token": "t-1", "expires_in": 3600, "token_type": "bearer"})


async def test_a_retry_info_delay_is_honoured(
    broker: Any, aiohttp_server: Any, topics: dict[str, str]
) -> None:
    sends: list[float] = []
    app = web.Application()
    app.router.add_post("/oauth2/token", _token)
    app.router.add_post(
        "/{region}/v1/projects/{project}/messages:send", _retry_info_upstream("1.5s", sends)
    )
    server = await aiohttp_server(app, host="127.0.0.1")
    settings: Settings = settings_for(
        broker.bootstrap,
        server.port,
        topics,
        app_rates_from_sinch=False,
        backoff_base_s=0.1,  # a back-off alone would retry within 0.1 s
        backoff_max_s=5.0,
    )
    doc = sample_request("hinted", 0)
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, [(b"hinted", orjson.dumps(doc))])
        results = await read_records(broker.bootstrap, settings.results_topic, 1, timeout_s=30)
    result = orjson.loads(results[0].value)
    assert (result["status"], result["attempts"]) == ("sent", 2), result
    assert len(sends) == 2
    gap = sends[1] - sends[0]
    print(f"retry {gap:.3f} s after the 429")
    assert 1.5 <= gap < 1.5 + 1.0, gap
