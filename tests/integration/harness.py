"""Running the real gateway in-process against the test broker and simulator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from gateway.app import Gateway
from gateway.cli import sample_request
from gateway.demo import demo_settings, publish, read_records
from gateway.settings import Settings

__all__ = [
    "committed_and_end",
    "committed_total",
    "publish",
    "read_records",
    "requests_for",
    "running",
    "settings_for",
    "spawn",
    "to_env",
]


def settings_for(bootstrap: str, sim_port: int, topics: dict[str, str], **kw: Any) -> Settings:
    values: dict[str, Any] = {
        **topics,
        "topic_partitions": 3,
        "session_timeout_s": 2.0,
        "commit_interval_s": 0.2,
        "log_level": "INFO",
    }
    values.update(kw)
    return demo_settings(bootstrap, sim_port, **values)


def requests_for(apps: list[str], count: int) -> list[tuple[bytes | None, bytes]]:
    out = []
    for i in range(count):
        app_id = apps[i % len(apps)]
        out.append((app_id.encode(), orjson.dumps(sample_request(app_id, i))))
    return out


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Gateway]:
    gateway = Gateway(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    started = asyncio.ensure_future(gateway.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()
    assert started in done, "gateway did not start within 30 s"
    try:
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def committed_total(bootstrap: str, topic: str, group_id: str, partitions: int) -> int:
    """Sum of the group's committed offsets (records are numbered from 0 per partition)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        total = 0
        for p in range(partitions):
            off = await consumer.committed(TopicPartition(topic, p))
            total += off or 0
        return total
    finally:
        await consumer.stop()


async def committed_and_end(
    bootstrap: str, topic: str, group_id: str
) -> dict[int, tuple[int | None, int]]:
    """Per partition of ``topic``: the group's committed offset (None if it never committed)
    and the partition's end offset.

    Committed offsets come from ``committed()`` on a consumer in the group that never joins
    it (Tansu does not answer the admin offsets listing). End offsets are the high watermark
    of a fetch: Tansu's ListOffsets(latest) answers the last batch's base offset + 1, so
    ``end_offsets()`` alone undercounts; it only says where the last batch starts.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer.topics()  # metadata of every topic, this one included
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert tps, f"topic {topic} has no partitions"
        committed = {tp.partition: await consumer.committed(tp) for tp in tps}
        last_batch = await consumer.end_offsets(tps)
        consumer.assign(tps)  # assigned, not subscribed: the group is left alone
        for tp in tps:
            consumer.seek(tp, max(0, last_batch[tp] - 1))
        async with asyncio.timeout(10):
            while any(consumer.highwater(tp) is None for tp in tps):
                await consumer.getmany(*tps, timeout_ms=100)
        return {tp.partition: (committed[tp.partition], consumer.highwater(tp)) for tp in tps}
    finally:
        await consumer.stop()


def to_env(settings: Settings) -> dict[str, str]:
    """GATEWAY_* variables for a gateway subprocess with these settings."""
    import dataclasses

    from gateway.settings import Secret

    env: dict[str, str] = {}
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if f.name in ("apps", "channel_rates") or value == getattr(defaults, f.name):
            continue
        if isinstance(value, Secret):
            value = value.reveal()
        env[f"GATEWAY_{f.name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


def spawn(settings: Settings, log_path: str) -> subprocess.Popen[bytes]:
    """``gateway run`` as a process of its own (for kill and signal tests)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with open(log_path, "ab") as log:  # noqa: PTH123
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--log-format", "text"],
            env={**base, **to_env(settings)},
            stdout=log,
            stderr=log,
        )
