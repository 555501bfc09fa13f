"""gateway/admin.py: /healthz, /readyz (with reasons) and /metrics on a real aiohttp server."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.admin import Health, make_admin_app
from gateway.metrics import Metrics

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


class Switch:
    """A readiness check whose answer the test flips."""

    def __init__(self, ok: bool, detail: str) -> None:
        self.ok = ok
        self.detail = detail

    def __call__(self) -> tuple[bool, str]:
        return self.ok, self.detail


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def test_healthz_answers_with_version_and_uptime(
    aiohttp_client: ClientFactory, metrics: Metrics
) -> None:
    health = Health({"kafka": Switch(False, "down")})
    client = await aiohttp_client(make_admin_app(metrics.registry, health))
    resp = await client.get("/healthz")
    assert resp.status == 200  # alive even when not ready
    body = await resp.json()
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["uptime_s"] >= 0


async def test_readyz_is_200_only_when_every_check_passes_and_says_why_not(
    aiohttp_client: ClientFactory, metrics: Metrics
) -> None:
    kafka = Switch(True, "connected")
    token = Switch(True, "valid")
    client = await aiohttp_client(
        make_admin_app(metrics.registry, Health({"kafka": kafka, "token": token}))
    )
    resp = await client.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body == {
        "ready": True,
        "reason": "all checks pass",
        "checks": {
            "kafka": {"ok": True, "detail": "connected"},
            "token": {"ok": True, "detail": "valid"},
        },
    }

    kafka.ok, kafka.detail = False, "no connection to any Kafka broker (127.0.0.1:1)"
    token.ok, token.detail = False, "no valid token"
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["ready"] is False
    assert body["reason"] == (
        "kafka: no connection to any Kafka broker (127.0.0.1:1); token: no valid token"
    )
    assert body["checks"]["kafka"] == {"ok": False, "detail": kafka.detail}

    kafka.ok = token.ok = True
    assert (await client.get("/readyz")).status == 200


async def test_a_check_that_raises_means_not_ready_not_a_server_error(
    aiohttp_client: ClientFactory, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    health = Health({"kafka": Switch(True, "connected"), "token": broken})
    client = await aiohttp_client(make_admin_app(metrics.registry, health))
    with caplog.at_level(logging.ERROR, logger="gateway.admin"):
        resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["checks"]["token"] == {"ok": False, "detail": "check failed: RuntimeError"}
    assert body["checks"]["kafka"]["ok"] is True
    assert any("readiness check token failed" in r.getMessage() for r in caplog.records)
    assert health.ready() is False


async def test_metrics_serves_the_injected_registry_in_text_format(
    aiohttp_client: ClientFactory, metrics: Metrics
) -> None:
    metrics.consumed.inc(5)
    metrics.ready.set(1)
    client = await aiohttp_client(make_admin_app(metrics.registry, Health({})))
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert "version=0.0.4" in resp.headers["Content-Type"]
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    assert families["gateway_requests_consumed"].samples[0].value == 5
    assert families["gateway_ready"].samples[0].value == 1
