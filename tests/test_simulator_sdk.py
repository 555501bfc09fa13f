"""The official ``sinch`` SDK, a real client of the Conversation API, against the simulator.

The SDK is synchronous (requests), so it runs in a worker thread via
``asyncio.to_thread`` while the simulator serves on a real port in the test's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from sinch import SinchClient

from gateway.simulator import cli
from gateway.simulator.settings import SimulatorSettings

SETTINGS = SimulatorSettings(
    project_id="p-1", key_id="k-1", key_secret="s-1", apps={"app-eu": "eu"}, seed=3
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


async def sim_get(base_url: str, path: str, post: bool = False) -> Any:
    async with aiohttp.ClientSession() as session:
        method = session.post if post else session.get
        async with method(base_url + path) as resp:
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
