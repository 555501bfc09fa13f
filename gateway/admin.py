"""The admin HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` (and the webhook).

``/healthz`` says the process and its event loop answer. ``/readyz`` answers 200
only when Kafka is connected, partitions are assigned (or the group is still
joining), a valid token is held (or Basic auth is used) and sending is not held
for refused credentials; its JSON body says which check failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Check = Callable[[], tuple[bool, str]]


@dataclass(frozen=True, slots=True)
class Health:
    checks: dict[str, Check]


registry_key = web.AppKey("registry", CollectorRegistry)
health_key = web.AppKey("health", Health)


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[registry_key])
    resp = web.Response(body=body)
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    resp.charset = "utf-8"
    return resp


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    results = {name: check() for name, check in request.app[health_key].checks.items()}
    ready = all(ok for ok, _ in results.values())
    body = {
        "ready": ready,
        "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in results.items()},
    }
    return web.json_response(body, status=200 if ready else 503)


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
