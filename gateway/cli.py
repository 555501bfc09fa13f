"""The ``gateway`` command: run, simulate, demo, send."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from gateway import __version__, logs
from gateway.errors import ConfigError
from gateway.settings import ENV_PREFIX, Secret, Settings, load

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


def _run_settings(ns: argparse.Namespace) -> Settings:
    """The settings of ``gateway run``, read before its event loop is chosen."""
    # Until the settings are read, so that load()'s warnings are formatted too.
    logs.setup("INFO", ns.log_format or os.environ.get(f"{ENV_PREFIX}LOG_FORMAT", "json").lower())
    settings = load(ns.config, require_credentials=True)
    logs.setup(settings.log_level, ns.log_format or settings.log_format)
    return settings


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop for ``event_loop``: uvloop's when installed or asked for, else asyncio's."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "event_loop", "uvloop installed (pip install 'sinch-gateway[fast]')", choice
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _run(ns: argparse.Namespace) -> int:
    from gateway.app import Gateway

    settings: Settings = ns.settings
    log.info("event loop: %s", type(asyncio.get_running_loop()).__module__.split(".")[0])
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


def _replica_count(text: str) -> int:
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least 1")
    return count


async def _demo(ns: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return await run_demo(
        messages=ns.messages,
        apps=ns.apps,
        app_rate=ns.app_rate,
        project_rate=ns.project_rate,
        replicas=ns.replicas,
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help (unless the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text:
            return text
        return super()._get_help_string(action)


class _RunHelpFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults, and the description and epilog laid out as written."""


RUN_DESCRIPTION = f"""\
Run the gateway: drain send requests from Kafka to the Sinch Conversation API,
publish every outcome, receive Sinch's callbacks.

Configuration comes from a TOML file (--config, else the file named by
{ENV_PREFIX}CONFIG) and {ENV_PREFIX}* environment variables, which override it:
{ENV_PREFIX} + the key in upper case ({ENV_PREFIX}KAFKA_BOOTSTRAP, {ENV_PREFIX}PROJECT_ID,
{ENV_PREFIX}KEY_ID, {ENV_PREFIX}KEY_SECRET, ...). {ENV_PREFIX}<KEY>_FILE reads a value from
a file (Kubernetes secrets). Per-app overrides ([apps.ID]) are TOML only. Every
missing or bad key is listed, one per line, and the exit code is 2.
"""


def _settings_epilog() -> str:
    """Every environment variable with its default, from the Settings fields."""
    lines = ["environment variables (default):"]
    for f in dataclasses.fields(Settings):
        if f.default is not dataclasses.MISSING:
            default: object = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # pragma: no cover - every field has a default
            default = None
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        if isinstance(default, Secret) or default in (None, {}):
            shown = "unset"
        lines.append(f"  {ENV_PREFIX}{f.name.upper()} ({shown})")
    return "\n".join(lines)


def _show_simulator_defaults(parser: argparse.ArgumentParser) -> None:
    """Name the real default of the simulator flags whose help does not say it.

    Those flags default to None ("keep the SimulatorSettings default").
    """
    from gateway.simulator.settings import SimulatorSettings

    defaults = SimulatorSettings()
    for action in parser._actions:
        text = action.help or ""
        if not action.option_strings or action.help == argparse.SUPPRESS or "(default" in text:
            continue
        value = getattr(defaults, action.dest, None)
        shown = "none" if value in (None, {}) else str(value)
        action.help = f"{text or action.dest.replace('_', ' ')} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run the gateway service",
        description=RUN_DESCRIPTION,
        epilog=_settings_epilog(),
        formatter_class=_RunHelpFormatter,
    )
    run.add_argument(
        "--config",
        help=f"TOML file (default: the file named by ${ENV_PREFIX}CONFIG, else none)",
    )
    run.add_argument(
        "--log-format",
        choices=["json", "text"],
        help="log line format (default: the log_format setting, json unless set)",
    )

    simulate = sub.add_parser(
        "simulate",
        help="run the Sinch simulator",
        description="The Sinch simulator: OAuth2 token endpoint and messages:send with "
        "Sinch's limits, error bodies and signed callbacks.",
        formatter_class=_HelpFormatter,
    )
    from gateway.simulator import cli as sim_cli

    sim_cli.add_arguments(simulate)
    _show_simulator_defaults(simulate)

    send = sub.add_parser(
        "send",
        help="publish test send requests to Kafka",
        description="Publish test send requests to the requests topic of the configured "
        f"Kafka (same TOML file and {ENV_PREFIX}* variables as run).",
        formatter_class=_HelpFormatter,
    )
    send.add_argument(
        "--config",
        help=f"TOML file (default: the file named by ${ENV_PREFIX}CONFIG, else none)",
    )
    send.add_argument("--count", type=int, default=10, help="requests to publish")
    send.add_argument("--apps", default="demo-app-1", help="comma-separated app ids, taken in turn")
    send.add_argument("--rate", type=float, default=0.0, help="records per second (0: no limit)")
    send.add_argument(
        "--priority", choices=["high", "normal", "low"], default="normal", help="envelope priority"
    )
    send.add_argument("--text", help='message text (default: "Hello #<n> from sinch-gateway")')

    demo = sub.add_parser(
        "demo",
        help="broker, simulator and gateway on this machine",
        description="An embedded Kafka broker, the simulator and the gateway on 127.0.0.1; "
        "publishes messages, drains them and prints a summary.",
        formatter_class=_HelpFormatter,
    )
    demo.add_argument("--messages", type=int, default=600, help="messages to send")
    demo.add_argument("--apps", type=int, default=6, help="apps the messages are spread over")
    demo.add_argument(
        "--app-rate", type=float, default=20.0, help="per-app rate, messages per second"
    )
    demo.add_argument(
        "--project-rate", type=float, default=800.0, help="project cap, messages per second"
    )
    demo.add_argument(
        "--replicas",
        type=_replica_count,
        default=1,
        help="gateway replicas in one consumer group, each with its own admin port; several "
        "share one project cap through a local redis-server when one is on the PATH, "
        "else each paces its partitions' share",
    )
    for module in _MORE_COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


_COMMANDS = {"run": _run, "simulate": _simulate, "send": _send, "demo": _demo}
# Modules with a ``register(subparsers)`` that adds one command and sets
# ``handler`` (an ``async (argparse.Namespace) -> int``) as its default.
_MORE_COMMANDS: tuple[str, ...] = ("gateway.admin_cli", "gateway.redrive_cli", "gateway.validate")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    handler = _COMMANDS.get(ns.command) or ns.handler
    try:
        factory = None
        if ns.command == "run":
            ns.settings = _run_settings(ns)
            factory = loop_factory(ns.settings.event_loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            coro: Coroutine[Any, Any, int] = handler(ns)
            return runner.run(coro)
    except ConfigError as exc:
        for problem in getattr(exc, "problems", None) or [exc]:
            print(f"gateway: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
