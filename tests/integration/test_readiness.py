"""/readyz follows the broker: false (and why) while it is gone, true again when it is back."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway import logs
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


async def test_refused_credentials_make_the_token_check_fail_and_show_in_metrics(
    broker, simulator_factory, topics, caplog
):
    caplog.set_level(logging.DEBUG)
    sim = await simulator_factory(key_secret="the-real-secret")
    settings = settings_for(broker.bootstrap, sim.port, topics, key_secret="a-wrong-secret")
    async with running(settings) as gateway, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{gateway.http_port}"

        async def refusal_counted() -> bool:
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            failures = [
                s.value
                for s in families["gateway_token_refreshes"].samples
                if s.name.endswith("_total") and s.labels["result"] == "failure"
            ]
            return failures[0] >= 1

        await wait_for(refusal_counted, 15, what="a failed token refresh in /metrics")
        status, body = await get_json(http, f"{base}/readyz")
        assert status == 503
        assert body["checks"]["token"] == {"ok": False, "detail": "no valid token"}
        assert body["checks"]["kafka"]["ok"] is True
        assert "token: no valid token" in body["reason"]
        assert await gauge(http, f"{base}/metrics", "gateway_token_expires_in_seconds") == -1
        assert await gauge(http, f"{base}/metrics", "gateway_ready") == 0
    lines = [logs.JsonFormatter().format(r) for r in caplog.records]
    assert any("token refresh failed" in line for line in lines)
    basic = base64.b64encode(b"demo-key:a-wrong-secret").decode()
    assert [line for line in lines if "a-wrong-secret" in line or basic in line] == []
