"""What the two records of a sent message cost to produce, three ways.

    python -m benchmarks.produce [--rate 800] [--seconds 8]

Against the embedded broker, results and status topics of 6 partitions each, a result-sized
record per topic per message, at ``rate`` messages per second:

- ``send() as each ends``: aiokafka's ``send()`` for each record at the moment its message
  ends (one wake-up per message, the producer lingering 25 ms), as the gateway did before;
- ``send(), gathered``: the same calls, made together every ``linger`` ms;
- ``send_many``: the gateway's :meth:`gateway.producer.Publisher.send_many`, every ``linger``
  ms: one record batch per topic-partition.

Prints the process CPU per message (both records), each from its own run, until every record
is acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from gateway.broker import EmbeddedBroker
from gateway.producer import Output, Publisher, crc32_partitioner
from gateway.settings import load

VALUE = (
    b'{"request_id":"r-000000000001","status":"sent","app_id":"app-07","attempts":1,'
    b'"http_status":200,"message_id":"01J00000000000000000000000",'
    b'"accepted_time":"2026-12-03T05:00:00Z","timings":{"queued_s":0.0123,"sinch_s":0.0012}}'
)
TOPICS = ("bench-results", "bench-status")


async def paced(
    rate: float, seconds: float, every_s: float, step: Callable[[int, int], Awaitable[None]]
) -> int:
    """Call ``step(first, count)`` every ``every_s`` for the messages due since the last."""
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    per_step = max(1, round(rate * every_s))
    start, n = loop.time(), 0
    while n < total:
        count = min(per_step, total - n)
        due = start + (n + count) / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        await step(n, count)
        n += count
    return n


async def one_run(bootstrap: str, mode: str, rate: float, seconds: float, linger_ms: int) -> float:
    settings = load(env={}, kafka_bootstrap=bootstrap)
    acked = 0
    futures: list[asyncio.Future[Any]] = []

    def count(n: int) -> Callable[[asyncio.Future[Any]], None]:
        def done(_fut: asyncio.Future[Any]) -> None:
            nonlocal acked
            acked += n

        return done

    if mode == "send_many":
        publisher = Publisher(settings)
        await publisher.start()

        async def step(first: int, n: int) -> None:
            outs = [
                Output(topic, VALUE, f"req-{i}".encode())
                for i in range(first, first + n)
                for topic in TOPICS
            ]
            for answer, members in await publisher.send_many(outs):
                if isinstance(answer, Exception):
                    raise answer
                answer.add_done_callback(count(len(members)))
                futures.append(answer)

        stop: Callable[[], Awaitable[None]] = publisher.stop
    else:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=25 if mode == "send" else linger_ms,
            partitioner=crc32_partitioner,
        )
        await producer.start()

        async def step(first: int, n: int) -> None:
            for i in range(first, first + n):
                for topic in TOPICS:
                    fut = await producer.send(topic, VALUE, key=f"req-{i}".encode())
                    fut.add_done_callback(count(1))
                    futures.append(fut)

        stop = producer.stop

    cpu0 = time.process_time()
    every_s = 1 / rate if mode == "send" else linger_ms / 1000
    sent = await paced(rate, seconds, every_s, step)
    await asyncio.gather(*futures)
    cpu = time.process_time() - cpu0
    await stop()
    assert acked == 2 * sent
    return cpu / sent * 1e6


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=800.0, help="messages per second")
    p.add_argument("--seconds", type=float, default=8.0)
    ns = p.parse_args()
    broker = EmbeddedBroker()
    broker.start()
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(t, 6, 1) for t in TOPICS])
        await admin.close()
        runs = [("send", 25), ("gathered", 25), ("gathered", 100)]
        runs += [("send_many", 25), ("send_many", 50), ("send_many", 100)]
        print(f"{ns.rate:.0f} messages/s, 2 records each, {ns.seconds:.0f} s per run")
        for mode, linger in runs:
            us = await one_run(broker.bootstrap, mode, ns.rate, ns.seconds, linger)
            label = {
                "send": "send() as each ends",
                "gathered": f"send(), gathered {linger} ms",
                "send_many": f"send_many, every {linger} ms",
            }[mode]
            print(f"  {label:<28} {us:7.1f} us CPU per message")
    finally:
        broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
