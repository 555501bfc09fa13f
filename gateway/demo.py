"""``gateway demo``: the embedded broker, the simulator and the gateway on loopback.

Publishes a few hundred requests over several apps, waits for every result and
prints a summary: what was sent, each app's rate against its cap, and what the
simulator saw (429s, the busiest 1-second windows).

``--replicas N`` runs N gateways in this process, one consumer group, each with its
own admin port. With ``redis-server`` on the PATH they draw from one project cap
in a Redis of the demo's own (a free 127.0.0.1 port, no persistence, stopped by
its PID at the end); without it each paces the share of its partitions. The
summary adds each replica's partitions and sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from gateway import logs
from gateway.app import Gateway
from gateway.broker import EmbeddedBroker, free_port, stop_process
from gateway.cli import sample_request
from gateway.settings import Settings, load
from gateway.simulator import cli as sim_cli
from gateway.simulator.settings import SimulatorSettings


async def read_records(bootstrap: str, topic: str, count: int, timeout_s: float) -> list[Any]:
    """Read ``topic`` from the beginning until ``count`` records or the deadline."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        parts: set[int] | None = None
        while parts is None and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.1)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        while len(out) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


async def publish(bootstrap: str, topic: str, docs: Sequence[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=8 << 20
    )
    await producer.start()
    try:
        for key, value in docs:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


def demo_settings(bootstrap: str, sim_port: int, **overrides: Any) -> Settings:
    base = f"http://127.0.0.1:{sim_port}"
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "project_id": "demo-project",
        "key_id": "demo-key",
        "key_secret": "demo-secret",
        "auth_url": f"{base}/oauth2/token",
        "conversation_url": base + "/{region}",
        "http_host": "127.0.0.1",
        "http_port": 0,
        "group_id": f"demo-{uuid.uuid4().hex[:8]}",
        "session_timeout_s": 6.0,
        "commit_interval_s": 0.5,
        "log_format": "text",
        "log_level": "WARNING",
    }
    values.update(overrides)
    return load(env={}, **values)


class LocalRedis:
    """A ``redis-server`` of the demo's own on a free 127.0.0.1 port, without persistence.

    ``stop()`` ends that process by its PID (SIGTERM, then SIGKILL), nothing else.
    """

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout_s: float = 10.0) -> None:
        if self._proc is not None:
            return
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "yes"]
        self._proc = subprocess.Popen(  # noqa: S603 - redis-server from PATH, fixed arguments
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"redis-server exited with code {code} (port {self.port})")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {timeout_s:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, 5.0)

    async def __aenter__(self) -> LocalRedis:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


@contextlib.asynccontextmanager
async def shared_cap(replicas: int) -> AsyncIterator[str | None]:
    """The Redis URL the replicas draw one project cap from, or None (each its share).

    One replica needs no Redis. Several start a local ``redis-server`` when one is on
    the PATH; otherwise they fall back to the partition share, and say so.
    """
    if replicas == 1:
        yield None
        return
    binary = shutil.which("redis-server")
    if binary is None:
        print(
            "  limiter    redis-server not found on the PATH (Debian: apt-get install "
            "redis-server):\n             partition share, each replica paces the project "
            "cap x its partitions / all"
        )
        yield None
        return
    async with LocalRedis(binary) as redis:
        print(
            f"  limiter    one project cap for {replicas} replicas in redis-server "
            f"{redis.url} (pid {redis.pid}, no persistence)"
        )
        yield redis.url


@dataclass(slots=True)
class Replica:
    """One in-process gateway of the demo and what the summary reports about it."""

    gateway: Gateway
    partitions: tuple[int, ...] = ()

    def owned(self) -> tuple[int, ...]:
        intake, topic = self.gateway.intake, self.gateway.settings.requests_topic
        if intake is None:
            return ()
        return tuple(sorted(tp.partition for tp in intake.trackers if tp.topic == topic))

    def sent(self) -> int:
        """Requests this replica sent (its own ``gateway_requests_finished_total``)."""
        return int(
            sum(
                sample.value
                for metric in self.gateway.registry.collect()
                if metric.name == "gateway_requests_finished"
                for sample in metric.samples
                if sample.name.endswith("_total") and sample.labels.get("status") == "sent"
            )
        )


