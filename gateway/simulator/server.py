"""The simulator's aiohttp application: Sinch OAuth, ``messages:send`` and controls.

Routes (``make_app(settings)``):

- ``POST /oauth2/token``: client-credentials grant with HTTP Basic key_id:key_secret;
  the token is bound to the project of that key.
- ``POST /v1/projects/{project_id}/messages:send`` (``default_region``) and
  ``POST /{region}/v1/projects/{project_id}/messages:send`` (us, eu, br). Point a
  client at ``http://HOST:PORT/{region}`` as its conversation base URL.
- ``GET [/{region}]/v1/projects/{project_id}/apps/{app_id}``: the App resource
  (:mod:`gateway.simulator.apps`) with ``rate_limits`` and a live ``queue_stats``;
  same auth as a send, 403 while ``project_forbidden`` or with another project's
  key, 404 for a project not served or an app that does not exist in that region,
  429 over the project cap.
- ``GET /_sim/stats``, ``GET /_sim/accepted``, ``POST /_sim/config``,
  ``POST /_sim/hold``, ``POST /_sim/release``, ``POST /_sim/expire-tokens``,
  ``POST /_sim/reset``, ``POST /_sim/inbound``, ``GET /metrics``.

A send is checked in this order, the first failure answers:
auth (401; an expired bearer token adds ``www-authenticate: Bearer
error="invalid_token", error_description="expired"``, an unknown one ``Bearer
error="invalid_token"``) → project id (404 when not served) → the key's project
(403 PERMISSION_DENIED for another project's key or token) → ``project_forbidden``
(403 PERMISSION_DENIED) → body (400 with ``field_violations``: shape, ``ttl``,
``correlation_id``, ``queue``, size) → app exists in the region (404) → hold (the
request waits, unanswered, until ``/_sim/release``; everything below is evaluated
after the release) → project cap
(429) → app limit (429: ingress queue full, or in strict mode the 1-second window
full) → Basic-auth limit (429) → injected fault (500/503) → accepted (200, after
``latency_s`` plus up to ``latency_jitter_s``).

Rate accounting uses ``loop.time()``. Every project served (``settings.projects``
besides the default one) has its own project cap, Basic-auth limit and windows;
apps are shared. Limits count *accepted* sends (the project cap also counts
answered app reads); the *received* windows (every send that
passed auth) only feed the statistics. In normal mode an accepted send enters its
app's ingress queue (:mod:`gateway.simulator.ingress`) and its delivery reports
start when it leaves; in strict mode they start at once.

``Retry-After``: every 429 carries it, and only 429s do, with the same value as a
``google.rpc.RetryInfo`` ``retryDelay`` in ``error.details``. Its value is whole
seconds, at least 1: the ceiling of the exact time after which the limit that
refused the request would admit it (for the 1-second windows this is always 1).
Injected 500/503 carry none, because they are random and a hint would be a lie.

``/_sim/reset`` clears counters, windows, queues, the accepted log and the
duplicate tracking; issued tokens, holds and Prometheus counters (monotonic by
contract) are kept. The set of accepted correlation ids (for duplicate detection)
grows until a reset, about 100 bytes per id; the accepted log is capped by
``accepted_log_size``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import math
import random
import secrets
import time
from collections import deque
from typing import Any, Final, cast

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.simulator.apps import app_resource
from gateway.simulator.callbacks import CallbackDispatcher, Stamper
from gateway.simulator.collector import SimulatorMetrics
from gateway.simulator.controls import Controls, snapshot
from gateway.simulator.ingress import DeparturePump, IngressQueue
from gateway.simulator.settings import ProcessingMode, SimulatorSettings
from gateway.simulator.validation import validate_send, violation
from gateway.simulator.windows import SlidingWindow

MAX_DUPLICATE_IDS: Final = 100
MAX_TOKENS: Final = 100_000
_JSON: Final = "application/json"
_JSON_HEADERS: Final = {"Content-Type": _JSON}
_EXPIRED: Final = {"www-authenticate": 'Bearer error="invalid_token", error_description="expired"'}
_INVALID: Final = {"www-authenticate": 'Bearer error="invalid_token"'}


class _AppState:
    __slots__ = ("accepted", "accepted_total", "label", "queue", "received")

    def __init__(self, app_id: str, now: float, label: str) -> None:
        self.received = SlidingWindow()
        self.accepted = SlidingWindow()
        self.queue = IngressQueue(app_id, now)
        self.accepted_total = 0
        self.label = label


class _ProjectState:
    __slots__ = ("accepted", "accepted_total", "basic", "calls", "received", "rejected_429")

    def __init__(self) -> None:
        self.received = SlidingWindow()
        self.accepted = SlidingWindow()
        # What the project cap counts: accepted sends and answered app reads.
        self.calls = SlidingWindow()
        self.basic = SlidingWindow()
        self.accepted_total = 0
        self.rejected_429 = 0


class Simulator:
    """State and handlers of one simulator app (stored under :data:`SIMULATOR_KEY`)."""

    def __init__(self, settings: SimulatorSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)  # noqa: S311 - simulation, not crypto
        self.stamper = Stamper(self.rng)
        self.callbacks = CallbackDispatcher(settings, self.rng, self.stamper)
        self.metrics = SimulatorMetrics(registry, self.callbacks.totals)
        self.departures = DeparturePump(lambda app_id: self.settings.drain_rate(app_id), self._left)
        # token -> (expiry on loop.time(), the project of the key it was issued for)
        self.tokens: dict[str, tuple[float, str]] = {}
        self.token_requests = 0
        self.hold_all = False
        self.held_apps: set[str] = set()
        self._release = asyncio.Event()
        self.held = 0
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.apps: dict[str, _AppState] = {}
        self.projects = {pid: _ProjectState() for pid in self.settings.project_ids()}
        self.invalid: dict[str, int] = {}
        self.app_reads = 0
        self.received_total = 0
        self.accepted_total = 0
        self.status_counts: dict[int, int] = {}
        self.rejected_429 = {"project": 0, "app": 0, "basic": 0}
        # (message_id, app_id, correlation id, accepted_time, project_id)
        self.accepted_log: deque[tuple[str, str, str | None, str, str]] = deque(
            maxlen=self.settings.accepted_log_size
        )
        self.accepted_ids: set[str] = set()
        self.duplicates = 0
        self.duplicates_accepted = 0
        self.duplicate_ids: list[str] = []
        self.first_send: tuple[float, float] | None = None
        self.last_send: tuple[float, float] | None = None

    # -- responses ---------------------------------------------------------------

    def _answer(
        self,
        endpoint: str,
        status: int,
        payload: object,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        # Only the Sinch endpoints (send, app, token) are counted; "sim" is the control API.
        if endpoint != "sim":
            self.metrics.request(endpoint, status)
        if endpoint == "send":
            self.status_counts[status] = self.status_counts.get(status, 0) + 1
        return web.Response(
            body=orjson.dumps(payload),
            status=status,
            headers=_JSON_HEADERS if headers is None else {**_JSON_HEADERS, **headers},
        )

    def _error(
        self,
        endpoint: str,
        status: int,
        name: str,
        message: str,
        details: list[Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        body = {"code": status, "message": message, "status": name, "details": details or []}
        return self._answer(endpoint, status, {"error": body}, headers)

    def _too_many(
        self, scope: str, message: str, wait_s: float, endpoint: str = "send"
    ) -> web.Response:
        if endpoint == "send":
            self.rejected_429[scope] += 1
        seconds = max(1, math.ceil(wait_s))
        hint = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{seconds}s"}
        retry = {"Retry-After": str(seconds)}
        return self._error(
            endpoint, 429, "RESOURCE_EXHAUSTED", message, details=[hint], headers=retry
        )

    def _basic_project(self, header: str) -> str | None:
        """The project whose key the Basic ``header`` carries, else None."""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            return None
        login, sep, password = decoded.partition(b":")
        if not sep:
            return None
        found = None
        for project_id, key_id, key_secret in self.settings.access_keys():
            # every key is compared, so the time says nothing about which one matched
            if hmac.compare_digest(login, key_id.encode()) & hmac.compare_digest(
                password, key_secret.encode()
            ):
                found = project_id
        return found

    # -- Sinch endpoints ---------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        self.metrics.tokens += 1
        project_id = self._basic_project(request.headers.get("Authorization", ""))
        if project_id is None:
            return self._error("token", 401, "UNAUTHENTICATED", "Request had invalid credentials.")
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return self._error(
                "token", 400, "INVALID_ARGUMENT", "grant_type must be client_credentials."
            )
        lifetime = self.settings.token_lifetime_s
        access_token = secrets.token_urlsafe(32)
        if len(self.tokens) >= MAX_TOKENS:
            del self.tokens[next(iter(self.tokens))]
        self.tokens[access_token] = (asyncio.get_running_loop().time() + lifetime, project_id)
        return self._answer(
            "token",
            200,
            {
                "access_token": access_token,
                "expires_in": max(1, int(lifetime)),
                "scope": "",
                "token_type": "bearer",
            },
        )

    async def send(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        now = loop.time()
        auth = self._authenticate("send", request, now)
        if isinstance(auth, web.Response):
            return auth
        basic, key_project = auth
        project_id = request.match_info["project_id"]
        self._count_received(now, project_id)
        refused = self._project_refusal("send", project_id, key_project)
        if refused is not None:
            return refused
        project = self.projects[project_id]
        body = await self._read_send(request)
        if isinstance(body, web.Response):
            return body
        app_id: str = body["app_id"]
        app = self._app(app_id, now)
        app.received.add(now)
        region = request.match_info.get("region", self.settings.default_region)
        if self.settings.region_of(app_id) != region:
            return self._error("send", 404, "NOT_FOUND", "App not found in this region.")
        correlation = self._note_duplicate(body)
        if self.hold_all or self.held_apps:
            await self._wait_if_held(app_id)
            now = loop.time()
            app = self._app(app_id, now)  # a reset may have happened meanwhile
            project = self.projects[project_id]
        refused = self._admit(app_id, app, project_id, project, now, basic)
        if refused is not None:
            if refused.status == 429:
                project.rejected_429 += 1
            return refused
        message_id, accepted_time = self._accept(
            app_id, app, project_id, project, now, basic, body, correlation
        )
        settings = self.settings
        delay = settings.latency_s
        if settings.latency_jitter_s > 0.0:
            delay += self.rng.random() * settings.latency_jitter_s
        if delay > 0.0:
            await asyncio.sleep(delay)
        return self._answer("send", 200, {"accepted_time": accepted_time, "message_id": message_id})

    async def get_app(self, request: web.Request) -> web.Response:
        """``GET .../apps/{app_id}``: the App resource with live ``queue_stats``."""
        now = asyncio.get_running_loop().time()
        auth = self._authenticate("app", request, now)
        if isinstance(auth, web.Response):
            return auth
        project_id = request.match_info["project_id"]
        refused = self._project_refusal("app", project_id, auth[1])
        if refused is not None:
            return refused
        calls = self.projects[project_id].calls
        settings = self.settings
        app_id = request.match_info["app_id"]
        region = request.match_info.get("region", settings.default_region)
        if settings.region_of(app_id) != region:
            return self._error("app", 404, "NOT_FOUND", f"App {app_id} not found.")
        cap = max(1, int(settings.project_limit(project_id)))
        if calls.count(now) >= cap:
            wait = calls.wait_s(now, cap)
            return self._too_many("project", "Project rate limit exceeded.", wait, "app")
        calls.add(now)
        self.app_reads += 1
        state = self.apps.get(app_id)
        waiting = 0
        if state is not None and not settings.strict:
            waiting = state.queue.size(now, settings.drain_rate(app_id))
        return self._answer("app", 200, app_resource(settings, app_id, waiting))

    # -- steps of a send -----------------------------------------------------------

    def _authenticate(
        self, endpoint: str, request: web.Request, now: float
    ) -> tuple[bool, str] | web.Response:
        """(Basic auth?, the key's project) for good credentials, else the 401 answer."""
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            issued = self.tokens.get(auth[7:])
            if issued is None or issued[0] <= now:
                message = "Request had invalid credentials." if issued is None else "Token expired."
                headers = _INVALID if issued is None else _EXPIRED
                return self._error(endpoint, 401, "UNAUTHENTICATED", message, headers=headers)
            return False, issued[1]
        project_id = self._basic_project(auth)
        if project_id is not None:
            return True, project_id
        return self._error(endpoint, 401, "UNAUTHENTICATED", "Request had invalid credentials.")

    def _count_received(self, now: float, project_id: str) -> None:
        self.received_total += 1
        project = self.projects.get(project_id)
        if project is not None:
            project.received.add(now)
        wall = time.time()
        if self.first_send is None:
            self.first_send = (now, wall)
        self.last_send = (now, wall)

    def _project_refusal(
        self, endpoint: str, project_id: str, key_project: str
    ) -> web.Response | None:
        """404 for a project not served, 403 for another project's key or while the
        project is disabled, else None."""
        if project_id not in self.projects:
            return self._error(endpoint, 404, "NOT_FOUND", "Project not found.")
        if project_id != key_project:
            message = "The key does not belong to this project."
            return self._error(endpoint, 403, "PERMISSION_DENIED", message)
        if self.settings.project_forbidden:
            message = f"Project {project_id} is disabled"
            return self._error(endpoint, 403, "PERMISSION_DENIED", message)
        return None

    async def _read_send(self, request: web.Request) -> dict[str, Any] | web.Response:
        """The SendMessageRequest, or the 400 answer listing its field violations."""
        limit = self.settings.max_request_bytes
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raw = b""
            too_large = True
        else:
            too_large = len(raw) > limit
        if too_large:
            message = f"Request payload size exceeds the limit: {limit} bytes."
            return self._bad_request([violation("", message)], "size")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._bad_request([violation("", "Invalid JSON payload received.")])
        violations = validate_send(body)
        if violations:
            return self._bad_request(violations)
        return cast(dict[str, Any], body)

    def _note_duplicate(self, body: dict[str, Any]) -> str | None:
        """The send's correlation id (else message_metadata); counts a repeat."""
        correlation = body.get("correlation_id") or body.get("message_metadata")
        if not isinstance(correlation, str):
            return None
        if correlation in self.accepted_ids:
            self.duplicates += 1
            ids = self.duplicate_ids
            if len(ids) < MAX_DUPLICATE_IDS and correlation not in ids:
                ids.append(correlation)
        return correlation

    def _admit(
        self,
        app_id: str,
        app: _AppState,
        project_id: str,
        project: _ProjectState,
        now: float,
        basic: bool,
    ) -> web.Response | None:
        """The first limit or injected fault that refuses the send, else None."""
        settings = self.settings
        project_cap = max(1, int(settings.project_limit(project_id)))
        if project.calls.count(now) >= project_cap:
            wait = project.calls.wait_s(now, project_cap)
            return self._too_many("project", "Project rate limit exceeded.", wait)
        if settings.strict:
            app_cap = max(1, int(settings.app_limit(app_id)))
            if app.accepted.count(now) >= app_cap:
                wait = app.accepted.wait_s(now, app_cap)
                return self._too_many("app", "App rate limit exceeded.", wait)
        else:
            wait = app.queue.wait_s(now, settings.drain_rate(app_id), settings.queue_size)
            if wait > 0.0:
                return self._too_many("app", "App ingress queue is full.", wait)
        if basic:
            basic_cap = max(1, int(settings.basic_auth_rate))
            if project.basic.count(now) >= basic_cap:
                wait = project.basic.wait_s(now, basic_cap)
                return self._too_many("basic", "Basic authentication rate limit exceeded.", wait)
        if settings.error_rate > 0.0 and self.rng.random() < settings.error_rate:
            if self.rng.random() < 0.5:
                return self._error("send", 500, "INTERNAL", "Internal error (injected).")
            return self._error("send", 503, "UNAVAILABLE", "Service unavailable (injected).")
        return None

    def _accept(
        self,
        app_id: str,
        app: _AppState,
        project_id: str,
        project: _ProjectState,
        now: float,
        basic: bool,
        body: dict[str, Any],
        correlation: str | None,
    ) -> tuple[str, str]:
        """Commit every window and counter (before any await); the id and time."""
        settings = self.settings
        project.accepted.add(now)
        project.calls.add(now)
        app.accepted.add(now)
        if basic:
            project.basic.add(now)
        message_id, accepted_time = self.stamper.stamp()
        self.accepted_total += 1
        project.accepted_total += 1
        app.accepted_total += 1
        per_app = self.metrics.accepted
        per_app[app.label] = per_app.get(app.label, 0) + 1
        self.accepted_log.append((message_id, app_id, correlation, accepted_time, project_id))
        if correlation is not None:
            if correlation in self.accepted_ids:
                self.duplicates_accepted += 1
            else:
                self.accepted_ids.add(correlation)
        mode = settings.processing_mode_of(app_id)
        if body.get("processing_strategy") == "DISPATCH_ONLY":
            mode = "DISPATCH"
        if settings.strict:
            self.callbacks.message_accepted(now, app_id, message_id, accepted_time, body, mode)
        else:
            # Reports are timed by the queue: QUEUED_ON_CHANNEL once the message leaves.
            wanted = self.callbacks.report_url(body) is not None
            item = (app_id, message_id, accepted_time, body, mode) if wanted else None
            if app.queue.push(item):
                self.departures.watch(app.queue, now)
        return message_id, accepted_time

    def _left(self, item: tuple[str, str, str, dict[str, Any], ProcessingMode]) -> None:
        now = asyncio.get_running_loop().time()
        self.callbacks.message_accepted(now, *item)

    def _app(self, app_id: str, now: float) -> _AppState:
        app = self.apps.get(app_id)
        if app is None:
            app = self.apps[app_id] = _AppState(app_id, now, self.metrics.app_label(app_id))
        return app

    def _bad_request(
        self, violations: list[dict[str, str]], reason: str | None = None
    ) -> web.Response:
        # One count per refused send, by the top-level field of its first violation.
        if reason is None:
            reason = violations[0]["field"].split(".", 1)[0].split("[", 1)[0] or "body"
        self.invalid[reason] = self.invalid.get(reason, 0) + 1
        detail = {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "field_violations": violations,
        }
        message = violations[0]["description"]
        return self._error("send", 400, "INVALID_ARGUMENT", message, details=[detail])

    async def _wait_if_held(self, app_id: str) -> None:
        while self.hold_all or app_id in self.held_apps:
            self.held += 1
            try:
                await self._release.wait()
            finally:
                self.held -= 1

    # -- state the control API reads and changes (gateway.simulator.controls) -----

    def snapshot(self) -> dict[str, Any]:
        """The ``/_sim/stats`` document (see :func:`gateway.simulator.controls.snapshot`)."""
        return snapshot(self)

    def queue_sizes(self) -> dict[str, int]:
        """Messages waiting in each app's ingress queue now (none in strict mode)."""
        if self.settings.strict:
            return {}
        now = asyncio.get_running_loop().time()
        rate = self.settings.drain_rate
        return {a: s.queue.size(now, rate(a)) for a, s in self.apps.items()}

    def reconfigure(self, settings: SimulatorSettings) -> None:
        """Switch to ``settings``; queues drain at the old rates up to now."""
        now = asyncio.get_running_loop().time()
        for app_id, state in self.apps.items():
            state.queue.leaky.drain(now, self.settings.drain_rate(app_id))
        self.settings = settings
        self.departures.rates_changed(now)
        self.callbacks.failed_fraction = settings.callback_failed_fraction

    def reset(self) -> None:
        """What ``/_sim/reset`` clears (see the module docstring)."""
        self._reset_counters()
        self.token_requests = 0
        self.callbacks.reset_counts()

    def hold(self, app_id: str | None) -> None:
        """Hold the sends of ``app_id``, or of every app when None."""
        if app_id is None:
            self.hold_all = True
        else:
            self.held_apps.add(app_id)

    def release(self, app_id: str) -> None:
        """Stop holding ``app_id`` (a hold of every app stays)."""
        self.held_apps.discard(app_id)
        self._wake_held()

    def release_all(self) -> None:
        """Stop holding anything and wake every held send."""
        self.hold_all = False
        self.held_apps.clear()
        self._wake_held()

    def _wake_held(self) -> None:
        # Held sends re-check their condition; a fresh event serves the next hold.
        self._release.set()
        self._release = asyncio.Event()


SIMULATOR_KEY: Final = web.AppKey("sinch_simulator", Simulator)
REGISTRY_KEY: Final = web.AppKey("sinch_simulator_registry", CollectorRegistry)


async def _lifecycle(app: web.Application) -> Any:
    sim = app[SIMULATOR_KEY]
    async with sim.callbacks:
        await sim.departures.start()
        try:
            yield
        finally:
            await sim.departures.stop()


async def _on_shutdown(app: web.Application) -> None:
    app[SIMULATOR_KEY].release_all()


def make_app(
    settings: SimulatorSettings, registry: CollectorRegistry | None = None
) -> web.Application:
    """Build the simulator application; ``registry`` defaults to a fresh one."""
    registry = registry if registry is not None else CollectorRegistry()
    sim = Simulator(settings, registry)
    # Larger bodies are read no further and refused with Sinch's 400 (see _read_send).
    app = web.Application(client_max_size=settings.max_request_bytes)
    app[SIMULATOR_KEY] = sim
    app[REGISTRY_KEY] = registry
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_post("/oauth2/token", sim.token)
    app.router.add_post("/v1/projects/{project_id}/messages:send", sim.send)
    app.router.add_post("/{region:us|eu|br}/v1/projects/{project_id}/messages:send", sim.send)
    app.router.add_get("/v1/projects/{project_id}/apps/{app_id}", sim.get_app)
    app.router.add_get("/{region:us|eu|br}/v1/projects/{project_id}/apps/{app_id}", sim.get_app)
    controls = Controls(sim)
    app.router.add_get("/_sim/stats", controls.stats)
    app.router.add_get("/_sim/accepted", controls.accepted)
    app.router.add_post("/_sim/config", controls.config)
    app.router.add_post("/_sim/hold", controls.hold)
    app.router.add_post("/_sim/release", controls.release)
    app.router.add_post("/_sim/expire-tokens", controls.expire_tokens)
    app.router.add_post("/_sim/reset", controls.reset)
    app.router.add_post("/_sim/inbound", controls.inbound)
    app.router.add_get("/metrics", controls.metrics_view)
    return app
