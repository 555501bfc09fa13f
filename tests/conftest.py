"""Shared fixtures: a real Kafka-protocol broker (Tansu) and the Sinch simulator."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from gateway.broker import EmbeddedBroker
from gateway.simulator import cli as sim_cli
from gateway.simulator.settings import SimulatorSettings


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


async def wait_for(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until it is true; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class Sim:
    port: int
    settings: SimulatorSettings
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/_sim/stats") as resp:
            return await resp.json()  # type: ignore[no-any-return]

    async def accepted(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base}/_sim/accepted") as resp:
            return await resp.json()  # type: ignore[no-any-return]

    async def post(self, path: str, doc: dict[str, Any] | None = None) -> Any:
        async with self.http.post(f"{self.base}{path}", json=doc or {}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


@pytest.fixture
async def simulator_factory() -> AsyncIterator[Callable[..., Awaitable[Sim]]]:
    runners = []
    http = aiohttp.ClientSession()

    async def make(**kwargs: Any) -> Sim:
        settings = SimulatorSettings(port=0, **kwargs)
        runner, port = await sim_cli.start(settings)
        runners.append(runner)
        return Sim(port, settings, http)

    yield make
    for runner in runners:
        await runner.cleanup()
    await http.close()


@pytest.fixture
async def simulator(simulator_factory: Callable[..., Awaitable[Sim]]) -> Sim:
    return await simulator_factory()


@pytest.fixture
def topics() -> dict[str, str]:
    """Fresh topic names and group id per test: tests share one broker."""
    tag = uuid.uuid4().hex[:8]
    return {
        "requests_topic": f"req-{tag}",
        "results_topic": f"res-{tag}",
        "status_topic": f"sta-{tag}",
        "dlq_topic": f"dlq-{tag}",
        "events_topic": f"evt-{tag}",
        "group_id": f"grp-{tag}",
    }
