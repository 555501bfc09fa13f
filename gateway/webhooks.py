"""Signed Sinch callbacks in, Kafka out.

``POST /webhooks/sinch`` checks, in this order: body size (413), the three
signature headers (401), the timestamp window (401), the signature, as the
official SDKs compute it: base64 HMAC-SHA256 of ``body.nonce.timestamp`` with
the webhook secret, compared in constant time (401), a JSON object body (400),
and a nonce already seen within the window (401, replay).

Nonces: each replica remembers the nonces it accepted (``webhook_nonce_cache_size``
at most). With ``redis_url`` set, a nonce is also claimed in Redis with ``SET
<prefix><nonce> 1 NX EX <2 x webhook_max_age_s>``, so a replay sent to another
replica is refused too. Redis unreachable: the replica's own cache decides alone
(logged once, counted in ``gateway_webhook_nonce_fallbacks``), and Redis is
asked again after a few seconds; a replay of a nonce accepted meanwhile is then
refused only by the replica that accepted it.

Secrets: a Sinch app has up to 5 webhooks, each with its own secret. The
callback's ``app_id`` (in its body) selects the secrets of that app
(``webhook_secrets``), tried first; ``webhook_secret`` and
``webhook_secret_previous`` (a rotation) are tried for every callback after
them. A secret of another app never verifies a callback. No secret is logged.

A verified callback is published to the events topic, keyed by app_id, body
unchanged, with the trigger, message_id and correlation_id in headers; the
answer is 200 only once Kafka acknowledged it (503 otherwise, so Sinch retries).
A nonce is held while its event is being published and kept only if that
succeeded, so a retry of a 503 is accepted and a concurrent copy is not. A
publish that Kafka has not acknowledged within ``publish_timeout_s`` answers 503
even if the record lands later: Sinch then sends the callback again
(at-least-once).

Delivery reports are also turned into records of the status topic keyed by the
gateway's ``request_id``: the message_id → request_id map is filled when a send
is accepted, and the report's ``correlation_id`` (which the gateway sets to the
request_id when the producer left it empty) covers what the map does not hold:
a report that overtook the send's answer, one received by another replica, or
one older than ``status_map_ttl_s``. ``matched_by`` in the record says which.
A correlation_id that is a digest (``gw:<hex>``, for a request_id longer than
Sinch's 128 characters) names no request: when the map misses, the record has
``request_id: null``, is keyed by its message_id (the results topic has it) with
``matched_by: "none"``, and the callback counts as ``unmatched`` in
``gateway_webhook_events_total``.
Reports are published in the order they arrive; ``event_time`` orders them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson
from aiohttp import web
from aiokafka.errors import KafkaError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.envelope import request_id_in
from gateway.settings import Secret, Settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from prometheus_client import Counter

    from gateway.metrics import Metrics
    from gateway.producer import Publisher

log = logging.getLogger(__name__)

SIGNATURE: Final = "x-sinch-webhook-signature"
NONCE: Final = "x-sinch-webhook-signature-nonce"
TIMESTAMP: Final = "x-sinch-webhook-signature-timestamp"

# The field that carries each callback's content, and the trigger it stands for.
TRIGGERS: Final = {
    "message_delivery_report": "MESSAGE_DELIVERY",
    "message": "MESSAGE_INBOUND",
    "event": "EVENT_INBOUND",
    "event_delivery_report": "EVENT_DELIVERY",
    "message_submit_notification": "MESSAGE_SUBMIT",
    "conversation_start_notification": "CONVERSATION_START",
    "conversation_stop_notification": "CONVERSATION_STOP",
    "conversation_delete_notification": "CONVERSATION_DELETE",
    "contact_create_notification": "CONTACT_CREATE",
    "contact_delete_notification": "CONTACT_DELETE",
    "contact_merge_notification": "CONTACT_MERGE",
    "contact_update_notification": "CONTACT_UPDATE",
    "contact_identities_duplication_notification": "CONTACT_IDENTITIES_DUPLICATION",
    "capability_notification": "CAPABILITY",
    "opt_in_notification": "OPT_IN",
    "opt_out_notification": "OPT_OUT",
    "channel_event_notification": "CHANNEL_EVENT",
    "unsupported_callback": "UNSUPPORTED",
    "smart_conversation_notification": "SMART_CONVERSATIONS",
    "message_inbound_smart_conversation_redaction": "MESSAGE_INBOUND_SMART_CONVERSATION_REDACTION",
    "record_notification": "RECORD_NOTIFICATION",
}
DELIVERY_STATUSES: Final = frozenset(
    {"QUEUED_ON_CHANNEL", "DELIVERED", "READ", "FAILED", "SWITCHING_CHANNEL"}
)
# Sinch nonces are 26-character ULIDs and timestamps unix seconds; anything far
# longer is not a callback, and a long nonce would only bloat the replay cache.
_MAX_NONCE: Final = 256
_MAX_TIMESTAMP: Final = 12
_OK: Final = b'{"status":"ok"}'
NONCE_PREFIX: Final = "sinch-gateway:nonce:"
# after Redis failed to answer, nonces are checked locally only for this long
_REDIS_RETRY_S: Final = 5.0


def sign(secret: str, body: bytes, nonce: str, timestamp: str) -> str:
    """The signature Sinch puts in ``x-sinch-webhook-signature``."""
    signed = body + b"." + nonce.encode() + b"." + timestamp.encode()
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class BoundedTtlMap:
    """key → value for ``ttl_s``, at most ``size`` entries, the oldest going first.

    Entries are kept in insertion order, which is expiry order (one TTL for all),
    so each ``put`` drops the expired ones from the front: memory follows the
    rate times the TTL, and ``size`` only caps it.
    """

    __slots__ = ("_clock", "_items", "_size", "_ttl")

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._size = size
        self._ttl = ttl_s
        self._clock = clock

    def put(self, key: str, value: str) -> None:
        items = self._items
        now = self._clock()
        items[key] = (value, now + self._ttl)
        items.move_to_end(key)
        while items:
            oldest = next(iter(items.values()))
            if oldest[1] >= now and len(items) <= self._size:
                break
            items.popitem(last=False)

    def get(self, key: str) -> str | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        if entry[1] < self._clock():
            del self._items[key]
            return None
        return entry[0]

    def discard(self, key: str) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


def nonce_redis(settings: Settings) -> aioredis.Redis | None:
    """The client of the shared nonce cache when ``redis_url`` is set; the caller closes it.

    No retries inside the client: a callback must not wait for Redis, the local cache
    answers meanwhile.
    """
    if settings.redis_url is None:
        return None
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(
        settings.redis_url.reveal(),
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


Claim = Literal["replay", "local", "shared"]


class Nonces:
    """Nonces seen within their window: in this replica, and in Redis for the group.

    ``claim`` holds a new nonce (where: ``local`` or also ``shared``) or says
    ``replay``; ``release`` forgets a held one (its event was not stored, so the
    retry must be accepted).
    """

    __slots__ = ("_down_since", "_local", "_on_fallback", "_prefix", "_redis", "_ttl")

    def __init__(
        self,
        local: BoundedTtlMap,
        ttl_s: float,
        redis: aioredis.Redis | None,
        *,
        prefix: str = NONCE_PREFIX,
        on_fallback: Callable[[], None] = lambda: None,
    ) -> None:
        self._local = local
        self._ttl = max(1, math.ceil(ttl_s))
        self._redis = redis
        self._prefix = prefix
        self._on_fallback = on_fallback
        self._down_since: float | None = None  # loop time of the failure, while down

    def __len__(self) -> int:
        return len(self._local)

    async def claim(self, nonce: str) -> Claim:
        local = self._local
        if local.get(nonce) is not None:
            return "replay"
        # held here before Redis is asked: a concurrent copy on this replica is a replay
        local.put(nonce, "")
        redis = self._redis
        if redis is None:
            return "local"
        now = asyncio.get_running_loop().time()
        down = self._down_since
        if down is not None and now - down < _REDIS_RETRY_S:
            self._on_fallback()
            return "local"
        try:
            fresh = await redis.set(self._prefix + nonce, b"1", nx=True, ex=self._ttl)
        except (RedisError, OSError) as exc:
            if down is None:
                log.warning(
                    "webhook nonces: redis unreachable (%s): checking replays in this "
                    "replica only until it answers",
                    type(exc).__name__,
                )
            self._down_since = now
            self._on_fallback()
            return "local"
        if down is not None:
            self._down_since = None
            log.info("webhook nonces: redis answers again, replays checked group-wide")
        if not fresh:
            local.discard(nonce)  # held by another replica, which may yet release it
            return "replay"
        return "shared"

    async def release(self, nonce: str, claim: Claim) -> None:
        self._local.discard(nonce)
        if claim == "shared" and self._redis is not None:
            try:
                await self._redis.delete(self._prefix + nonce)
            except (RedisError, OSError):
                log.warning("webhook nonces: a released nonce stays in redis until it expires")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


class WebhookReceiver:
    """Verifies callbacks and publishes them; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        publish_timeout_s: float = 10.0,
        redis: aioredis.Redis | None = None,
        nonce_prefix: str = NONCE_PREFIX,
    ) -> None:
        """``redis``: the group's nonce cache (:func:`nonce_redis`), owned by the caller."""
        self._s = settings
        self._m = metrics
        self._clock = clock
        self._max_age = settings.webhook_max_age_s
        self._limit = settings.webhook_max_body_bytes
        self._publish_timeout = publish_timeout_s
        self._secrets = tuple(
            s.reveal().encode()
            for s in (settings.webhook_secret, settings.webhook_secret_previous)
            if isinstance(s, Secret) and s
        )
        self._app_secrets = {
            app_id: tuple(s.reveal().encode() for s in secrets) + self._secrets
            for app_id, secrets in settings.webhook_secrets.items()
        }
        # A timestamp is accepted up to max_age after it, and it can arrive up
        # to max_age before it: a nonce must be remembered that long after receipt.
        # Past webhook_nonce_cache_size the oldest go first (memory stays bounded).
        local = BoundedTtlMap(settings.webhook_nonce_cache_size, 2 * self._max_age, clock)
        self._nonces = Nonces(
            local,
            2 * self._max_age,
            redis,
            prefix=nonce_prefix,
            on_fallback=metrics.webhook_nonce_fallbacks.inc,
        )
        metrics.webhook_nonces.set_function(self._nonces.__len__)
        self._sent = BoundedTtlMap(settings.status_map_size, settings.status_map_ttl_s, clock)
        self._publisher: Publisher | None = None
        self._counters: dict[tuple[str, str], Counter] = {}

    def attach(self, publisher: Publisher) -> None:
        """Start publishing (until then the webhook answers 503)."""
        self._publisher = publisher

    def record_sent(self, request_id: str, message_id: str) -> None:
        """Remember which request a message_id answers, for the status topic."""
        self._sent.put(message_id, request_id)

    def _count(self, trigger: str, result: str) -> None:
        counter = self._counters.get((trigger, result))
        if counter is None:
            counter = self._m.webhook_events.labels(trigger, result)
            self._counters[trigger, result] = counter
        counter.inc()

    def _check_headers(self, headers: Mapping[str, str]) -> str | None:
        """None if the signature headers are usable and on time, else why not."""
        signature = headers.get(SIGNATURE)
        nonce = headers.get(NONCE)
        timestamp = headers.get(TIMESTAMP)
        if not signature or not nonce or not timestamp:
            return "missing signature headers"
        if len(timestamp) > _MAX_TIMESTAMP or not (timestamp.isascii() and timestamp.isdigit()):
            return "bad timestamp"
        if abs(self._clock() - int(timestamp)) > self._max_age:
            return "timestamp outside the accepted window"
        if len(nonce) > _MAX_NONCE:
            return "bad nonce"
        return None

    def _signed(self, body: bytes, headers: Mapping[str, str], app_id: str) -> bool:
        """True if one of the secrets of ``app_id`` (then the global ones) signed it."""
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: this gives
        # back the bytes that were signed, whatever they were.
        nonce, timestamp = headers[NONCE], headers[TIMESTAMP]
        signed = b"".join(
            (body, b".", nonce.encode("utf-8", "surrogateescape"), b".", timestamp.encode())
        )
        given = headers[SIGNATURE].encode("utf-8", "surrogateescape")
        for secret in self._app_secrets.get(app_id, self._secrets):
            expected = base64.b64encode(hmac.digest(secret, signed, "sha256"))
            if hmac.compare_digest(expected, given):
                return True
        return False

    async def _read(self, request: web.Request) -> bytes | None:
        """The body, or None when it is longer than the limit."""
        limit = self._limit
        length = request.content_length
        if length is not None and length > limit:
            return None
        content = request.content
        # A callback usually arrives with its headers: take what is buffered
        # without a suspension, and wait for more only if there is more.
        first = content.read_nowait()
        if content.at_eof():
            return first if len(first) <= limit else None
        chunks = [first]
        size = len(first)
        if size > limit:
            return None
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def handle(self, request: web.Request) -> web.Response:
        if not self._secrets and not self._app_secrets:
            self._count("unknown", "disabled")
            return _error(503, "webhook secret not configured")
        body = await self._read(request)
        if body is None:
            self._count("unknown", "too_large")
            return _error(413, "body too large")
        problem = self._check_headers(request.headers)
        if problem is not None:
            self._count("unknown", "unauthorized")
            return _error(401, problem)
        # The app is named in the body: parsed (at most webhook_max_body_bytes) before
        # the signature is checked, trusted only once it is.
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        app_id = _text(doc.get("app_id")) if isinstance(doc, dict) else ""
        if not self._signed(body, request.headers, app_id):
            self._count("unknown", "unauthorized")
            return _error(401, "bad signature")
        if not isinstance(doc, dict):
            self._count("unknown", "bad_request")
            return _error(400, "body is not a JSON object")
        field, trigger = next(((k, TRIGGERS[k]) for k in doc if k in TRIGGERS), ("", "UNKNOWN"))
        publisher = self._publisher
        if publisher is None:
            self._count(trigger, "unavailable")
            return _error(503, "not ready")
        nonce = request.headers[NONCE]
        claim = await self._nonces.claim(nonce)
        if claim == "replay":
            self._count(trigger, "replayed")
            return _error(401, "nonce replayed")
        try:
            async with asyncio.timeout(self._publish_timeout):
                result = await self._publish(publisher, doc, body, field, trigger)
        except (KafkaError, OSError, TimeoutError, RuntimeError) as exc:
            # RuntimeError: the publisher was stopped (shutdown) under us.
            await self._nonces.release(nonce, claim)
            self._count(trigger, "kafka_error")
            log.warning("webhook event not published (%s): answering 503", type(exc).__name__)
            return _error(503, "event not stored; retry later")
        self._count(trigger, result)
        return web.Response(body=_OK, content_type="application/json")

    async def _publish(
        self, publisher: Publisher, doc: dict[str, Any], body: bytes, field: str, trigger: str
    ) -> str:
        """Publish the event (and the report's status record); the result to count."""
        s = self._s
        app_id = _text(doc.get("app_id"))
        content = doc.get(field) if field else None
        if not isinstance(content, dict):
            content = {}
        message_id = _text(content.get("message_id")) or _text(content.get("id"))
        correlation = _text(doc.get("correlation_id"))
        headers = [("sinch.trigger", trigger.encode())]
        if message_id:
            headers.append(("sinch.message_id", message_id.encode()))
        if correlation:
            headers.append(("sinch.correlation_id", correlation.encode()))
        key = app_id.encode() if app_id else None
        futures = [await publisher.send(s.events_topic, body, key=key, headers=headers)]
        status = content.get("status")
        is_report = trigger == "MESSAGE_DELIVERY" and isinstance(status, str)
        result = "published"
        if is_report and status in DELIVERY_STATUSES:
            record = self._status_record(doc, content, app_id, message_id, correlation, str(status))
            if record is not None:
                status_key, value, matched = record
                futures.append(await publisher.send(s.status_topic, value, key=status_key.encode()))
                result = "published" if matched else "unmatched"
        for fut in futures:
            await fut
        return result

    def _status_record(
        self,
        doc: dict[str, Any],
        report: dict[str, Any],
        app_id: str,
        message_id: str,
        correlation: str,
        status: str,
    ) -> tuple[str, bytes, bool] | None:
        """(key, value, whether it names its request) of the status record, if any."""
        request_id = self._sent.get(message_id) if message_id else None
        matched_by = "message_id"
        if request_id is None:
            if not correlation:
                return None
            request_id = request_id_in(correlation)
            if request_id is None:  # a digest: only the map of the sender names it
                if not message_id:
                    return None
                matched_by = "none"
            else:
                matched_by = "correlation_id"
        identity = report.get("channel_identity")
        reason = report.get("reason")
        value = orjson.dumps(
            {
                "request_id": request_id,
                "message_id": message_id,
                "status": status,
                "app_id": app_id,
                "event_time": doc.get("event_time"),
                "channel": identity.get("channel") if isinstance(identity, dict) else None,
                "reason": reason if isinstance(reason, dict) else None,
                "matched_by": matched_by,
            }
        )
        return request_id or message_id, value, request_id is not None
