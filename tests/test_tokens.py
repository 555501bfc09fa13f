"""The shared token manager against the simulator's real OAuth endpoint."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from gateway.errors import AuthError
from gateway.settings import Secret
from gateway.simulator.server import SIMULATOR_KEY, make_app
from gateway.simulator.settings import SimulatorSettings
from gateway.tokens import TokenManager


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def manager_for(aiohttp_server, http, secret="demo-secret", clock=None, **sim):  # noqa: S107
    server = await aiohttp_server(make_app(SimulatorSettings(**sim)))
    manager = TokenManager(
        http,
        auth_url=f"http://127.0.0.1:{server.port}/oauth2/token",
        key_id="demo-key",
        key_secret=Secret(secret),
        backoff_base_s=0.5,
        backoff_max_s=5.0,
        clock=clock,
    )
    return server, manager


async def test_one_fetch_for_many_concurrent_senders(aiohttp_server):
    async with aiohttp.ClientSession() as http:
        server, tokens = await manager_for(aiohttp_server, http)
        headers = await asyncio.gather(*(tokens.authorization() for _ in range(100)))
        assert len(set(headers)) == 1
        assert headers[0].startswith("Bearer ")
        assert server.app[SIMULATOR_KEY].snapshot()["token_requests"] == 1
        await tokens.close()


async def test_renewal_after_an_expired_401_happens_once_for_all_holders(aiohttp_server):
    async with aiohttp.ClientSession() as http:
        server, tokens = await manager_for(aiohttp_server, http)
        old = await tokens.authorization()
        renewed = await asyncio.gather(*(tokens.renew(old) for _ in range(20)))
        assert len(set(renewed)) == 1
        assert renewed[0] != old
        assert server.app[SIMULATOR_KEY].snapshot()["token_requests"] == 2
        await tokens.close()


async def test_refresh_ahead_keeps_senders_from_waiting(aiohttp_server):
    clock = Clock()
    async with aiohttp.ClientSession() as http:
        server, tokens = await manager_for(aiohttp_server, http, clock=clock)
        first = await tokens.authorization()
        left = tokens.seconds_left()
        assert left is not None
        clock.now += left - 1.0  # inside the refresh window, one second before expiry
        assert await tokens.authorization() == first  # still valid: answered at once ...

        async def renewed() -> bool:
            return await tokens.authorization() != first

        deadline = asyncio.get_running_loop().time() + 5
        while not await renewed():  # ... while a new one is fetched in the background
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert server.app[SIMULATOR_KEY].snapshot()["token_requests"] == 2
        await tokens.close()


async def test_refused_credentials_back_off_instead_of_hammering(aiohttp_server):
    async with aiohttp.ClientSession() as http:
        server, tokens = await manager_for(aiohttp_server, http, secret="wrong")
        with pytest.raises(AuthError) as info:
            await tokens.authorization()
        assert info.value.permanent
        assert "wrong" not in str(info.value)
        for _ in range(10):  # within the back-off: answered from the last error
            with pytest.raises(AuthError):
                await tokens.authorization()
        assert server.app[SIMULATOR_KEY].snapshot()["token_requests"] == 1
        await tokens.close()
