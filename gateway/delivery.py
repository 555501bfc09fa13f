"""Drives one request to a terminal outcome: sent, failed, expired.

One call of :meth:`Delivery.attempt` is one try. A retriable answer puts the
request back in its lane with a due time (so it takes rate-limit slots again and
never blocks the partition); a terminal one hands the request to
:class:`~gateway.outcomes.Outcomes`, which writes what it must and finishes it.

Refusals are held at the scope that caused them: a record that named its own
region or project and was refused fails alone; an app that Sinch does not know
(404) or refuses (403) holds its lane; a project refused (a project-wide 403,
or 403s from two apps at once) or credentials refused (401 after a renewal)
hold all sending, with ``/readyz`` false, and nothing is dead-lettered for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from gateway.envelope import MAX_CORRELATION_ID, Request
from gateway.errors import AuthError, GatewayError, SinchError, TransportError
from gateway.retry import Action, Decision, backoff_s, classify
from gateway.settings import Settings
from gateway.sinch import SinchClient
from gateway.tokens import TokenSource

if TYPE_CHECKING:
    from gateway.lanes import Lane
    from gateway.metrics import Metrics
    from gateway.outcomes import Outcomes

log = logging.getLogger(__name__)


class RateFeedback(Protocol):
    """Told about every answer so that buckets can adapt to the real limits."""

    def on_answer(self, lane: Lane, status: int | None) -> None: ...


def status_class(status: int | None) -> str:
    if status is None:
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


class Delivery:
    """Attempts sends and turns their answers into outcomes."""

    def __init__(
        self,
        *,
        settings: Settings,
        sinch: SinchClient,
        tokens: TokenSource | Mapping[str, TokenSource],
        outcomes: Outcomes,
        metrics: Metrics,
        clock: Callable[[], float],
        feedback: RateFeedback | None = None,
        on_hold: Callable[[str, str], None] | None = None,
        on_sent: Callable[[str, str], None] | None = None,
    ) -> None:
        self._s = settings
        self._sinch = sinch
        # one token source per Sinch project: an access key belongs to one project
        self._tokens: Mapping[str, TokenSource] = (
            tokens if isinstance(tokens, Mapping) else {settings.project_id: tokens}
        )
        self._outcomes = outcomes
        self._m = metrics
        self._answered_2xx = metrics.responses.labels("2xx")  # once, not per message
        self._clock = clock
        self.feedback = feedback
        self._on_hold = on_hold
        self._on_sent = on_sent
        self.app_pause_s = 30.0
        # project_id -> (held until, why): all sending of a project held
        self._holds: dict[str, tuple[float, str]] = {}
        self._forbidden: dict[tuple[str, str], float] = {}  # (project, app) -> last 403

    def project_of(self, req: Request) -> str:
        return req.project_id or self._s.project_id

    def tokens_for(self, project_id: str) -> TokenSource:
        return self._tokens.get(project_id) or self._tokens[self._s.project_id]

    async def gate(self, req: Request | None = None) -> None:
        """Wait until sending may go on: its project not held and a token at hand."""
        project = self.project_of(req) if req is not None else self._s.project_id
        while True:
            hold = self._hold_left(project)
            if hold > 0:
                await asyncio.sleep(hold)
                continue
            try:
                await self.tokens_for(project).authorization()
                return
            except AuthError:
                await asyncio.sleep(min(1.0, self._s.backoff_base_s))

    def ready(self, req: Request) -> bool:
        """True when :meth:`gate` would return at once: project not held, token valid."""
        project = self.project_of(req)
        return self._hold_left(project) <= 0 and self.tokens_for(project).is_valid()

    def _hold_left(self, project: str) -> float:
        """Seconds until all sending of ``project`` may go on again (<= 0: not held)."""
        return self._holds.get(project, (0.0, ""))[0] - self._clock()

    def held(self) -> str | None:
        """Why sending is held now (the first held project's reason), or None."""
        now = self._clock()
        for project, (until, reason) in self._holds.items():
            if until > now:
                return reason if project == self._s.project_id else f"{reason} ({project})"
        return None

    async def attempt(self, req: Request, lane: Lane) -> None:
        """One try. Never raises: whatever happens, the request is retried or ends."""
        req.attempts += 1
        started = self._clock()
        try:
            await self._try(req, lane, started)
        except Exception as exc:
            log.exception("request_id=%s: unexpected error; retrying", req.request_id)
            await self._after_error(req, lane, exc, Decision(Action.RETRY, "internal_error"), "")

    async def _try(self, req: Request, lane: Lane, started: float) -> None:
        s = self._s
        header = ""
        status: int | None = None
        region = req.region or s.app_region(req.app_id)
        project = self.project_of(req)
        tokens = self.tokens_for(project)
        try:
            header = await tokens.authorization()
            accepted = await self._sinch.send(
                region=region,
                project_id=project,
                body=req.body(time.time()),
                authorization=header,
            )
        except (SinchError, TransportError, AuthError) as exc:
            if isinstance(exc, SinchError):
                status = exc.status
            if not isinstance(exc, AuthError):
                self._m.responses.labels(status_class(status)).inc()
                self._m.sinch_latency.observe(self._clock() - started)
            if self.feedback is not None:
                self.feedback.on_answer(lane, status)
            decision = classify(
                exc,
                retry_in_doubt=s.retry_in_doubt,
                renewed=req.renewed,
                max_delay_s=s.backoff_max_s,
                own_region=req.region is not None and req.region != s.app_region(req.app_id),
                own_project=req.project_id is not None and req.project_id not in self._tokens,
            )
            await self._after_error(req, lane, exc, decision, header)
            return
        now = self._clock()
        self._answered_2xx.inc()
        self._m.sinch_latency.observe(now - started)
        if self.feedback is not None:
            self.feedback.on_answer(lane, 200)
        origin = req.origin
        if origin is not None and origin.timestamp_ms:
            self._m.e2e.observe(max(0.0, time.time() - origin.timestamp_ms / 1000))
        rid = req.request_id
        if (
            self._on_sent is not None
            and accepted.message_id is not None
            and (req.payload.get("correlation_id") or len(rid) > MAX_CORRELATION_ID)
        ):
            # delivery reports carry the correlation_id; only when it is not the
            # request_id itself does the message_id -> request_id map find the request
            self._on_sent(rid, accepted.message_id)
        self._outcomes.sent(
            req,
            message_id=accepted.message_id,
            accepted_time=accepted.accepted_time,
            timings={
                "queued_s": round(started - req.received_at, 6),
                "sinch_s": round(now - started, 6),
            },
        )

    async def _after_error(
        self, req: Request, lane: Lane, exc: Exception, decision: Decision, header: str
    ) -> None:
        now = self._clock()
        wall = time.time()
        if req.first_error_at is None:
            req.first_error_at = wall
        req.last_error_at = wall
        action = decision.action
        if isinstance(exc, TransportError) and exc.in_doubt:
            self._m.in_doubt.inc()
        if action is Action.PAUSE_APP and isinstance(exc, SinchError) and exc.status == 403:
            action = self._forbidden_app(self.project_of(req), req.app_id, now)
        if action is Action.RETRY:
            elapsed = now - req.received_at
            if req.attempts >= self._s.max_attempts or elapsed >= self._s.max_retry_time_s:
                self.fail(req, "retries_exhausted", exc)
                return
            delay = decision.retry_after_s
            if delay is None:
                delay = backoff_s(
                    req.attempts, base_s=self._s.backoff_base_s, cap_s=self._s.backoff_max_s
                )
            self._m.retries.labels(decision.reason).inc()
            lane.put_retry(req, now + delay)
        elif action is Action.RENEW:
            self._m.retries.labels("401").inc()
            req.renewed = True
            req.attempts -= 1  # an expired token is not the request's fault
            # on failure the next attempt meets the back-off of the token manager
            with contextlib.suppress(AuthError):
                await self.tokens_for(self.project_of(req)).renew(header)
            lane.put_retry(req, now)
        elif action is Action.PAUSE_APP:
            if now - req.received_at >= self._s.max_retry_time_s:
                self.fail(req, decision.reason, exc)  # still refused: give up on it
                return
            req.attempts -= 1
            if lane.paused_until <= now:
                log.error(
                    "app %s answered HTTP %s (%s): holding its lane for %.0f s",
                    lane.app_id,
                    getattr(exc, "status", "?"),
                    decision.reason,
                    min(self.app_pause_s, self._s.max_retry_time_s),
                )
            lane.pause(now + min(self.app_pause_s, self._s.max_retry_time_s), decision.reason)
            lane.put_retry(req, now)
        elif action in (Action.PAUSE_AUTH, Action.PAUSE_PROJECT):
            # refused for every app: hold all sending, never dead-letter for it
            req.attempts -= 1
            req.renewed = False
            reason = "project_refused" if action is Action.PAUSE_PROJECT else decision.reason
            project = self.project_of(req)
            if self._hold_left(project) <= 0:
                self._holds[project] = (now + self._s.backoff_max_s, reason)
                if self._on_hold is not None:
                    scope = "project" if action is Action.PAUSE_PROJECT else "auth"
                    self._on_hold(scope, f"{reason}, project {project}")
                if action is Action.PAUSE_AUTH:
                    with contextlib.suppress(AuthError):
                        await self.tokens_for(project).renew(header)
            lane.put_retry(req, now)
        else:
            self.fail(req, decision.reason, exc)

    def _forbidden_app(self, project: str, app_id: str, now: float) -> Action:
        """A 403 for one app; the same from a second app of its project at once: the project."""
        forbidden = self._forbidden
        forbidden[(project, app_id)] = now
        for other, at in list(forbidden.items()):
            if now - at > self.app_pause_s:
                del forbidden[other]
        apps = sum(1 for p, _ in forbidden if p == project)
        return Action.PAUSE_PROJECT if apps >= 2 else Action.PAUSE_APP

    def fail(self, req: Request, reason: str, exc: Exception | None) -> None:
        """Terminal failure: the original record to the DLQ and a ``failed`` result."""
        status = exc.status if isinstance(exc, SinchError) else None
        error: object
        if isinstance(exc, SinchError):
            error = exc.error
        elif isinstance(exc, GatewayError):
            error = {"message": str(exc)}
        else:  # an unexpected error's text may hold anything: its type only
            error = {"message": type(exc).__name__ if exc else reason}
        self._outcomes.failed(req, reason, http_status=status, error=error)

    def expire(self, req: Request) -> None:
        self._outcomes.expired(req)
