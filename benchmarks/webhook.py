"""Webhook throughput: signed delivery reports in, Kafka acknowledgements out, on one core.

    python benchmarks/webhook.py [--requests 20000] [--connections 64]

One server process, pinned to one CPU, serves three routes side by side:

- ``/baseline``: a bare aiohttp handler that only answers 200 (the floor: HTTP
  parsing and the response, nothing else);
- ``/verify``: the real :class:`WebhookReceiver` (size, headers, window, HMAC,
  JSON, replay cache, status record) with a publisher whose sends complete at once;
- ``/webhooks/sinch``: the real receiver and the real Publisher on an embedded
  broker: 200 only after Kafka acknowledged the event and its status record.

The load comes from this process over keep-alive connections with pre-signed
requests (signing is not measured). Each run reports the achieved rate and the
server's CPU time per callback, read from the server itself; ``1e6 / µs`` is
what one core could take at 100 %. The records on the topics are counted after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.broker import EmbeddedBroker
from gateway.demo import read_records
from gateway.metrics import Metrics
from gateway.producer import Publisher, ensure_topics
from gateway.settings import Settings, load
from gateway.simulator.callbacks import delivery_report
from gateway.webhooks import NONCE, SIGNATURE, TIMESTAMP, WebhookReceiver, sign

SECRET = "bench-secret"  # noqa: S105 - a benchmark fixture, not a credential
OK = b'{"status":"ok"}'
ROUTES = {
    "baseline": ("/baseline", "bare aiohttp handler, answers 200"),
    "verify": ("/verify", "receiver, Kafka replaced by a no-op"),
    "full": ("/webhooks/sinch", "receiver + Kafka ack (events+status)"),
}


def bench_settings(bootstrap: str) -> Settings:
    return load(
        env={},
        kafka_bootstrap=bootstrap,
        webhook_secret=SECRET,
        topic_partitions=1,
        events_topic="bench.events",
        status_topic="bench.status",
    )


class DonePublisher:
    """Stands in for Kafka in ``/verify``: every send is acknowledged at once."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, topic: str, value: bytes | None, **_: Any) -> asyncio.Future[Any]:
        self.sent += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


# -- the server process -----------------------------------------------------------


async def serve(bootstrap: str) -> None:
    settings = bench_settings(bootstrap)
    await ensure_topics(settings)
    async with Publisher(settings, linger_ms=1) as publisher:
        full = WebhookReceiver(settings, Metrics(CollectorRegistry()))
        full.attach(publisher)
        verify = WebhookReceiver(settings, Metrics(CollectorRegistry()))
        verify.attach(DonePublisher())  # type: ignore[arg-type]

        async def baseline(request: web.Request) -> web.Response:
            return web.Response(body=OK, content_type="application/json")

        async def cpu(request: web.Request) -> web.Response:
            return web.json_response({"cpu_s": time.process_time()})

        app = web.Application()
        app.router.add_post(ROUTES["baseline"][0], baseline)
        app.router.add_post(ROUTES["verify"][0], verify.handle)
        app.router.add_post(ROUTES["full"][0], full.handle)
        app.router.add_get("/_cpu", cpu)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(json.dumps({"port": port}), flush=True)
        # run until the parent closes our stdin
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()


# -- the load ---------------------------------------------------------------------


def signed_requests(path: str, count: int, tag: str) -> list[bytes]:
    """Whole HTTP/1.1 requests: a delivery report each, signed, unique nonce."""
    out = []
    ts = str(int(time.time()))
    for i in range(count):
        doc = delivery_report(
            project_id="bench-project",
            app_id=f"app-{i % 8}",
            message_id=f"{tag}-{i:08d}",
            accepted_time="2024-01-01T00:00:00.000000Z",
            status="DELIVERED",
            recipient={
                "identified_by": {
                    "channel_identities": [{"channel": "SMS", "identity": f"4670{i:07d}"}]
                }
            },
            message_metadata="",
            correlation_id=f"req-{tag}-{i}",
        )
        body = orjson.dumps(doc)
        nonce = secrets.token_hex(13)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{NONCE}: {nonce}\r\n{TIMESTAMP}: {ts}\r\n"
            f"{SIGNATURE}: {sign(SECRET, body, nonce, ts)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def drive(port: int, requests: list[bytes], connections: int) -> dict[int, int]:
    """Send every request over ``connections`` keep-alive connections; statuses seen."""
    statuses: dict[int, int] = {}
    queue = iter(requests)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for raw in queue:
                writer.write(raw)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                statuses[status] = statuses.get(status, 0) + 1
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return statuses


async def server_cpu(port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /_cpu HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    return float(json.loads(data.split(b"\r\n\r\n", 1)[1])["cpu_s"])


async def count_records(bootstrap: str, topic: str, expected: int) -> int:
    """Records on ``topic``, read back (Tansu's end offsets can lag what it stores)."""
    records = await read_records(bootstrap, topic, expected, timeout_s=30)
    return len(records)


async def main(args: argparse.Namespace) -> int:
    cpus = sorted(os.sched_getaffinity(0))
    with EmbeddedBroker() as broker:
        server_cpu_id = cpus[0]
        if len(cpus) > 1:  # the load generator stays off the server's core
            os.sched_setaffinity(0, cpus[1:])
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            broker.bootstrap,
            "--cpu",
            str(server_cpu_id),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdin is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            port = json.loads(line)["port"]
            print(
                f"webhook benchmark: {args.requests} signed delivery reports per run, "
                f"{args.connections} keep-alive connections; server pinned to CPU "
                f"{server_cpu_id}, load on CPUs {cpus[1:] or cpus}; "
                f"python {sys.version.split()[0]}"
            )
            print(
                f"{'run':<10}{'what':<40}{'rate/s':>9}{'CPU µs/req':>12}{'core busy':>11}"
                f"{'1-core max/s':>14}"
            )
            figures: dict[str, float] = {}
            for name, (path, what) in ROUTES.items():
                warm = signed_requests(path, min(2000, args.requests), f"{name}-warm")
                reqs = signed_requests(path, args.requests, name)
                warm_statuses = await drive(port, warm, args.connections)
                assert warm_statuses == {200: len(warm)}, warm_statuses
                cpu0, t0 = await server_cpu(port), time.perf_counter()
                statuses = await drive(port, reqs, args.connections)
                wall, cpu = time.perf_counter() - t0, await server_cpu(port) - cpu0
                assert statuses == {200: args.requests}, statuses
                us = cpu / args.requests * 1e6
                figures[name] = us
                print(
                    f"{name:<10}{what:<40}{args.requests / wall:>9.0f}{us:>12.1f}"
                    f"{cpu / wall:>10.0%}{1e6 / us:>14.0f}"
                )
            base = figures["baseline"]
            print(
                f"CPU per callback against the bare handler: verification "
                f"{figures['verify'] / base:.2f}x, verification + Kafka "
                f"{figures['full'] / base:.2f}x"
            )
            settings = bench_settings(broker.bootstrap)
            expected = args.requests + min(2000, args.requests)
            events = await count_records(broker.bootstrap, settings.events_topic, expected)
            status = await count_records(broker.bootstrap, settings.status_topic, expected)
            print(
                f"Kafka: {events} records on {settings.events_topic}, {status} on "
                f"{settings.status_topic} (expected {expected} each)"
            )
            ok = events == expected and status == expected
        finally:
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 30)
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--serve", metavar="BOOTSTRAP", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.serve:
        if ns.cpu is not None:
            os.sched_setaffinity(0, {ns.cpu})
        asyncio.run(serve(ns.serve))
        sys.exit(0)
    sys.exit(asyncio.run(main(ns)))
