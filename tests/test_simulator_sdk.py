"""The official ``sinch`` SDK, a real client of the Conversation API, against the simulator.

The SDK is synchronous (requests), so it runs in a worker thread via
``asyncio.to_thread`` while the simulator serves on a real port in the test's loop.
It reads the App resource (``conversation.apps.get``: ``rate_limits``,
``queue_stats``), sends, and verifies and parses the simulator's DISPATCH-mode
callbacks with its own Sinch Events handler (``conversation.sinch_events``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sinch import SinchClient
from sinch.core.exceptions import SinchException
from sinch.domains.conversation.models.v1.sinch_events import MessageDeliveryReceiptEvent

from gateway.simulator import cli
from gateway.simulator.settings import SimulatorSettings

SETTINGS = SimulatorSettings(
    project_id="p-1",
    key_id="k-1",
    key_secret="s-1",
    apps={"app-eu": "eu"},
    seed=3,
    app_rates={"app-eu": 40},
    drain_factors={"app-eu": 0.001},  # sends stay queued while a test runs
)


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    runner, port = await cli.start(SETTINGS)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def sdk(base_url: str) -> Iterator[SinchClient]:
    client = SinchClient(project_id="p-1", key_id="k-1", key_secret="s-1", conversation_region="eu")
    client.configuration.auth_origin = base_url
    # The SDK formats the region into its conversation domain: http://HOST:PORT/eu.
    client.configuration.conversation_domain = base_url + "/{}"
    try:
        yield client
    finally:
        client.configuration.transport.http_session.close()


async def sim_get(base_url: str, path: str, post: bool = False, doc: Any = None) -> Any:
    async with aiohttp.ClientSession() as session:
        method = session.post if post else session.get
        async with method(base_url + path, json=doc) as resp:
            assert resp.status == 200
            return await resp.json()


def send_text(client: SinchClient, correlation_id: str) -> Any:
    return client.conversation.messages.send_text_message(
        app_id="app-eu",
        text="hello from the sdk",
        recipient_identities=[{"channel": "SMS", "identity": "46701234567"}],
        correlation_id=correlation_id,
    )


async def test_sdk_gets_a_token_and_sends(base_url: str, sdk: SinchClient) -> None:
    result = await asyncio.to_thread(send_text, sdk, "sdk-1")
    assert len(result.message_id) == 26
    assert result.accepted_time is not None
    stats = await sim_get(base_url, "/_sim/stats")
    assert stats["token_requests"] == 1
    assert stats["accepted_by_app"] == {"app-eu": 1}
    accepted = await sim_get(base_url, "/_sim/accepted")
    assert accepted[0]["message_id"] == result.message_id
    assert accepted[0]["correlation_id"] == "sdk-1"


async def test_sdk_renews_an_expired_token(base_url: str, sdk: SinchClient) -> None:
    await asyncio.to_thread(send_text, sdk, "sdk-1")
    await sim_get(base_url, "/_sim/expire-tokens", post=True)
    result = await asyncio.to_thread(send_text, sdk, "sdk-2")
    assert len(result.message_id) == 26
    stats = await sim_get(base_url, "/_sim/stats")
    assert stats["token_requests"] == 2
    assert stats["unauthorized_401"] == 1
    assert stats["accepted_total"] == 2


async def test_sdk_reads_the_app_rate_limits_and_live_queue(
    base_url: str, sdk: SinchClient
) -> None:
    app = await asyncio.to_thread(sdk.conversation.apps.get, app_id="app-eu")
    assert type(app).__name__ == "AppCustomResponse"
    assert app.id == "app-eu"
    assert app.processing_mode == "DISPATCH"
    assert app.rate_limits is not None
    assert (app.rate_limits.outbound, app.rate_limits.inbound) == (40, 20)
    assert app.rate_limits.events == 25  # the wire name is "webhooks"
    assert app.queue_stats is not None
    assert (app.queue_stats.outbound_size, app.queue_stats.outbound_limit) == (0, 500_000)

    for i in range(3):
        await asyncio.to_thread(send_text, sdk, f"sdk-{i}")
    await sim_get(base_url, "/_sim/config", post=True, doc={"app_rates": {"app-eu": 7}})
    app = await asyncio.to_thread(sdk.conversation.apps.get, app_id="app-eu")
    assert app.queue_stats is not None
    assert app.queue_stats.outbound_size == 3
    assert app.rate_limits is not None
    assert app.rate_limits.outbound == 7


async def test_sdk_raises_on_unknown_app_and_disabled_project(
    base_url: str, sdk: SinchClient
) -> None:
    with pytest.raises(SinchException) as unknown:
        await asyncio.to_thread(sdk.conversation.apps.get, app_id="ghost")
    assert unknown.value.response_status_code == 404
    await sim_get(base_url, "/_sim/config", post=True, doc={"project_forbidden": True})
    with pytest.raises(SinchException) as forbidden:
        await asyncio.to_thread(sdk.conversation.apps.get, app_id="app-eu")
    assert forbidden.value.response_status_code == 403
    assert forbidden.value.http_response.body["error"]["status"] == "PERMISSION_DENIED"


class Hook:
    """A webhook verifying and parsing callbacks with the SDK's Sinch Events handler."""

    def __init__(self, sdk: SinchClient, secret: str) -> None:
        self.events = sdk.conversation.sinch_events(secret)
        self.parsed: list[Any] = []
        self.valid: list[bool] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = dict(request.headers)
        self.valid.append(self.events.validate_authentication_header(headers, raw))
        self.parsed.append(self.events.parse_event(raw, headers))
        self.arrived.set()
        return web.Response(status=200)


