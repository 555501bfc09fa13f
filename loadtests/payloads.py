"""What the load test sends: send-request envelopes and signed Sinch callbacks.

Plain functions with no Locust import, so the tests can check them without gevent.
The signature is computed here independently of the gateway (as Sinch would), not
by calling ``gateway.webhooks.sign``; a test compares the two.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.cli import sample_request

SIGNATURE = "x-sinch-webhook-signature"
NONCE = "x-sinch-webhook-signature-nonce"
TIMESTAMP = "x-sinch-webhook-signature-timestamp"

_numbers = itertools.count()


def app_ids(count: int, prefix: str = "loadtest-app-") -> list[str]:
    return [f"{prefix}{i + 1}" for i in range(count)]


def send_request(app_id: str) -> tuple[str, bytes, bytes]:
    """(request_id, key, value) of one send request for ``app_id``."""
    doc = sample_request(app_id, next(_numbers))
    return doc["request_id"], app_id.encode(), orjson.dumps(doc)


def sign(secret: str, body: bytes, nonce: str, timestamp: str) -> str:
    """Base64 HMAC-SHA256 of ``body.nonce.timestamp``, as Sinch signs its callbacks."""
    message = b".".join((body, nonce.encode(), timestamp.encode()))
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def signed_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    nonce = uuid.uuid4().hex
    timestamp = str(int(time.time() if now is None else now))
    return {
        "content-type": "application/json",
        SIGNATURE: sign(secret, body, nonce, timestamp),
        NONCE: nonce,
        TIMESTAMP: timestamp,
    }


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def delivery_report(app_id: str, project_id: str = "demo-project") -> bytes:
    """A MESSAGE_DELIVERY callback for a message the gateway may never have sent."""
    now = _iso_now()
    return orjson.dumps(
        {
            "app_id": app_id,
            "accepted_time": now,
            "event_time": now,
            "project_id": project_id,
            "message_delivery_report": {
                "message_id": uuid.uuid4().hex.upper()[:26],
                "conversation_id": "",
                "status": "DELIVERED",
                "channel_identity": {"channel": "SMS", "identity": "46700000001", "app_id": ""},
                "contact_id": "",
                "metadata": "",
                "processing_mode": "DISPATCH",
            },
            "message_metadata": "",
            "correlation_id": str(uuid.uuid4()),
        }
    )


def inbound_message(app_id: str, project_id: str = "demo-project") -> bytes:
    """A MESSAGE_INBOUND callback: an SMS reply from a contact."""
    now = _iso_now()
    return orjson.dumps(
        {
            "app_id": app_id,
            "accepted_time": now,
            "event_time": now,
            "project_id": project_id,
            "message": {
                "id": uuid.uuid4().hex.upper()[:26],
                "direction": "TO_APP",
                "contact_message": {"text_message": {"text": "STOP"}},
                "channel_identity": {"channel": "SMS", "identity": "46700000001", "app_id": app_id},
                "conversation_id": "",
                "contact_id": "",
                "metadata": "",
                "accept_time": now,
                "processing_mode": "DISPATCH",
            },
            "message_metadata": "",
        }
    )


def result_outcome(value: bytes) -> tuple[str | None, str, Any]:
    """(request_id, status, error) of one results-topic record."""
    doc = orjson.loads(value)
    return doc.get("request_id"), str(doc.get("status")), doc.get("error")
