"""Drives one request to a terminal outcome: sent, failed, expired or rejected.

One call of :meth:`Delivery.attempt` is one try. A retriable answer puts the
request back in its lane with a due time (so it takes rate-limit slots again and
never blocks the partition); a terminal one writes the result (and the DLQ
record) and, once Kafka has acknowledged them, calls ``on_finished`` so the
offset can be committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway.envelope import Request, Status, result_record
from gateway.errors import AuthError, SinchError, TransportError
from gateway.retry import Action, Decision, backoff_s, classify
from gateway.settings import Settings
from gateway.sinch import SinchClient
from gateway.tokens import TokenSource

if TYPE_CHECKING:
    from gateway.dedupe import RecentIds
    from gateway.lanes import Lane
    from gateway.metrics import Metrics
    from gateway.producer import Headers, Publisher

log = logging.getLogger(__name__)

# (topic, value, headers, key); key None means the request_id
Output = tuple[str, bytes | None, "Headers | None", bytes | None]


class RateFeedback(Protocol):
    """Told about every answer so that buckets can adapt to the real limits."""

    def on_answer(self, lane: Lane, status: int | None) -> None: ...


def status_class(status: int | None) -> str:
    if status is None:
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


def dlq_headers(
    reason: str,
    *,
    http_status: int | None = None,
    attempts: int = 0,
    first_error_at: float | None = None,
    last_error_at: float | None = None,
    detail: str = "",
    source: tuple[str, int, int] | None = None,
) -> Headers:
    headers: Headers = [("gateway.reason", reason.encode())]
    if detail:
        headers.append(("gateway.detail", detail[:512].encode()))
    if http_status is not None:
        headers.append(("gateway.http_status", str(http_status).encode()))
    headers.append(("gateway.attempts", str(attempts).encode()))
    if first_error_at is not None:
        headers.append(("gateway.first_error_time", f"{first_error_at:.3f}".encode()))
    if last_error_at is not None:
        headers.append(("gateway.last_error_time", f"{last_error_at:.3f}".encode()))
    if source is not None:
        topic, partition, offset = source
        headers.append(("gateway.source", f"{topic}/{partition}/{offset}".encode()))
    return headers


class Delivery:
    """Attempts sends and turns their answers into outcomes."""

    def __init__(
        self,
        *,
        settings: Settings,
        sinch: SinchClient,
        tokens: TokenSource,
        publisher: Publisher,
        metrics: Metrics,
        sent_ids: RecentIds,
        clock: Callable[[], float],
        on_finished: Callable[[Request], None],
        feedback: RateFeedback | None = None,
        on_auth_refused: Callable[[str], None] | None = None,
        on_sent: Callable[[str, str], None] | None = None,
    ) -> None:
        self._s = settings
        self._sinch = sinch
        self._tokens = tokens
        self._pub = publisher
        self._m = metrics
        self._sent_ids = sent_ids
        self._clock = clock
        self._on_finished = on_finished
        self.feedback = feedback
        self._on_auth_refused = on_auth_refused
        self._on_sent = on_sent
        self.app_pause_s = 30.0
        self.auth_hold_until = 0.0

    async def gate(self) -> None:
        """Wait until sending may go on: credentials accepted and a token at hand."""
        while True:
            hold = self.auth_hold_until - self._clock()
            if hold > 0:
                await asyncio.sleep(hold)
                continue
            try:
                await self._tokens.authorization()
                return
            except AuthError:
                await asyncio.sleep(min(1.0, self._s.backoff_base_s))

    async def attempt(self, req: Request, lane: Lane) -> None:
        s = self._s
        req.attempts += 1
        header = ""
        status: int | None = None
        started = self._clock()
        try:
            header = await self._tokens.authorization()
            accepted = await self._sinch.send(
                region=req.region or s.app_region(req.app_id),
                project_id=req.project_id or s.project_id,
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
            decision = classify(exc, retry_in_doubt=s.retry_in_doubt, renewed=req.renewed)
            await self._after_error(req, lane, exc, decision, header)
            return
        now = self._clock()
        self._m.responses.labels("2xx").inc()
        self._m.sinch_latency.observe(now - started)
        if self.feedback is not None:
            self.feedback.on_answer(lane, 200)
        if req.timestamp_ms:
            self._m.e2e.observe(max(0.0, time.time() - req.timestamp_ms / 1000))
        self._sent_ids.add(req.request_id)
        own = req.payload.get("correlation_id")
        if self._on_sent is not None and own and own != req.request_id:
            # delivery reports carry the correlation_id; only a producer's own one
            # needs the message_id -> request_id map to find the request
            self._on_sent(req.request_id, accepted.message_id)
        record = result_record(
            request_id=req.request_id,
            status=Status.SENT,
            app_id=req.app_id,
            attempts=req.attempts,
            http_status=200,
            message_id=accepted.message_id,
            accepted_time=accepted.accepted_time,
            timings={
                "queued_s": round(started - req.received_at, 6),
                "sinch_s": round(now - started, 6),
            },
            partition=req.partition,
            offset=req.offset,
        )
        status_doc = orjson.dumps(
            {
                "request_id": req.request_id,
                "message_id": accepted.message_id,
                "status": "sent",
                "app_id": req.app_id,
                "event_time": accepted.accepted_time,
            }
        )
        await self._finish(
            req,
            Status.SENT,
            [(s.results_topic, record, None, None), (s.status_topic, status_doc, None, None)],
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
        if action is Action.RETRY:
            elapsed = now - req.received_at
            if req.attempts >= self._s.max_attempts or elapsed >= self._s.max_retry_time_s:
                await self.fail(req, "retries_exhausted", exc)
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
                await self._tokens.renew(header)
            lane.put_retry(req, now)
        elif action is Action.PAUSE_APP:
            if now - req.received_at >= self._s.max_retry_time_s:
                await self.fail(req, decision.reason, exc)  # still refused: give up on it
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
        elif action is Action.PAUSE_AUTH:
            # credentials refused even with a fresh token: hold every lane, not the DLQ
            req.attempts -= 1
            req.renewed = False
            if self.auth_hold_until <= now:
                self.auth_hold_until = now + self._s.backoff_max_s
                if self._on_auth_refused is not None:
                    self._on_auth_refused(decision.reason)
                with contextlib.suppress(AuthError):
                    await self._tokens.renew(header)
            lane.put_retry(req, now)
        else:
            await self.fail(req, decision.reason, exc)

    async def fail(self, req: Request, reason: str, exc: Exception | None) -> None:
        """Terminal failure: the original record to the DLQ and a ``failed`` result."""
        status = exc.status if isinstance(exc, SinchError) else None
        error: Any = exc.error if isinstance(exc, SinchError) else {"message": str(exc or reason)}
        s = self._s
        headers = dlq_headers(
            reason,
            http_status=status,
            attempts=req.attempts,
            first_error_at=req.first_error_at,
            last_error_at=req.last_error_at,
            detail=orjson.dumps(error).decode() if error else "",
            source=(s.requests_topic, req.partition, req.offset),
        )
        self._m.dlq.labels(reason).inc()
        record = result_record(
            request_id=req.request_id,
            status=Status.FAILED,
            app_id=req.app_id,
            attempts=req.attempts,
            http_status=status,
            error=error,
            partition=req.partition,
            offset=req.offset,
        )
        log.warning("request_id=%s failed: %s", req.request_id, reason)
        await self._finish(
            req,
            Status.FAILED,
            [(s.dlq_topic, req.raw, headers, req.key), (s.results_topic, record, None, None)],
        )

    async def expire(self, req: Request) -> None:
        record = result_record(
            request_id=req.request_id,
            status=Status.EXPIRED,
            app_id=req.app_id,
            attempts=req.attempts,
            error={"message": "expire_at passed before sending"},
            partition=req.partition,
            offset=req.offset,
        )
        await self._finish(req, Status.EXPIRED, [(self._s.results_topic, record, None, None)])

    async def _finish(self, req: Request, status: Status, records: list[Output]) -> None:
        futures = []
        for topic, value, headers, key in records:
            key = key if key is not None else req.request_id.encode()
            futures.append(await self._pub.send(topic, value, key=key, headers=headers))
        acks = await asyncio.gather(*futures, return_exceptions=True)
        failed = next((a for a in acks if isinstance(a, BaseException)), None)
        if failed is not None:
            # the record stays unfinished, so its offset is never committed: after a
            # restart or rebalance it is read and sent again (at-least-once)
            log.error(
                "request_id=%s: Kafka did not take its %s record (%s); not committed",
                req.request_id,
                status.value,
                type(failed).__name__,
            )
            return
        self._m.outcomes.labels(self._m.app_label(req.app_id), status.value).inc()
        self._on_finished(req)
