"""Signed Sinch callbacks in, Kafka out.

``POST /webhooks/sinch`` checks, in this order: body size (413), the three
signature headers (401), the timestamp window (401), the signature, as the
official SDKs compute it: base64 HMAC-SHA256 of ``body.nonce.timestamp`` with
the webhook secret, compared in constant time, the current or the previous
secret during a rotation (401), a nonce already seen within the window (401,
replay), and a JSON object body (400). A verified callback is published to
the events topic, keyed by app_id, body unchanged; the answer is 200 only once
Kafka acknowledged it (503 otherwise, so Sinch retries).

Delivery reports are also turned into records of the status topic keyed by the
gateway's ``request_id``: the message_id → request_id map is filled when a send
is accepted, and the report's ``correlation_id`` (which the gateway sets to the
request_id) covers what the map no longer holds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiokafka.errors import KafkaError

from gateway.settings import Secret, Settings

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.producer import Publisher

log = logging.getLogger(__name__)

SIGNATURE = "x-sinch-webhook-signature"
NONCE = "x-sinch-webhook-signature-nonce"
TIMESTAMP = "x-sinch-webhook-signature-timestamp"

# The field that carries each callback's content, and the trigger it stands for.
TRIGGERS = {
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
DELIVERY_STATUSES = frozenset(
    {"QUEUED_ON_CHANNEL", "DELIVERED", "READ", "FAILED", "SWITCHING_CHANNEL"}
)


def sign(secret: str, body: bytes, nonce: str, timestamp: str) -> str:
    """The signature Sinch puts in ``x-sinch-webhook-signature``."""
    signed = body + b"." + nonce.encode() + b"." + timestamp.encode()
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class BoundedTtlMap:
    """key → (value, expiry) with an entry cap; the oldest entries go first."""

    __slots__ = ("_clock", "_items", "_size", "_ttl")

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._size = size
        self._ttl = ttl_s
        self._clock = clock

    def put(self, key: str, value: str) -> None:
        items = self._items
        items[key] = (value, self._clock() + self._ttl)
        items.move_to_end(key)
        while len(items) > self._size:
            items.popitem(last=False)

    def get(self, key: str) -> str | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        if entry[1] < self._clock():
            del self._items[key]
            return None
        return entry[0]

    def __len__(self) -> int:
        return len(self._items)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


class WebhookReceiver:
    """Verifies callbacks and publishes them; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        nonce_cache_size: int = 1_000_000,
    ) -> None:
        self._s = settings
        self._m = metrics
        self._clock = clock
        self._secrets = [
            s.reveal().encode()
            for s in (settings.webhook_secret, settings.webhook_secret_previous)
            if isinstance(s, Secret) and s
        ]
        self._nonces = BoundedTtlMap(nonce_cache_size, settings.webhook_max_age_s * 2, clock)
        self._sent = BoundedTtlMap(settings.status_map_size, settings.status_map_ttl_s, clock)
        self._publisher: Publisher | None = None

    def attach(self, publisher: Publisher) -> None:
        """Start publishing (until then the webhook answers 503)."""
        self._publisher = publisher

    def record_sent(self, request_id: str, message_id: str) -> None:
        self._sent.put(message_id, request_id)

    def _verify(self, body: bytes, headers: Any) -> str | None:
        """None if the signature checks out, else why not."""
        signature = headers.get(SIGNATURE)
        nonce = headers.get(NONCE)
        timestamp = headers.get(TIMESTAMP)
        if not signature or not nonce or not timestamp:
            return "missing signature headers"
        try:
            ts = int(timestamp)
        except ValueError:
            return "bad timestamp"
        if abs(self._clock() - ts) > self._s.webhook_max_age_s:
            return "timestamp outside the accepted window"
        try:
            given = base64.b64decode(signature, validate=True)
        except ValueError:
            return "bad signature"
        signed = body + b"." + nonce.encode() + b"." + timestamp.encode()
        if not any(
            hmac.compare_digest(hmac.new(secret, signed, hashlib.sha256).digest(), given)
            for secret in self._secrets
        ):
            return "bad signature"
        if self._nonces.get(nonce) is not None:
            return "nonce replayed"
        self._nonces.put(nonce, timestamp)
        return None

    async def handle(self, request: web.Request) -> web.Response:
        limit = self._s.webhook_max_body_bytes
        if not self._secrets:
            self._m.webhook_events.labels("unknown", "disabled").inc()
            return _error(503, "webhook secret not configured")
        if request.content_length is not None and request.content_length > limit:
            self._m.webhook_events.labels("unknown", "too_large").inc()
            return _error(413, "body too large")
        body = await request.content.read(limit + 1)
        if len(body) > limit:
            self._m.webhook_events.labels("unknown", "too_large").inc()
            return _error(413, "body too large")
        problem = self._verify(body, request.headers)
        if problem is not None:
            self._m.webhook_events.labels("unknown", "unauthorized").inc()
            return _error(401, problem)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            self._m.webhook_events.labels("unknown", "bad_request").inc()
            return _error(400, "body is not a JSON object")
        trigger = next((t for key, t in TRIGGERS.items() if key in doc), "UNKNOWN")
        publisher = self._publisher
        if publisher is None:
            self._m.webhook_events.labels(trigger, "unavailable").inc()
            return _error(503, "not ready")
        try:
            await self._publish(publisher, doc, body, trigger)
        except (KafkaError, OSError) as exc:
            self._m.webhook_events.labels(trigger, "kafka_error").inc()
            log.warning("webhook event not published (%s): answering 503", type(exc).__name__)
            return _error(503, "event not stored; retry later")
        self._m.webhook_events.labels(trigger, "published").inc()
        return web.json_response({"status": "ok"})

    async def _publish(
        self, publisher: Publisher, doc: dict[str, Any], body: bytes, trigger: str
    ) -> None:
        s = self._s
        app_id = doc.get("app_id") if isinstance(doc.get("app_id"), str) else ""
        content = doc.get(next((k for k in TRIGGERS if k in doc), ""), None)
        content = content if isinstance(content, dict) else {}
        message_id = content.get("message_id") or content.get("id") or ""
        correlation = doc.get("correlation_id") or ""
        headers = [("sinch.trigger", trigger.encode())]
        if message_id:
            headers.append(("sinch.message_id", str(message_id).encode()))
        if correlation:
            headers.append(("sinch.correlation_id", str(correlation).encode()))
        futures = [await publisher.send(s.events_topic, body, key=app_id.encode(),
                                        headers=headers)]  # fmt: skip
        status = content.get("status")
        if trigger == "MESSAGE_DELIVERY" and status in DELIVERY_STATUSES:
            request_id = self._sent.get(str(message_id)) or (
                correlation if isinstance(correlation, str) else ""
            )
            if request_id:
                record = orjson.dumps(
                    {
                        "request_id": request_id,
                        "message_id": message_id,
                        "status": status,
                        "app_id": app_id,
                        "event_time": doc.get("event_time"),
                        "reason": content.get("reason"),
                        "channel": (content.get("channel_identity") or {}).get("channel"),
                    }
                )
                futures.append(
                    await publisher.send(s.status_topic, record, key=request_id.encode())
                )
        for fut in futures:
            await fut
