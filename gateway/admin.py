"""The admin HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` (and the webhook).

``/healthz`` says the process and its event loop answer:
``{"status": "ok", "version": ..., "uptime_s": ...}``. ``/readyz`` answers 200
only when every check passes: Kafka is connected, partitions are assigned (or
the group is still joining), a valid token is held (or Basic auth is used) and
sending is not held for refused credentials. Otherwise 503, and ``reason``
names the failed checks; the body is
``{"ready": bool, "reason": str, "checks": {name: {"ok": bool, "detail": str}}}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from gateway import __version__

Check = Callable[[], tuple[bool, str]]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Health:
    """Named readiness checks; each returns ``(ok, detail)`` and must not block."""

    checks: dict[str, Check]
    started: float = field(default_factory=time.monotonic)

    def run(self) -> dict[str, tuple[bool, str]]:
        results: dict[str, tuple[bool, str]] = {}
        for name, check in self.checks.items():
            try:
                results[name] = check()
            except Exception as exc:  # a broken check means "not ready", not a 500
                log.exception("readiness check %s failed", name)
                results[name] = (False, f"check failed: {type(exc).__name__}")
        return results

    def ready(self) -> bool:
        return all(ok for ok, _ in self.run().values())


registry_key = web.AppKey("registry", CollectorRegistry)
health_key = web.AppKey("health", Health)


async def metrics_handler(request: web.Request) -> web.Response:
    # Every name is a classic one, so the body is the 0.0.4 text format, which
    # Prometheus 2 and 3 both parse; say so exactly (Prometheus 3 is strict about it).
    body = generate_latest(request.app[registry_key])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


async def healthz(request: web.Request) -> web.Response:
    uptime = time.monotonic() - request.app[health_key].started
    return web.json_response({"status": "ok", "version": __version__, "uptime_s": round(uptime, 3)})


async def readyz(request: web.Request) -> web.Response:
    results = request.app[health_key].run()
    failed = [f"{name}: {detail}" for name, (ok, detail) in results.items() if not ok]
    body = {
        "ready": not failed,
        "reason": "; ".join(failed) if failed else "all checks pass",
        "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in results.items()},
    }
    return web.json_response(body, status=503 if failed else 200)


def make_admin_app(registry: CollectorRegistry, health: Health) -> web.Application:
    app = web.Application()
    app[registry_key] = registry
    app[health_key] = health
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start ``app`` on host:port (0 = any free port); returns the runner and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
