"""Shared fixtures: a real Kafka-protocol broker (Tansu) and the Sinch simulator."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
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
        "requests_high_topic": f"high-{tag}",
        "spill_topic": f"spl-{tag}",
        "results_topic": f"res-{tag}",
        "status_topic": f"sta-{tag}",
        "dlq_topic": f"dlq-{tag}",
        "events_topic": f"evt-{tag}",
        "group_id": f"grp-{tag}",
    }


class RedisServer:
    """A real ``redis-server`` on a free 127.0.0.1 port, without persistence.

    ``stop()`` and ``start()`` again use the same port, as a Redis restart would.
    """

    def __init__(self, binary: str) -> None:
        self.binary = binary
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 10.0) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "yes"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {timeout:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the session; tests keep apart by key prefix. No binary is a failure."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: apt-get install redis-server")
    server = RedisServer(binary)
    server.start()
    yield server
    server.stop()