@pytest.fixture
async def hook(aiohttp_server: Any) -> tuple[Hook, str]:
    client = SinchClient(project_id="p-1", key_id="k-1", key_secret="s-1")
    receiver = Hook(client, "hook-secret")
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server: TestServer = await aiohttp_server(app)
    return receiver, str(server.make_url("/hook"))


@pytest.fixture
def callback_settings(hook: tuple[Hook, str]) -> SimulatorSettings:
    return replace(
        SETTINGS,
        drain_factors={},
        callback_url=hook[1],
        callback_secret="hook-secret",
        callback_delay_s=0.0,
        callback_workers=1,
    )


async def test_sdk_parses_dispatch_callbacks(
    callback_settings: SimulatorSettings, hook: tuple[Hook, str]
) -> None:
    receiver, _ = hook
    runner, port = await cli.start(callback_settings)
    client = SinchClient(project_id="p-1", key_id="k-1", key_secret="s-1", conversation_region="eu")
    client.configuration.auth_origin = f"http://127.0.0.1:{port}"
    client.configuration.conversation_domain = f"http://127.0.0.1:{port}/{{}}"
    try:
        result = await asyncio.to_thread(
            client.conversation.messages.send_text_message,
            app_id="app-eu",
            text="hello",
            recipient_identities=[{"channel": "SMS", "identity": "46701234567"}],
            correlation_id="sdk-dispatch",
            message_metadata="order-42",
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(receiver.parsed) < 2:
            receiver.arrived.clear()
            await asyncio.wait_for(receiver.arrived.wait(), max(0.01, deadline - loop.time()))
    finally:
        client.configuration.transport.http_session.close()
        await runner.cleanup()
    assert receiver.valid == [True, True]
    assert all(isinstance(e, MessageDeliveryReceiptEvent) for e in receiver.parsed)
    reports = [e.message_delivery_report for e in receiver.parsed]
    assert [r.status for r in reports] == ["QUEUED_ON_CHANNEL", "DELIVERED"]
    for event, report in zip(receiver.parsed, reports, strict=True):
        assert event.message_metadata == "order-42"
        assert event.correlation_id == "sdk-dispatch"
        assert event.app_id == "app-eu"
        assert report.message_id == result.message_id
        assert report.processing_mode == "DISPATCH"
        assert report.contact_id == ""
        assert report.conversation_id == ""
        assert report.channel_identity.identity == "46701234567"
