"""The admin API under ``/admin/`` on the HTTP port: look at the lanes, act on them.

Off unless ``admin_token`` is set: then every ``/admin/`` path answers 404. Each
call carries ``Authorization: Bearer <admin_token>`` (compared in constant time);
a missing or wrong token answers 401. Changes are logged at INFO with who made
them (the ``X-Admin-User`` header, else ``unknown``) and counted in
``gateway_admin_actions_total``. Every answer is JSON and says the ``scope`` of
the controls: ``group`` (kept in Redis, applied by every replica within a
second) or ``local`` (this replica only).

=======  =================================  ====================================
method   path                               body
=======  =================================  ====================================
GET      /admin/lanes                       (none)
POST     /admin/apps/{app_id}/pause         ``{"reason": "..."}`` (optional)
POST     /admin/apps/{app_id}/resume        (none)
PUT      /admin/apps/{app_id}/rate          ``{"rate": 5, "for_s": 600}`` (for_s optional)
DELETE   /admin/apps/{app_id}/rate          (none)
POST     /admin/drop                        ``{"app_id"?, "campaign"?, "for_s"?}``
=======  =================================  ====================================

A drop cancels the requests waiting in the lanes (retries included; not those
already sent or being sent), each with a ``cancelled`` result. Records of the
app or campaign still in Kafka (not read yet, or spilled) are cancelled only
with ``for_s``: as they reach a lane while the rule is in force.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gateway.controls import ControlError, Controls, StoreUnavailable

if TYPE_CHECKING:
    from gateway.lanes import Lanes
    from gateway.metrics import Metrics
    from gateway.settings import Secret

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RateOf = Callable[[str, str | None], tuple[float, str]]  # (app, project) -> (rate, source)
_USER = re.compile(r"[^A-Za-z0-9@._+:/ -]")
NOT_COVERED = (
    "records of this app/campaign still in Kafka (not read yet, or spilled) are not "
    "covered; give for_s to cancel them too as they are read while the rule is in force"
)


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def who(request: web.Request) -> str:
    """The operator named by ``X-Admin-User`` (printable, at most 64 characters)."""
    user = _USER.sub("", request.headers.get("X-Admin-User", ""))[:64].strip()
    return user or "unknown"


def describe_lanes(
    lanes: Lanes,
    controls: Controls,
    *,
    rate_of: RateOf,
    spilled: Mapping[str, int] | None,
    now: float,
    wall: float,
) -> list[dict[str, Any]]:
    """Every lane (and every app under a control without one yet), for ``GET /admin/lanes``."""
    state = controls.state
    apps = sorted(lanes.lanes.keys() | state.pauses.keys() | state.rates.keys())
    out: list[dict[str, Any]] = []
    for app_id in apps:
        lane = lanes.lanes.get(app_id)
        project = lane.project if lane is not None else None
        base, source = rate_of(app_id, project)
        rate: dict[str, Any] = {"in_force": base, "source": source}
        override = state.rates.get(app_id)
        if override is not None:
            rate = {
                "in_force": override.rate,
                "source": "admin",
                "until": override.until,
                "expires_in_s": None if override.until is None else round(override.until - wall),
                "by": override.by,
                "otherwise": {"rate": base, "source": source},
            }
        if lane is not None:
            rate["pace"] = round(lane.bucket.pace, 3)
        (high, normal, low), retries = lane.queued() if lane is not None else ((0, 0, 0), 0)
        paused: list[dict[str, Any]] = []
        pause = state.pauses.get(app_id)
        if pause is not None:
            paused.append({"by": "admin", "reason": pause.reason, "who": pause.by, "at": pause.at})
        if lane is not None and lane.paused_until > now:
            paused.append(
                {
                    "by": "sinch",
                    "reason": lane.pause_reason,
                    "for_s": round(lane.paused_until - now, 1),
                }
            )
        campaigns = Counter(
            r.campaign for r in (lane.waiting() if lane is not None else ()) if r.campaign
        )
        entry: dict[str, Any] = {
            "app_id": app_id,
            "project": project,
            "rate": rate,
            "queued": {
                "high": high,
                "normal": normal,
                "low": low,
                "retries": retries,
                "total": high + normal + low + retries,
            },
            "in_flight": lane.in_flight if lane is not None else 0,
            "paused": bool(paused),
            "paused_why": paused,
            "campaigns": dict(campaigns.most_common()),
        }
        if spilled is not None and app_id in spilled:
            # known for records this replica spilled since it started, not for older ones
            entry["spilled"] = spilled[app_id]
        out.append(entry)
    return out


class AdminApi:
    """The ``/admin/`` routes; they answer 503 until :meth:`attach` gives them the lanes."""

    def __init__(self, token: Secret | None, metrics: Metrics) -> None:
        self._token = token.reveal().encode() if token is not None else b""
        self._m = metrics
        self.controls: Controls | None = None
        self._describe: Callable[[], list[dict[str, Any]]] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._token)

    def attach(self, controls: Controls, describe: Callable[[], list[dict[str, Any]]]) -> None:
        self.controls = controls
        self._describe = describe

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/admin/lanes", self._guard(self.lanes))
        r.add_post("/admin/apps/{app_id}/pause", self._guard(self.pause))
        r.add_post("/admin/apps/{app_id}/resume", self._guard(self.resume))
        r.add_put("/admin/apps/{app_id}/rate", self._guard(self.set_rate))
        r.add_delete("/admin/apps/{app_id}/rate", self._guard(self.clear_rate))
        r.add_post("/admin/drop", self._guard(self.drop))
        r.add_route("*", "/admin/{tail:.*}", self._guard(self.unknown))

    # -- access ------------------------------------------------------------------

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self._token:
                return _error(404, "not found: the admin API is off (admin_token is not set)")
            given = request.headers.get("Authorization", "")
            scheme, _, credentials = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                credentials.strip().encode(), self._token
            )
            if not ok:
                log.warning(
                    "admin API: %s %s refused (%s token) from %s",
                    request.method,
                    request.path,
                    "wrong" if given else "no",
                    request.remote,
                )
                return _error(
                    401,
                    "unauthorized: a valid 'Authorization: Bearer <admin_token>' is required",
                    **{"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
                )
            if self.controls is None:
                return _error(503, "the gateway is starting; try again shortly")
            try:
                return await handler(request)
            except ControlError as exc:
                return _error(400, str(exc))
            except StoreUnavailable:
                return _error(503, "the shared store (Redis) does not answer; nothing changed")

        return guarded

    def _controls(self) -> Controls:
        if self.controls is None:  # _guard answered 503 before
            raise RuntimeError("admin API used before attach()")
        return self.controls

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ControlError("body: expected a JSON object") from exc
        if not isinstance(doc, dict):
            raise ControlError("body: expected a JSON object")
        return doc

    def _done(self, action: str, user: str, what: str, body: dict[str, Any]) -> web.Response:
        self._m.admin_actions.labels(action).inc()
        log.info("admin %s by %s: %s", action, user, what)
        return web.json_response({"scope": self._controls().scope, **body})

    # -- handlers ------------------------------------------------------------------

    async def unknown(self, request: web.Request) -> web.Response:
        return _error(404, f"not found: {request.method} {request.path}")

    async def lanes(self, request: web.Request) -> web.Response:
        describe = self._describe
        lanes = describe() if describe is not None else []
        state = self._controls().state
        drops = [asdict(d) for d in state.drops.values()]
        return web.json_response(
            {"scope": self._controls().scope, "lanes": lanes, "drops": drops},
            dumps=lambda o: orjson.dumps(o).decode(),
        )

    async def pause(self, request: web.Request) -> web.Response:
        app_id = request.match_info["app_id"]
        body = await self._body(request)
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 200:
            raise ControlError("reason: expected a string of at most 200 characters")
        user = who(request)
        pause = await self._controls().pause(app_id, reason, user)
        return self._done(
            "pause",
            user,
            f"pause app {app_id} ({pause.reason})",
            {"app_id": app_id, **asdict(pause)},
        )

    async def resume(self, request: web.Request) -> web.Response:
        app_id = request.match_info["app_id"]
        user = who(request)
        was = await self._controls().resume(app_id, user)
        return self._done(
            "resume", user, f"resume app {app_id}", {"app_id": app_id, "was_paused": was}
        )

    async def set_rate(self, request: web.Request) -> web.Response:
        app_id = request.match_info["app_id"]
        body = await self._body(request)
        if "rate" not in body:
            raise ControlError("rate: required (requests per second)")
        user = who(request)
        override = await self._controls().set_rate(app_id, body["rate"], body.get("for_s"), user)
        until = "until cleared" if override.until is None else f"for {body['for_s']} s"
        return self._done(
            "rate",
            user,
            f"rate of app {app_id} set to {override.rate:g}/s {until}",
            {"app_id": app_id, **asdict(override)},
        )

    async def clear_rate(self, request: web.Request) -> web.Response:
        app_id = request.match_info["app_id"]
        user = who(request)
        was = await self._controls().clear_rate(app_id, user)
        return self._done(
            "rate_clear",
            user,
            f"rate override of app {app_id} cleared",
            {"app_id": app_id, "had_override": was},
        )

    async def drop(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        unknown = sorted(set(body) - {"app_id", "campaign", "for_s"})
        if unknown:
            raise ControlError(f"unknown field(s): {', '.join(unknown)}")
        user = who(request)
        rule, cancelled = await self._controls().drop(
            body.get("app_id"), body.get("campaign"), body.get("for_s"), user
        )
        note = (
            f"waiting requests cancelled; records that reach a lane until {rule.until:.0f} "
            "(read from Kafka or the spill topic) are cancelled too"
            if rule.until is not None
            else "waiting requests cancelled; " + NOT_COVERED
        )
        what = f"drop {rule.describe()} ({cancelled} waiting requests cancelled here)"
        return self._done(
            "drop", user, what, {"rule": asdict(rule), "cancelled": cancelled, "note": note}
        )
