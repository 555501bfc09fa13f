"""/readyz follows the broker: false (and why) while it is gone, true again when it is back."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.broker import EmbeddedBroker
from tests.conftest import wait_for
from tests.integration.harness import running, settings_for


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def gauge(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url) as resp:
        text = await resp.text()
    family = next(f for f in text_string_to_metric_families(text) if f.name == name)
    return float(family.samples[0].value)


async def test_readyz_goes_false_without_the_broker_and_true_when_it_is_back(
    simulator_factory, topics
):
    sim = await simulator_factory()
    broker = EmbeddedBroker()
    await broker.__aenter__()
    try:
        settings = settings_for(broker.bootstrap, sim.port, topics)
        async with running(settings) as gateway, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{gateway.http_port}"
            last: dict[str, Any] = {}

            async def ready_is(expected: bool) -> bool:
                status, body = await get_json(http, f"{base}/readyz")
                last.update(status=status, body=body)
                return body["ready"] is expected and status == (200 if expected else 503)

            async def wait_ready(expected: bool, what: str) -> None:
                try:
                    await wait_for(lambda: ready_is(expected), 20, what=what)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; last /readyz: {last}") from None

            await wait_ready(True, "ready with the broker up")
            assert last["body"]["checks"]["kafka"] == {"ok": True, "detail": "connected"}
            assert await gauge(http, f"{base}/metrics", "gateway_ready") == 1

            await asyncio.to_thread(broker.stop)
            await wait_ready(False, "not ready without the broker")
            body = last["body"]
            assert body["checks"]["kafka"]["ok"] is False
            assert body["checks"]["kafka"]["detail"] == (
                f"no connection to any Kafka broker ({broker.bootstrap})"
            )
            assert body["reason"].startswith("kafka: no connection to any Kafka broker")
            assert body["checks"]["token"]["ok"] is True  # only Kafka is blamed
            assert await gauge(http, f"{base}/metrics", "gateway_ready") == 0
            status, alive = await get_json(http, f"{base}/healthz")
            assert (status, alive["status"]) == (200, "ok")  # alive, just not ready

            await asyncio.to_thread(broker.start)  # same port; Tansu starts empty
            await wait_ready(True, "ready again with the broker back")
            assert last["body"]["reason"] == "all checks pass"
            assert await gauge(http, f"{base}/metrics", "gateway_ready") == 1
    finally:
        await broker.__aexit__(None, None, None)
