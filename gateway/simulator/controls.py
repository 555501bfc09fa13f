"""The simulator's control API (``/_sim/*``) and its ``/metrics``.

Tests, the demo and the load tests drive the simulator through these: statistics,
the accepted log, runtime settings (``POST /_sim/config`` with the fields of
:data:`gateway.simulator.settings.TUNABLE`), holds, token expiry, reset and inbound
messages. None of them is a Sinch endpoint, so none is counted in the metrics.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.simulator.settings import patch

if TYPE_CHECKING:
    from gateway.simulator.server import Simulator

_JSON_HEADERS: Final = {"Content-Type": "application/json"}


class Controls:
    """Handlers of the control routes of one :class:`~gateway.simulator.server.Simulator`."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def stats(self, request: web.Request) -> web.Response:
        return _json(self.sim.snapshot())

    async def accepted(self, request: web.Request) -> web.Response:
        return _json(
            [
                {
                    "message_id": m,
                    "app_id": a,
                    "correlation_id": c,
                    "accepted_time": t,
                    "project_id": p,
                }
                for m, a, c, t, p in self.sim.accepted_log
            ]
        )

    async def config(self, request: web.Request) -> web.Response:
        """Apply tunable changes; answers the changed fields, or 400 naming the bad one."""
        changes = await _read_object(request)
        try:
            if changes is None:
                raise ValueError("body: must be a JSON object")
            settings = patch(self.sim.settings, changes)
        except ValueError as exc:
            return _error(400, "INVALID_ARGUMENT", str(exc))
        self.sim.reconfigure(settings)
        return _json({name: _plain(getattr(settings, name)) for name in sorted(changes)})

    async def hold(self, request: web.Request) -> web.Response:
        self.sim.hold(_app_id(await _read_object(request)))
        return self._holds()

    async def release(self, request: web.Request) -> web.Response:
        app_id = _app_id(await _read_object(request))
        if app_id is None:
            self.sim.release_all()
        else:
            self.sim.release(app_id)
        return self._holds()

    def _holds(self) -> web.Response:
        return _json({"hold_all": self.sim.hold_all, "held_apps": sorted(self.sim.held_apps)})

    async def expire_tokens(self, request: web.Request) -> web.Response:
        now = asyncio.get_running_loop().time()
        tokens = self.sim.tokens
        for token, (expiry, project_id) in tokens.items():
            if expiry > now:
                tokens[token] = (now, project_id)
        return _json({"expired": len(tokens)})

    async def reset(self, request: web.Request) -> web.Response:
        self.sim.reset()
        return _json({"reset": True})

    async def inbound(self, request: web.Request) -> web.Response:
        data = await _read_object(request) or {}
        app_id, text = data.get("app_id"), data.get("text")
        identity = data.get("identity", "46700000000")
        if not all(isinstance(v, str) and v for v in (app_id, text, identity)):
            return _error(400, "INVALID_ARGUMENT", "app_id, text and identity must be strings.")
        settings = self.sim.settings
        if settings.callback_url is None:
            return _error(409, "FAILED_PRECONDITION", "No callback_url configured.")
        mode = settings.processing_mode_of(str(app_id))
        message_id = self.sim.callbacks.inbound(str(app_id), str(text), str(identity), mode)
        if message_id is None:
            return _error(503, "UNAVAILABLE", "Callback queue is full.")
        return _json({"message_id": message_id})

    async def metrics_view(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.sim.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )


def snapshot(sim: Simulator) -> dict[str, Any]:
    """The ``/_sim/stats`` document (counts since start or the last reset).

    ``received_total`` counts sends that passed auth; ``max_received_per_s`` /
    ``max_accepted_per_s`` are the largest numbers of such / of accepted sends
    inside any 1-second window, for the default project (``project``), per project
    (``by_project``) and per app; ``accepted_by_project`` and
    ``rejected_429_by_project`` count sends per project served. ``invalid`` counts
    sends refused with 400, by the top-level field of their first violation
    (``body`` for a malformed body, ``size`` for one over ``max_request_bytes``).
    ``duplicates``: ``total`` sends carried a ``correlation_id`` (else
    ``message_metadata``) already accepted before, ``accepted`` of them were
    accepted again, ``ids`` the first 100 such ids. Times: ``*_send_time`` on
    ``loop.time()``, ``*_send_wall`` unix seconds. ``app_reads``: answered app
    GETs; ``queue_size_by_app``: messages waiting in each ingress queue now.
    ``accepted_log_dropped``: accepted sends no longer in ``/_sim/accepted`` (it
    keeps the last ``accepted_log_size``).
    """
    apps = sim.apps
    projects = sim.projects
    main = projects[sim.settings.project_id]
    counts = sim.status_counts
    first, last = sim.first_send, sim.last_send
    return {
        "received_total": sim.received_total,
        "accepted_total": sim.accepted_total,
        "accepted_by_app": {a: s.accepted_total for a, s in apps.items() if s.accepted_total},
        "accepted_by_project": {p: s.accepted_total for p, s in projects.items()},
        "rejected_429": {"total": counts.get(429, 0), **sim.rejected_429},
        "rejected_429_by_project": {p: s.rejected_429 for p, s in projects.items()},
        "injected_5xx": {
            "total": counts.get(500, 0) + counts.get(503, 0),
            "500": counts.get(500, 0),
            "503": counts.get(503, 0),
        },
        "unauthorized_401": counts.get(401, 0),
        "bad_request_400": counts.get(400, 0),
        "invalid": {"total": sum(sim.invalid.values()), **sim.invalid},
        "forbidden_403": counts.get(403, 0),
        "not_found_404": counts.get(404, 0),
        "token_requests": sim.token_requests,
        "max_received_per_s": {
            "project": main.received.peak,
            "by_project": {p: s.received.peak for p, s in projects.items()},
            "by_app": {a: s.received.peak for a, s in apps.items()},
        },
        "max_accepted_per_s": {
            "project": main.accepted.peak,
            "by_project": {p: s.accepted.peak for p, s in projects.items()},
            "by_app": {a: s.accepted.peak for a, s in apps.items()},
        },
        "duplicates": {
            "total": sim.duplicates,
            "accepted": sim.duplicates_accepted,
            "ids": list(sim.duplicate_ids),
        },
        "first_send_time": first[0] if first else None,
        "last_send_time": last[0] if last else None,
        "first_send_wall": first[1] if first else None,
        "last_send_wall": last[1] if last else None,
        "held": sim.held,
        "app_reads": sim.app_reads,
        "queue_size_by_app": sim.queue_sizes(),
        "callbacks": sim.callbacks.counts(),
        "accepted_log_dropped": sim.accepted_total - len(sim.accepted_log),
    }


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, headers=_JSON_HEADERS)


def _error(status: int, name: str, message: str) -> web.Response:
    body = {"error": {"code": status, "message": message, "status": name, "details": []}}
    return _json(body, status)


def _plain(value: object) -> object:
    return dict(value) if isinstance(value, dict) else value


def _app_id(target: dict[str, Any] | None) -> str | None:
    app_id = (target or {}).get("app_id")
    return app_id if isinstance(app_id, str) else None


async def _read_object(request: web.Request) -> dict[str, Any] | None:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
