"""Writes to the results, status, DLQ and events topics, and creates topics.

``send`` hands a record to aiokafka's accumulator and returns the delivery
future: callers attach the "finished" step to it, so an offset is committed
only after Kafka acknowledged what the record produced. ``send_many`` hands over
many records at once as one batch per topic-partition (aiokafka's
``create_batch``/``send_batch``), with one future per batch: the outcome writer's
way, at a fraction of the CPU of a ``send`` per record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, TopicAlreadyExistsError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from gateway.settings import Settings

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


@dataclass(slots=True, eq=False)  # not frozen: a spill makes one per record, and a frozen
class Output:  # dataclass's __init__ costs 2.5 times as much
    """One record to write."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: Headers | None = None
    partition: int | None = None
    timestamp_ms: int | None = None


# what send_many did with some of its records: the future of their batch, or what
# refused them at once (too large, unknown topic, a closed producer), and their indices
Handed = tuple[asyncio.Future[Any] | Exception, list[int]]

# The re-drive ledger keeps one record per key for as long as the topic lives: a
# DLQ record re-driven once is never re-driven again by a later ``gateway redrive``.
LEDGER_CONFIG = {"cleanup.policy": "compact"}


def crc32_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """Keyed records by CRC-32 (C speed; aiokafka's murmur2 is pure Python).

    Only this gateway writes its output topics, so no other producer needs to
    agree on the hash; what matters is that one key always maps to one partition.
    """
    if key is None:
        return random.choice(available or all_partitions)  # noqa: S311 - spreading load
    return all_partitions[zlib.crc32(key) % len(all_partitions)]


def kafka_options(settings: Settings) -> dict[str, Any]:
    """Connection options shared by the consumer, producer and admin client."""
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap.split(","),
        "client_id": settings.client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            opts["sasl_plain_password"] = settings.kafka_sasl_password.reveal()
    if settings.kafka_security_protocol.endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        opts["ssl_context"] = create_ssl_context()
    return opts


async def ensure_topics(settings: Settings) -> None:
    """Create the gateway's topics if they are missing (``create_topics``)."""
    admin = AIOKafkaAdminClient(**kafka_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = {
            settings.requests_topic: settings.topic_partitions,
            settings.requests_high_topic: settings.topic_partitions,
            settings.spill_topic: settings.spill_partitions,
            settings.results_topic: settings.topic_partitions,
            settings.status_topic: settings.topic_partitions,
            settings.dlq_topic: settings.topic_partitions,
            settings.events_topic: settings.topic_partitions,
            # small (one record per re-driven DLQ record) and read whole by every re-drive
            settings.redrive_ledger_topic: 1,
        }
        configs = {settings.redrive_ledger_topic: LEDGER_CONFIG}
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return
        with contextlib.suppress(TopicAlreadyExistsError):  # another replica was first
            await admin.create_topics(
                [
                    NewTopic(t, wanted[t], settings.topic_replication, topic_configs=configs.get(t))
                    for t in missing
                ]
            )
        log.info("created topics %s", ", ".join(missing))
    finally:
        await admin.close()


class Publisher:
    """A producer for the output topics.

    ``linger_ms`` trades latency for CPU: the send path waits for acknowledgements
    only before committing, so it batches for longer (fewer produce requests to
    encode and answers to decode); the webhook answers Sinch only once Kafka has
    acknowledged, so it gets a producer of its own that hardly lingers.
    """

    def __init__(self, settings: Settings, *, linger_ms: int = 25) -> None:
        self._settings = settings
        self._linger_ms = linger_ms
        self._max_request_size = max(8 << 20, 2 * settings.max_message_bytes)
        self._producer: AIOKafkaProducer | None = None
        self.failures = 0

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            **kafka_options(self._settings),
            acks="all",
            enable_idempotence=self._settings.producer_idempotence,
            linger_ms=self._linger_ms,
            max_batch_size=256 * 1024,
            partitioner=crc32_partitioner,
            # the DLQ must take any record the consumer could read, oversized ones included
            max_request_size=self._max_request_size,
        )
        await producer.start()
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is pending

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> asyncio.Future[Any]:
        if self._producer is None:
            raise RuntimeError("publisher is not started")
        fut: asyncio.Future[Any] = await self._producer.send(
            topic,
            value=value,
            key=key,
            headers=headers,
            partition=partition,
            timestamp_ms=timestamp_ms,
        )
        return fut

    async def send_many(self, outputs: Sequence[Output]) -> list[Handed]:
        """Hand ``outputs`` to Kafka as one batch per topic-partition, in their order.

        Keyed records without a partition go where :func:`crc32_partitioner` puts
        them, as with :meth:`send`. A batch is full at the producer's batch size; the
        next one of its partition follows it (aiokafka queues it behind the first).
        """
        if self._producer is None:
            raise RuntimeError("publisher is not started")
        producer = self._producer
        handed: list[Handed] = []
        groups: dict[tuple[str, int], list[int]] = {}
        partitions: dict[str, list[int] | Exception] = {}  # asked once per topic
        for i, out in enumerate(outputs):
            try:
                size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
                    out.key, out.value, out.headers or []
                )
                if size > self._max_request_size:
                    raise MessageSizeTooLargeError(f"a record of {size} bytes")
                partition = out.partition
                if partition is None:
                    parts = partitions.get(out.topic)
                    if parts is None:
                        try:
                            parts = sorted(await producer.partitions_for(out.topic))
                        except Exception as exc:  # an unknown topic: its other records too
                            parts = exc
                        partitions[out.topic] = parts
                    if isinstance(parts, Exception):
                        raise parts
                    partition = crc32_partitioner(out.key, parts, parts)
            except Exception as exc:  # each record's own refusal
                handed.append((exc, [i]))
                continue
            groups.setdefault((out.topic, partition), []).append(i)
        for (topic, partition), indices in groups.items():
            batch, members = producer.create_batch(), list[int]()
            for i in indices:
                if not _append(batch, outputs[i]):  # full
                    handed.append(await self._submit(batch, topic, partition, members))
                    batch, members = producer.create_batch(), []
                    _append(batch, outputs[i])  # the first record always fits
                members.append(i)
            handed.append(await self._submit(batch, topic, partition, members))
        return handed

    async def _submit(self, batch: Any, topic: str, partition: int, members: list[int]) -> Handed:
        if self._producer is None:
            return RuntimeError("publisher is not started"), members
        batch.close()  # sent as it is, at once: the caller has lingered already
        try:
            fut: asyncio.Future[Any] = await self._producer.send_batch(
                batch, topic, partition=partition
            )
        except Exception as exc:  # refused at once: the caller retries them
            return exc, members
        return fut, members

    async def flush(self) -> None:
        if self._producer is not None:
            await self._producer.flush()

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> None:
        fut = await self.send(topic, value, key=key, headers=headers)
        try:
            await fut
        except KafkaError:
            self.failures += 1
            raise


def _append(batch: Any, out: Output) -> bool:
    """Add ``out`` to an aiokafka batch; False when the batch is full."""
    added = batch.append(
        key=out.key, value=out.value, timestamp=out.timestamp_ms, headers=out.headers or []
    )
    return added is not None
