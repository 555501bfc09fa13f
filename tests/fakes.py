"""Small real implementations of the gateway's boundaries, for unit tests.

A consumer that hands out scripted records and records pauses and commits, a
publisher whose acknowledgements the test decides, and a clock the test moves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from gateway.producer import Handed, Output

TOPIC = "sinch.outbound.requests"


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Record:
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: int = 0
    topic: str = TOPIC


@dataclass
class FakeConsumer:
    """Topics with scripted records; ``getmany`` honours pause, seek and ``max_records``."""

    partitions: int = 2
    records: dict[tuple[str, int], list[Record]] = field(default_factory=dict)
    position: dict[tuple[str, int], int] = field(default_factory=dict)
    assigned: set[TopicPartition] = field(default_factory=set)
    paused: set[TopicPartition] = field(default_factory=set)
    commits: list[dict[TopicPartition, Any]] = field(default_factory=list)

    def add(self, partition: int, value: bytes | None, topic: str = TOPIC, **kw: Any) -> Record:
        recs = self.records.setdefault((topic, partition), [])
        rec = Record(partition, len(recs), value, topic=topic, **kw)
        recs.append(rec)
        return rec

    def append(self, topic: str, partition: int, value: bytes | None, **kw: Any) -> Record:
        return self.add(partition, value, topic=topic, **kw)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[(tp.topic, tp.partition)] = offset

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.assigned if tp.topic == topic} or set(
            range(self.partitions)
        )

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.records.get((tp.topic, tp.partition), []))

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        out: dict[TopicPartition, list[Record]] = {}
        left = max_records if max_records is not None else 1 << 30
        for tp in sorted(tps or self.assigned, key=lambda t: (t.topic, t.partition)):
            if tp in self.paused or tp not in self.assigned or left <= 0:
                continue
            key = (tp.topic, tp.partition)
            pos = self.position.get(key, 0)
            batch = self.records.get(key, [])[pos : pos + left]
            if batch:
                out[tp] = batch
                self.position[key] = pos + len(batch)
                left -= len(batch)
        if not out:
            await asyncio.sleep(0.001 if timeout_ms else 0)
        return out

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append(dict(offsets))

    def committed_offset(self, partition: int, topic: str = TOPIC) -> int | None:
        for commit in reversed(self.commits):
            for tp, om in commit.items():
                if (tp.topic, tp.partition) == (topic, partition):
                    return int(om.offset)
        return None


class ScriptedPublisher:
    """Acknowledges or refuses each write as ``refuse(topic, value)`` says.

    ``refuse`` returning "ack" acknowledges, "fail" fails the delivery future,
    "raise" raises from ``send`` itself (as a too-large record does).
    """

    def __init__(
        self,
        refuse: Callable[[str, bytes | None], str] | None = None,
        sink: Callable[..., Any] | None = None,
    ) -> None:
        self.refuse = refuse or (lambda topic, value: "ack")
        self.sink = sink  # called with each acknowledged record (a loop back into a consumer)
        self.written: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.tries: list[str] = []
        self.partitions: list[int | None] = []

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> asyncio.Future[Any]:
        self.tries.append(topic)
        self.partitions.append(partition)
        verdict = self.refuse(topic, value)
        if verdict == "raise":
            raise KafkaTimeoutError()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if verdict == "fail":
            fut.set_exception(KafkaTimeoutError())
        else:
            self.written.append((topic, value, key, list(headers or [])))
            if self.sink is not None:
                self.sink(topic, partition, value, key=key, headers=tuple(headers or ()))
            fut.set_result(None)
        return fut

    async def send_many(self, outputs: Sequence[Output]) -> list[Handed]:
        """Each record its own "batch", through :meth:`send` (so ``refuse`` sees each)."""
        handed: list[Handed] = []
        for i, out in enumerate(outputs):
            try:
                fut = await self.send(
                    out.topic,
                    out.value,
                    key=out.key,
                    headers=out.headers,
                    partition=out.partition,
                    timestamp_ms=out.timestamp_ms,
                )
            except Exception as exc:  # refused at once, as the real one does
                handed.append((exc, [i]))
            else:
                handed.append((fut, [i]))
        return handed

    def on(self, topic: str) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
        return [(v, k, h) for t, v, k, h in self.written if t == topic]
