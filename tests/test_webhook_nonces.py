"""The webhook's replay cache: bounded by webhook_nonce_cache_size, its fill a gauge;
shared by the replicas through Redis when redis_url is set."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry

from gateway.broker import free_port
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.settings import Secret, Settings, load
from gateway.webhooks import NONCE, SIGNATURE, TIMESTAMP, WebhookReceiver, nonce_redis, sign

SECRET = "nonce-test-secret"
PATH = "/webhooks/sinch"
GAUGE = "gateway_webhook_nonce_cache_entries"
START = 1_700_000_000


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class AcceptingPublisher:
    """Stands in for Kafka: every record is acknowledged at once."""

    def __init__(self) -> None:
        self.records = 0

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes | None = None, headers: Any = None
    ) -> asyncio.Future[None]:
        self.records += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def signed(body: bytes, nonce: str, timestamp: int) -> dict[str, str]:
    ts = str(timestamp)
    return {
        NONCE: nonce,
        TIMESTAMP: ts,
        SIGNATURE: sign(SECRET, body, nonce, ts),
        "Content-Type": "application/json",
    }


BODY = orjson.dumps({"app_id": "app-1", "message": {"id": "m-1"}})


def test_the_default_fits_a_512_mi_pod_and_the_size_must_be_positive() -> None:
    # ~250 bytes per entry (tracemalloc): the default stays around 25 MB
    assert Settings().webhook_nonce_cache_size * 250 <= 32 * 1024 * 1024
    with pytest.raises(ConfigError, match="GATEWAY_WEBHOOK_NONCE_CACHE_SIZE"):
        load(env={"GATEWAY_WEBHOOK_NONCE_CACHE_SIZE": "0"})
    assert load(env={"GATEWAY_WEBHOOK_NONCE_CACHE_SIZE": "7"}).webhook_nonce_cache_size == 7


async def test_the_cache_never_exceeds_its_setting(aiohttp_client: Any) -> None:
    size = 5
    settings = load(env={}, webhook_secret=Secret(SECRET), webhook_nonce_cache_size=size)
    registry = CollectorRegistry()
    clock = Clock(START)
    receiver = WebhookReceiver(settings, Metrics(registry), clock=clock)
    publisher = AcceptingPublisher()
    receiver.attach(publisher)  # type: ignore[arg-type]
    app = web.Application()
    app.router.add_post(PATH, receiver.handle)
    client = await aiohttp_client(app)

    def entries() -> float | None:
        return registry.get_sample_value(GAUGE)

    assert entries() == 0
    seen = []
    for i in range(4 * size):
        resp = await client.post(PATH, data=BODY, headers=signed(BODY, f"n-{i}", START))
        assert resp.status == 200, await resp.text()
        seen.append(entries())
    assert seen == [min(i + 1, size) for i in range(4 * size)]
    assert publisher.records == 4 * size

    # the newest nonces are still refused as replays ...
    resp = await client.post(PATH, data=BODY, headers=signed(BODY, f"n-{4 * size - 1}", START))
    assert resp.status == 401
    assert (await resp.json())["error"]["message"] == "nonce replayed"
    # ... the oldest went first, to keep the bound
    resp = await client.post(PATH, data=BODY, headers=signed(BODY, "n-0", START))
    assert resp.status == 200
    assert entries() == size

    # past their time (twice webhook_max_age_s) entries go at the next callback
    clock.now = START + 2 * settings.webhook_max_age_s + 1
    fresh = int(clock.now)
    resp = await client.post(PATH, data=BODY, headers=signed(BODY, "n-late", fresh))
    assert resp.status == 200
    assert entries() == 1


# -- shared through Redis ------------------------------------------------------


class RefusingPublisher:
    """Stands in for Kafka refusing every record."""

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes | None = None, headers: Any = None
    ) -> asyncio.Future[None]:
        raise KafkaConnectionError("broker unreachable")


@dataclass
class Replica:
    receiver: WebhookReceiver
    client: TestClient[web.Request, web.Application]
    registry: CollectorRegistry

    async def post(self, nonce: str, body: bytes = BODY) -> tuple[int, str]:
        now = int(time.time())
        resp = await self.client.post(PATH, data=body, headers=signed(body, nonce, now))
        doc = await resp.json()
        return resp.status, doc.get("error", {}).get("message", "")

    def counted(self, result: str) -> float:
        value = self.registry.get_sample_value(
            "gateway_webhook_events_total", {"trigger": "MESSAGE_INBOUND", "result": result}
        )
        return value or 0.0


ReplicaFactory = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def replica(aiohttp_client: Any) -> AsyncIterator[ReplicaFactory]:
    """Receivers as replicas would build them; each its own Redis client, closed after."""
    clients: list[aioredis.Redis] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}:nonce:"

    async def make(redis_url: str, publisher: Any = None) -> Replica:
        settings = load(env={}, webhook_secret=Secret(SECRET), redis_url=redis_url)
        redis = nonce_redis(settings)
        assert redis is not None
        clients.append(redis)
        registry = CollectorRegistry()
        receiver = WebhookReceiver(settings, Metrics(registry), redis=redis, nonce_prefix=prefix)
        receiver.attach(publisher or AcceptingPublisher())
        app = web.Application()
        app.router.add_post(PATH, receiver.handle)
        return Replica(receiver, await aiohttp_client(app), registry)

    yield make
    for client in clients:
        await client.aclose()


def test_without_redis_url_there_is_no_shared_cache() -> None:
    assert nonce_redis(load(env={}, webhook_secret=Secret(SECRET))) is None


async def test_a_callback_accepted_by_one_replica_is_refused_as_a_replay_by_another(
    redis_server: Any, replica: ReplicaFactory
) -> None:
    first = await replica(redis_server.url)
    second = await replica(redis_server.url)
    nonce = f"n-{uuid.uuid4().hex}"
    assert await first.post(nonce) == (200, "")
    assert await second.post(nonce) == (401, "nonce replayed")
    assert await first.post(nonce) == (401, "nonce replayed")
    assert second.counted("replayed") == 1
    assert first.counted("replayed") == 1
    # another nonce is new to both
    assert await second.post(f"{nonce}-2") == (200, "")
    assert first.registry.get_sample_value("gateway_webhook_nonce_fallbacks_total") == 0
    # the refused replay is not remembered by the replica that refused it (the holder may
    # still release it), the accepted one is
    assert first.registry.get_sample_value(GAUGE) == 1


async def test_a_callback_not_stored_by_one_replica_is_accepted_when_retried_on_another(
    redis_server: Any, replica: ReplicaFactory
) -> None:
    failing = await replica(redis_server.url, RefusingPublisher())
    other = await replica(redis_server.url)
    nonce = f"n-{uuid.uuid4().hex}"
    assert await failing.post(nonce) == (503, "event not stored; retry later")
    # Sinch retries the 503; the load balancer picks the other replica
    assert await other.post(nonce) == (200, "")
    assert await failing.post(nonce) == (401, "nonce replayed")


async def test_redis_unreachable_the_replica_checks_replays_alone_logs_once_and_counts(
    replica: ReplicaFactory, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    alone = await replica(nowhere)
    with caplog.at_level(logging.WARNING, logger="gateway.webhooks"):
        assert await alone.post("n-1") == (200, "")
        assert await alone.post("n-2") == (200, "")
        assert await alone.post("n-1") == (401, "nonce replayed")
    warnings = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert alone.registry.get_sample_value("gateway_webhook_nonce_fallbacks_total") == 2
    assert "127.0.0.1" not in warnings[0].getMessage()  # no URL (it may hold a password)
