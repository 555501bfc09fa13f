"""Command-line glue for ``gateway simulate``: flags, settings, embedded server.

The ``gateway`` CLI adds :func:`add_arguments` to its ``simulate`` subparser, builds
settings with :func:`settings_from_args` and runs :func:`serve` until SIGTERM sets
the stop event. Tests and the demo embed the server with :func:`start`.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from aiohttp import web

from gateway.simulator.server import make_app
from gateway.simulator.settings import (
    PROCESSING_MODES,
    REGIONS,
    ProjectSpec,
    Region,
    SimulatorSettings,
)

_FLOATS = (
    ("token-lifetime-s", "seconds an OAuth token lives"),
    ("project-rate", "sends/s per project (sliding 1 s window)"),
    ("app-rate", "default sends/s per app"),
    ("error-rate", "fraction of sends answered 500/503"),
    ("latency-s", "latency added to every send"),
    ("latency-jitter-s", "random extra latency, up to this"),
    ("callback-failed-fraction", "fraction of deliveries reported FAILED"),
    ("callback-delay-s", "delay between QUEUED_ON_CHANNEL and DELIVERED"),
    ("basic-auth-rate", "sends/s allowed with HTTP Basic auth"),
)
_INTS = (
    ("port", "TCP port (0 = ephemeral)"),
    ("queue-size", "per-app ingress queue size (normal mode)"),
    ("callback-workers", "concurrent callback posts"),
    ("callback-queue-size", "callbacks buffered before dropping"),
    ("callback-retries", "retries of a failed callback post"),
    ("accepted-log-size", "accepted sends kept for /_sim/accepted"),
    ("max-request-bytes", "largest send body accepted (400 above)"),
    ("seed", "random seed (faults, ids)"),
)
_STRINGS = (
    ("host", "address to bind"),
    ("project-id", "the default project"),
    ("key-id", "OAuth / Basic key id"),
    ("key-secret", "OAuth / Basic key secret"),
    ("callback-url", "webhook that receives delivery reports and inbound messages"),
    ("callback-secret", "HMAC secret that signs callbacks"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; unset flags keep the :class:`SimulatorSettings` default."""
    defaults = SimulatorSettings()
    for kind, flags in ((str, _STRINGS), (int, _INTS), (float, _FLOATS)):
        for name, help_text in flags:
            default = getattr(defaults, name.replace("-", "_"))
            parser.add_argument(
                f"--{name}", type=kind, default=None, help=f"{help_text} (default: {default})"
            )
    parser.add_argument(
        "--strict",
        action="store_true",
        default=None,
        help="app limit is a 1 s window answering 429 at once (default: leaky ingress queue)",
    )
    parser.add_argument(
        "--apps", default=None, help="known apps and regions, e.g. app1:us,app2:eu (default: any)"
    )
    parser.add_argument(
        "--app-rates", default=None, help="per-app rate overrides, e.g. app1:50,app2:5"
    )
    parser.add_argument(
        "--drain-factors",
        default=None,
        help="per-app real drain speed as a fraction of the reported rate, e.g. app1:0.5",
    )
    parser.add_argument(
        "--processing-mode",
        choices=sorted(PROCESSING_MODES),
        default=None,
        help="processing mode of every app (default: DISPATCH)",
    )
    parser.add_argument(
        "--processing-modes", default=None, help="per-app modes, e.g. app1:CONVERSATION"
    )
    parser.add_argument("--default-region", choices=sorted(REGIONS), default=None)
    parser.add_argument(
        "--projects",
        default=None,
        help="more projects, each with its own key and cap: "
        "PROJECT_ID:KEY_ID:KEY_SECRET:RATE[,...] (default: none)",
    )


def _projects(text: str) -> dict[str, ProjectSpec]:
    projects: dict[str, ProjectSpec] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":", 2)
        secret, _, rate = parts[-1].rpartition(":")
        if len(parts) != 3 or not secret:
            raise ValueError("--projects: expected PROJECT_ID:KEY_ID:KEY_SECRET:RATE[,...]")
        try:
            number = float(rate)
        except ValueError:
            raise ValueError(f"--projects: rate of {parts[0]!r} must be a number") from None
        try:
            projects[parts[0]] = ProjectSpec(key_id=parts[1], key_secret=secret, rate=number)
        except ValueError as exc:
            raise ValueError(f"--projects: {parts[0]!r}: {exc}") from None
    return projects


def _pairs(text: str, flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.rpartition(":")
        if not sep or not key or not value:
            raise ValueError(f"{flag}: expected name:value[,name:value...], got {item!r}")
        pairs.append((key, value))
    return pairs


def settings_from_args(ns: argparse.Namespace) -> SimulatorSettings:
    """Settings from parsed flags; raises ValueError naming the bad flag or field."""
    values: dict[str, Any] = {}
    for name, _ in (*_STRINGS, *_INTS, *_FLOATS):
        attr = name.replace("-", "_")
        value = getattr(ns, attr, None)
        if value is not None:
            values[attr] = value
    if getattr(ns, "strict", None):
        values["strict"] = True
    if getattr(ns, "default_region", None):
        values["default_region"] = ns.default_region
    if getattr(ns, "apps", None):
        apps: dict[str, Region] = {}
        for app_id, region in _pairs(ns.apps, "--apps"):
            if region not in REGIONS:
                raise ValueError(f"--apps: region of {app_id!r} must be us, eu or br")
            apps[app_id] = region  # type: ignore[assignment]  # checked just above
        values["apps"] = apps
    for name in ("app_rates", "drain_factors"):
        text = getattr(ns, name, None)
        if text:
            flag = "--" + name.replace("_", "-")
            try:
                values[name] = {a: float(r) for a, r in _pairs(text, flag)}
            except ValueError as exc:
                raise ValueError(f"{flag}: {exc}") from exc
    if getattr(ns, "processing_mode", None):
        values["processing_mode"] = ns.processing_mode
    if getattr(ns, "processing_modes", None):
        values["processing_modes"] = dict(_pairs(ns.processing_modes, "--processing-modes"))
    if getattr(ns, "projects", None):
        values["projects"] = _projects(ns.projects)
    return SimulatorSettings(**values)


async def start(settings: SimulatorSettings) -> tuple[web.AppRunner, int]:
    """Start the simulator on ``settings.host:port``; return the runner and bound port.

    The caller owns the runner and must ``await runner.cleanup()``.
    """
    runner = web.AppRunner(make_app(settings), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        port: int = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, port


async def serve(settings: SimulatorSettings, stop: asyncio.Event) -> None:
    """Run the simulator until ``stop`` is set, then shut it down."""
    runner, port = await start(settings)
    try:
        print(f"simulator listening on http://{settings.host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
