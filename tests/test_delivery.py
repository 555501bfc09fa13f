"""Delivery through lanes to the simulator, with outcomes written by a scripted publisher.

Each refusal is held at the scope that caused it: a record's own wrong route
fails that record alone; a refused project holds all sending and resumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.cli import sample_request
from gateway.dedupe import RecentIds
from gateway.delivery import Delivery
from gateway.envelope import Request, decode
from gateway.lanes import Lanes
from gateway.limiter import Bucket
from gateway.metrics import Metrics
from gateway.offsets import Origin, PartitionTracker
from gateway.outcomes import Ending, Outcomes
from gateway.settings import AppSettings, Settings, load
from gateway.simulator.server import SIMULATOR_KEY, make_app
from gateway.simulator.settings import SimulatorSettings, patch
from gateway.sinch import SinchClient
from gateway.tokens import BasicAuth
from tests.conftest import wait_for
from tests.fakes import ScriptedPublisher

RESULTS = "sinch.outbound.results"
DLQ = "sinch.outbound.dlq"


@dataclass
class Pipe:
    settings: Settings
    sim: Any
    publisher: ScriptedPublisher
    outcomes: Outcomes
    delivery: Delivery
    lanes: Lanes
    tracker: PartitionTracker
    finished: list[int]

    def put(self, app_id: str, **envelope: Any) -> Request:
        doc = sample_request(app_id, len(self.finished)) | envelope
        value = orjson.dumps(doc)
        req = decode(value, max_bytes=100_000)
        offset = self.tracker.next_read or 0
        self.tracker.add(offset)
        req.origin = Origin(self.tracker, offset, key=app_id.encode(), value=value)
        req.received_at = asyncio.get_running_loop().time()
        self.lanes.put(req)
        return req

    def results(self) -> dict[str, dict[str, Any]]:
        docs = (orjson.loads(v or b"") for v, _k, _h in self.publisher.on(RESULTS))
        return {d["request_id"]: d for d in docs}

    def accepted(self) -> int:
        return int(self.sim.app[SIMULATOR_KEY].snapshot()["accepted_total"])


@pytest.fixture
async def make_pipe(aiohttp_server: Any) -> AsyncIterator[Callable[..., Awaitable[Pipe]]]:
    made: list[tuple[Lanes, aiohttp.ClientSession]] = []

    async def make(sim: dict[str, Any] | None = None, **kw: Any) -> Pipe:
        server = await aiohttp_server(make_app(SimulatorSettings(**(sim or {}))))
        base = f"http://127.0.0.1:{server.port}"
        settings = load(
            env={},
            **{
                "project_id": "demo-project",
                "key_id": "demo-key",
                "key_secret": "demo-secret",
                "conversation_url": base + "/{region}",
                "auth_url": base + "/oauth2/token",
                "backoff_base_s": 0.01,
                "backoff_max_s": 0.3,
            }
            | kw,
        )
        loop = asyncio.get_running_loop()
        tracker = PartitionTracker(0)
        finished: list[int] = []

        def release(ending: Ending, done: bool) -> None:
            if done:
                tracker.done(ending.origin.offset)
                finished.append(ending.origin.offset)

        metrics = Metrics(CollectorRegistry())
        publisher = ScriptedPublisher()
        outcomes = Outcomes(
            settings=settings,
            publisher=publisher,
            metrics=metrics,
            sent_ids=RecentIds(1000, 3600, loop.time),
            clock=loop.time,
            release=release,
        )
        http = aiohttp.ClientSession()
        delivery = Delivery(
            settings=settings,
            sinch=SinchClient(settings, http),
            tokens=BasicAuth(settings.key_id, settings.key_secret),
            outcomes=outcomes,
            metrics=metrics,
            clock=loop.time,
        )
        lanes = Lanes(
            project_bucket=Bucket("project", 500, clock=loop.time),
            make_app_bucket=lambda app, _project: Bucket(f"app:{app}", 200, clock=loop.time),
            channel_buckets={},
            max_in_flight=20,
            sender=delivery.attempt,
            clock=loop.time,
            on_expired=delivery.expire,
            gate=delivery.gate,
            ready=delivery.ready,  # as the gateway wires them
        )
        made.append((lanes, http))
        return Pipe(settings, server, publisher, outcomes, delivery, lanes, tracker, finished)

    yield make
    for lanes, http in made:
        await lanes.close()
        await http.close()


async def test_a_result_kafka_refuses_keeps_the_record_unfinished_until_written(
    make_pipe: Callable[..., Awaitable[Pipe]],
) -> None:
    pipe = await make_pipe({"basic_auth_rate": 1000})
    pipe.publisher.refuse = lambda topic, _v: "fail" if topic == RESULTS else "ack"
    pipe.put("a1")
    await wait_for(lambda: pipe.outcomes.failing() == 1, 5, what="the result write to fail")
    assert pipe.accepted() == 1  # Sinch took it
    assert pipe.finished == []
    assert pipe.tracker.committable() == 0
    pipe.publisher.refuse = lambda topic, _v: "ack"
    await wait_for(lambda: pipe.finished == [0], 5, what="the result to be written")
    assert pipe.tracker.committable() == 1
    assert pipe.accepted() == 1  # written, not sent again


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [({"region": "us"}, "wrong_region"), ({"project_id": "someone-elses"}, "wrong_project")],
)
async def test_a_record_with_its_own_wrong_route_fails_alone(
    make_pipe: Callable[..., Awaitable[Pipe]], envelope: dict[str, Any], reason: str
) -> None:
    pipe = await make_pipe(
        {"apps": {"a1": "eu"}, "basic_auth_rate": 1000}, apps={"a1": AppSettings(region="eu")}
    )
    bad = pipe.put("a1", **envelope)
    good = [pipe.put("a1") for _ in range(5)]
    await wait_for(lambda: len(pipe.finished) == 6, 10, what="all six to end")
    results = pipe.results()
    assert results[bad.request_id]["status"] == "failed"
    assert all(results[r.request_id]["status"] == "sent" for r in good)
    ((_, _, headers),) = pipe.publisher.on(DLQ)
    assert dict(headers)["gateway.reason"] == reason.encode()
    assert pipe.lanes.lanes["a1"].paused_until == 0.0  # the app was never held
    assert pipe.delivery.held() is None


async def test_a_refused_project_holds_all_sending_then_resumes(
    make_pipe: Callable[..., Awaitable[Pipe]],
) -> None:
    pipe = await make_pipe({"project_forbidden": True, "basic_auth_rate": 1000})
    reqs = [pipe.put(f"a{i % 3}") for i in range(6)]
    await wait_for(
        lambda: pipe.delivery.held() == "project_refused", 5, what="the project to be held"
    )
    assert pipe.publisher.on(DLQ) == []  # nothing dead-lettered for it
    assert pipe.finished == []
    sim = pipe.sim.app[SIMULATOR_KEY]
    # while held, a lane sends only when a hold (backoff_max_s, 0.3 s) ends: one try per
    # lane per hold, not one per slot of its buckets (200/s each)
    loop = asyncio.get_running_loop()
    received, start = sim.snapshot()["received_total"], loop.time()
    await wait_for(lambda: loop.time() - start >= 1.0, 3, interval=0.05, what="a second")
    assert sim.snapshot()["received_total"] - received <= 30
    sim.settings = patch(sim.settings, {"project_forbidden": False})
    await wait_for(lambda: len(pipe.finished) == 6, 10, what="sending to resume")
    results = pipe.results()
    assert all(results[r.request_id]["status"] == "sent" for r in reqs)
    assert pipe.publisher.on(DLQ) == []


async def test_an_unexpected_error_in_a_send_retries_the_request(
    make_pipe: Callable[..., Awaitable[Pipe]],
) -> None:
    pipe = await make_pipe({"basic_auth_rate": 1000})
    calls = {"n": 0}
    real_body = Request.body

    def flaky_body(self: Request, now: float) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_body(self, now)

    Request.body = flaky_body  # type: ignore[method-assign]
    try:
        req = pipe.put("a1")
        await wait_for(lambda: pipe.finished == [0], 10, what="the request to be sent")
    finally:
        Request.body = real_body  # type: ignore[method-assign]
    assert pipe.results()[req.request_id]["status"] == "sent"
    assert pipe.results()[req.request_id]["attempts"] == 2
