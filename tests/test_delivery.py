"""Delivery against the simulator, with a publisher that Kafka refuses."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from gateway.cli import sample_request
from gateway.dedupe import RecentIds
from gateway.delivery import Delivery
from gateway.envelope import decode
from gateway.lanes import Lane
from gateway.limiter import Bucket
from gateway.metrics import Metrics
from gateway.offsets import PartitionTracker
from gateway.settings import load
from gateway.simulator.server import SIMULATOR_KEY, make_app
from gateway.simulator.settings import SimulatorSettings
from gateway.sinch import SinchClient
from gateway.tokens import BasicAuth


class RefusingPublisher:
    """Kafka never acknowledges: every delivery future fails."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, topic: str, value: bytes | None, **_: Any) -> asyncio.Future[Any]:
        self.sent.append(topic)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_exception(KafkaTimeoutError())
        return fut


async def test_a_send_whose_result_kafka_refuses_is_never_finished(aiohttp_server):
    server = await aiohttp_server(make_app(SimulatorSettings()))
    base = f"http://127.0.0.1:{server.port}"
    settings = load(
        env={},
        project_id="demo-project",
        key_id="demo-key",
        key_secret="demo-secret",
        conversation_url=base + "/{region}",
        auth_url=base + "/oauth2/token",
    )
    loop = asyncio.get_running_loop()
    tracker = PartitionTracker(0)
    finished: list[str] = []
    publisher = RefusingPublisher()
    async with aiohttp.ClientSession() as http:
        delivery = Delivery(
            settings=settings,
            sinch=SinchClient(settings, http),
            tokens=BasicAuth(settings.key_id, settings.key_secret),
            publisher=publisher,  # type: ignore[arg-type]
            metrics=Metrics(CollectorRegistry()),
            sent_ids=RecentIds(10, 60, loop.time),
            clock=loop.time,
            on_finished=lambda r: finished.append(r.request_id),
        )
        req = decode(orjson.dumps(sample_request("a1", 0)), max_bytes=10_000)
        req.offset, req.tracker = 0, tracker
        tracker.add(0)
        lane = Lane("a1", Bucket("app:a1", 20, clock=loop.time))
        await delivery.attempt(req, lane)
    assert server.app[SIMULATOR_KEY].snapshot()["accepted_total"] == 1  # Sinch took it
    assert publisher.sent  # it tried to write the result
    assert finished == []  # so the record is not finished ...
    assert tracker.committable() == 0  # ... and its offset can never be committed
