"""``gateway demo``: the embedded broker, the simulator and the gateway on loopback.

Publishes a few hundred requests over several apps, waits for every result and
prints a summary: what was sent, each app's rate against its cap, and what the
simulator saw (429s, the busiest 1-second windows).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from gateway import logs
from gateway.app import Gateway
from gateway.broker import EmbeddedBroker, free_port
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


async def run_demo(
    *, messages: int = 600, apps: int = 6, app_rate: float = 20.0, project_rate: float = 800.0
) -> int:
    logs.setup("WARNING", "text")
    app_ids = [f"demo-app-{i + 1}" for i in range(apps)]
    print(
        f"sinch-gateway demo: {messages} messages over {apps} apps "
        f"(app cap {app_rate:g}/s, project cap {project_rate:g}/s, strict 1-second windows)"
    )
    async with EmbeddedBroker() as broker:
        print(f"  broker     Tansu on {broker.bootstrap}")
        # the simulator posts signed callbacks to the gateway's webhook (its own port)
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
        print(f"  simulator  http://127.0.0.1:{sim_port}")
        try:
            settings = demo_settings(
                broker.bootstrap,
                sim_port,
                app_rate=app_rate,
                project_rate=project_rate,
                webhook_port=hook_port,
                webhook_secret=hook_secret,
            )
            gateway = Gateway(settings)
            stop = asyncio.Event()
            task = asyncio.create_task(gateway.run(stop))
            await asyncio.wait(
                {task, asyncio.ensure_future(gateway.started.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            print(f"  gateway    admin on http://127.0.0.1:{gateway.http_port} (/metrics, /readyz)")
            print(f"  webhook    http://127.0.0.1:{hook_port}/webhooks/sinch (signed callbacks)")
            docs = []
            for i in range(messages):
                app_id = app_ids[i % apps]
                docs.append((app_id.encode(), orjson.dumps(sample_request(app_id, i))))
            started = time.monotonic()
            await publish(broker.bootstrap, settings.requests_topic, docs)
            print(f"  published  {messages} requests; draining ...")
            results = await read_records(
                broker.bootstrap,
                settings.results_topic,
                messages,
                timeout_s=60 + messages / (apps * app_rate) * 2,
            )
            elapsed = time.monotonic() - started
            callbacks = await _callbacks(broker.bootstrap, settings, sim_port, messages)
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{sim_port}/_sim/stats") as resp,
            ):
                stats = await resp.json()
        finally:
            await sim_runner.cleanup()
    _summary(results, elapsed, stats, app_rate, project_rate)
    print(callbacks)
    docs_ok = sum(1 for r in results if orjson.loads(r.value)["status"] == "sent")
    return 0 if docs_ok == messages else 1


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