@contextlib.asynccontextmanager
async def replica(settings: Settings) -> AsyncIterator[Replica]:
    """A gateway running until the block ends (then stopped as SIGTERM would)."""
    gateway = Gateway(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    started = asyncio.ensure_future(gateway.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # it could not start: say why
    try:
        yield Replica(gateway)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


async def start_replicas(
    stack: contextlib.AsyncExitStack, settings: list[Settings], timeout_s: float = 60.0
) -> list[Replica]:
    """Start every replica (the first alone: it creates the topics), then wait until
    the group has shared out the requests topic, so that no rebalance runs mid-drain."""
    group = [await stack.enter_async_context(replica(settings[0]))]
    group += await asyncio.gather(*(stack.enter_async_context(replica(s)) for s in settings[1:]))
    partitions = settings[0].topic_partitions
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        owned = [r.owned() for r in group]
        if sum(map(len, owned)) == partitions and sum(map(bool, owned)) == min(
            len(group), partitions
        ):
            break
        await asyncio.sleep(0.1)
    else:
        print(f"  (the group did not share the {partitions} partitions within {timeout_s:.0f} s)")
    for r in group:
        r.partitions = r.owned()
    return group


async def run_demo(
    *,
    messages: int = 600,
    apps: int = 6,
    app_rate: float = 20.0,
    project_rate: float = 800.0,
    replicas: int = 1,
) -> int:
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    logs.setup("WARNING", "text")
    if replicas > 1:  # each replica that joins rebalances the group: expected, not a warning
        logging.getLogger("aiokafka.consumer.group_coordinator").setLevel(logging.ERROR)
    app_ids = [f"demo-app-{i + 1}" for i in range(apps)]
    print(
        f"sinch-gateway demo: {messages} messages over {apps} apps "
        f"(app cap {app_rate:g}/s, project cap {project_rate:g}/s, strict 1-second windows)"
        + (f", {replicas} gateway replicas" if replicas > 1 else "")
    )
    async with EmbeddedBroker() as broker, contextlib.AsyncExitStack() as stack:
        print(f"  broker     Tansu on {broker.bootstrap}")
        # the simulator posts signed callbacks to the first replica's webhook (its own port)
        hook_port, hook_secret = free_port(), secrets.token_urlsafe(24)
        sim = SimulatorSettings(
            port=0,
            strict=True,
            app_rate=app_rate,
            project_rate=project_rate,
            callback_url=f"http://127.0.0.1:{hook_port}/webhooks/sinch",
            callback_secret=hook_secret,
            callback_failed_fraction=0.05,
        )
        sim_runner, sim_port = await sim_cli.start(sim)
        stack.push_async_callback(sim_runner.cleanup)
        print(f"  simulator  http://127.0.0.1:{sim_port}")
        redis_url = await stack.enter_async_context(shared_cap(replicas))
        group_id = f"demo-{uuid.uuid4().hex[:8]}"
        settings = [
            demo_settings(
                broker.bootstrap,
                sim_port,
                app_rate=app_rate,
                project_rate=project_rate,
                group_id=group_id,
                client_id=f"{group_id}-{i + 1}",
                webhook_port=hook_port if i == 0 else None,
                webhook_secret=hook_secret,
                redis_url=redis_url,
            )
            for i in range(replicas)
        ]
        group = await start_replicas(stack, settings)
        for i, r in enumerate(group, 1):
            name = "gateway" if replicas == 1 else f"gateway {i}"
            print(
                f"  {name:<10} admin on http://127.0.0.1:{r.gateway.http_port} (/metrics, /readyz)"
            )
        print(f"  webhook    http://127.0.0.1:{hook_port}/webhooks/sinch (signed callbacks)")
        docs = []
        for i in range(messages):
            app_id = app_ids[i % apps]
            docs.append((app_id.encode(), orjson.dumps(sample_request(app_id, i))))
        started = time.monotonic()
        await publish(broker.bootstrap, settings[0].requests_topic, docs)
        print(f"  published  {messages} requests; draining ...")
        results = await read_records(
            broker.bootstrap,
            settings[0].results_topic,
            messages,
            timeout_s=60 + messages / min(apps * app_rate, project_rate) * 2,
        )
        elapsed = time.monotonic() - started
        callbacks = await _callbacks(broker.bootstrap, settings[0], sim_port, messages)
        sent_by = [r.sent() for r in group]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{sim_port}/_sim/stats") as resp,
        ):
            stats = await resp.json()
    _summary(results, elapsed, stats, app_rate, project_rate)
    if replicas > 1:
        _replica_summary(group, sent_by, redis_url is not None, stats, project_rate)
    print(callbacks)
    docs_ok = sum(1 for r in results if orjson.loads(r.value)["status"] == "sent")
    return 0 if docs_ok == messages else 1


def _replica_summary(
    group: list[Replica],
    sent_by: list[int],
    shared: bool,
    stats: dict[str, Any],
    project_rate: float,
) -> None:
    mode = "one cap in Redis" if shared else "partition share, no Redis"
    print(f"{'replica':<10}{'partitions':<14}{'sent':>6}  limiter")
    for i, (r, sent) in enumerate(zip(group, sent_by, strict=True), 1):
        limiter = r.gateway.limiter
        if limiter is not None:
            trips = limiter.roundtrips
            detail = f"{limiter.slots_drawn} slots in {trips} Redis round trips"
        else:
            share = project_rate * len(r.partitions) / max(1, sum(len(g.partitions) for g in group))
            detail = f"share {share:g}/s"
        parts = ",".join(map(str, r.partitions)) or "-"
        print(f"{i:<10}{parts:<14}{sent:>6}  {detail}")
    window = stats.get("max_received_per_s", {}).get("project", "-")
    print(
        f"{len(group)} replicas ({mode}): {sum(sent_by)} sent, project max {window} "
        f"in any 1 s against the cap of {project_rate:g}"
    )


def _summary(
    results: list[Any],
    elapsed: float,
    stats: dict[str, Any],
    app_rate: float,
    project_rate: float,
) -> None:
    statuses: Counter[str] = Counter()
    per_app: dict[str, list[float]] = defaultdict(list)
    for rec in results:
        doc = orjson.loads(rec.value)
        statuses[doc["status"]] += 1
        if doc["status"] == "sent" and doc.get("accepted_time"):
            per_app[doc["app_id"]].append(_ts(doc["accepted_time"]))
    print(
        f"\nresults after {elapsed:.1f} s: "
        + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        or "none"
    )
    print(f"{'app':<14}{'sent':>6}{'rate/s':>9}{'cap/s':>7}{'max in 1 s':>12}")
    windows = stats.get("max_received_per_s", {}).get("by_app", {})
    for app_id in sorted(per_app):
        times = sorted(per_app[app_id])
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        rate = (len(times) - 1) / span if span > 0 else float(len(times))
        print(
            f"{app_id:<14}{len(times):>6}{rate:>9.1f}{app_rate:>7g}{windows.get(app_id, '-')!s:>12}"
        )
    project_window = stats.get("max_received_per_s", {}).get("project", "-")
    print(
        f"project: max {project_window} requests in any 1 s (cap {project_rate:g}); "
        f"429s from the simulator: {stats.get('rejected_429', {}).get('total', '?')}"
    )


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


async def _callbacks(bootstrap: str, settings: Settings, sim_port: int, messages: int) -> str:
    """One inbound message from the simulator, then what the webhook put on Kafka."""
    inbound = {"app_id": "demo-app-1", "text": "hi"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{sim_port}/_sim/inbound", json=inbound) as resp,
    ):
        await resp.read()
    # QUEUED_ON_CHANNEL and DELIVERED/FAILED per message, the inbound one; "sent" + 2 reports
    events = await read_records(bootstrap, settings.events_topic, 2 * messages + 1, timeout_s=15)
    status = await read_records(bootstrap, settings.status_topic, 3 * messages, timeout_s=5)
    triggers = Counter(dict(e.headers).get("sinch.trigger", b"?").decode() for e in events)
    progress = Counter(orjson.loads(r.value)["status"] for r in status)
    order = ["sent", "QUEUED_ON_CHANNEL", "DELIVERED", "READ", "FAILED", "SWITCHING_CHANNEL"]
    return (
        f"callbacks: {len(events)} events on {settings.events_topic} ("
        + ", ".join(f"{t} {n}" for t, n in sorted(triggers.items()))
        + f"); {len(status)} records on {settings.status_topic} keyed by request_id ("
        + ", ".join(f"{s} {progress[s]}" for s in order if progress[s])
        + ")"
    )
