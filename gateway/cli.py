"""The ``gateway`` command: run, simulate, demo, send."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import uuid
from collections.abc import Coroutine
from typing import Any

import orjson

from gateway import __version__, logs
from gateway.errors import ConfigError
from gateway.settings import load

log = logging.getLogger("gateway")


def sample_request(app_id: str, n: int, *, priority: str = "normal") -> dict[str, Any]:
    """A valid send request envelope (used by ``send``, the demo and the load tests)."""
    return {
        "request_id": str(uuid.uuid4()),
        "priority": priority,
        "payload": {
            "app_id": app_id,
            "recipient": {
                "identified_by": {
                    "channel_identities": [{"channel": "SMS", "identity": f"4670{n:07d}"}]
                }
            },
            "message": {"text_message": {"text": f"Hello #{n} from sinch-gateway"}},
        },
    }


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _run(ns: argparse.Namespace) -> int:
    from gateway.app import Gateway

    settings = load(ns.config)
    settings.require_credentials()
    logs.setup(settings.log_level, ns.log_format or settings.log_format)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    await Gateway(settings).run(stop)
    return 0


async def _simulate(ns: argparse.Namespace) -> int:
    from gateway.simulator import cli as sim_cli

    logs.setup("INFO", "text")
    try:
        settings = sim_cli.settings_from_args(ns)
    except ValueError as exc:
        print(f"gateway simulate: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    _stop_on_signals(stop)
    await sim_cli.serve(settings, stop)
    return 0


async def _send(ns: argparse.Namespace) -> int:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError
    from aiolimiter import AsyncLimiter

    from gateway.producer import kafka_options

    settings = load(ns.config)
    apps = [a for a in ns.apps.split(",") if a]
    producer = AIOKafkaProducer(**kafka_options(settings), acks="all", linger_ms=5)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        print(f"gateway send: Kafka at {settings.kafka_bootstrap} refused: {exc}", file=sys.stderr)
        return 1
    # Publishing pace only: bursts do not matter here, so aiolimiter's bucket fits.
    limiter = AsyncLimiter(ns.rate, 1.0) if ns.rate else None
    try:
        for i in range(ns.count):
            if limiter is not None:
                await limiter.acquire()
            app_id = apps[i % len(apps)]
            doc = sample_request(app_id, i, priority=ns.priority)
            if ns.text:
                doc["payload"]["message"]["text_message"]["text"] = ns.text
            await producer.send(settings.requests_topic, orjson.dumps(doc), key=app_id.encode())
        await producer.flush()
    finally:
        await producer.stop()
    print(f"published {ns.count} requests to {settings.requests_topic} over {len(apps)} apps")
    return 0


async def _demo(ns: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return await run_demo(
        messages=ns.messages, apps=ns.apps, app_rate=ns.app_rate, project_rate=ns.project_rate
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway service")
    run.add_argument("--config", help="TOML file (default: $GATEWAY_CONFIG)")
    run.add_argument("--log-format", choices=["json", "text"])

    simulate = sub.add_parser("simulate", help="run the Sinch simulator")
    from gateway.simulator import cli as sim_cli

    sim_cli.add_arguments(simulate)

    send = sub.add_parser("send", help="publish test send requests to Kafka")
    send.add_argument("--config")
    send.add_argument("--count", type=int, default=10)
    send.add_argument("--apps", default="demo-app-1")
    send.add_argument("--rate", type=float, default=0.0, help="records per second (0: no limit)")
    send.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
    send.add_argument("--text")

    demo = sub.add_parser("demo", help="broker, simulator and gateway on this machine")
    demo.add_argument("--messages", type=int, default=600)
    demo.add_argument("--apps", type=int, default=6)
    demo.add_argument("--app-rate", type=float, default=20.0)
    demo.add_argument("--project-rate", type=float, default=800.0)
    return parser


_COMMANDS = {"run": _run, "simulate": _simulate, "send": _send, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    coro: Coroutine[Any, Any, int] = _COMMANDS[ns.command](ns)
    try:
        return asyncio.run(coro)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
