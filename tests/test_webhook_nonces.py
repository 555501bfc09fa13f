"""The webhook's replay cache: bounded by webhook_nonce_cache_size, its fill a gauge."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.settings import Secret, Settings, load
from gateway.webhooks import NONCE, SIGNATURE, TIMESTAMP, WebhookReceiver, sign

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
