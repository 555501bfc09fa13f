"""The send-request envelope and the result record, with their orjson codec.

``decode`` turns the bytes of one Kafka record into a :class:`Request` or raises
:class:`InvalidMessage` with a short machine-readable reason; nothing here does
I/O. The payload is Sinch's SendMessageRequest and is passed through unchanged,
except for the fields the gateway owns (``correlation_id`` when empty,
``queue`` for high priority, ``ttl`` from ``expire_at``) and Sinch's field
limits (``ttl`` at least 3 s, ``correlation_id`` at most 128 characters).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.errors import InvalidMessage
from gateway.offsets import Origin

REGIONS = frozenset({"us", "eu", "br"})
MESSAGE_KINDS = frozenset(
    {
        "text_message",
        "media_message",
        "template_message",
        "choice_message",
        "card_message",
        "carousel_message",
        "location_message",
        "contact_info_message",
        "list_message",
    }
)
MAX_REQUEST_ID = 256
MAX_CAMPAIGN = 128
ENVELOPE_VERSIONS = frozenset({1})  # the envelope versions this gateway reads
MAX_CORRELATION_ID = 128  # Sinch's limit on SendMessageRequest.correlation_id
MIN_TTL_S = 3  # Sinch's minimum SendMessageRequest.ttl
DIGEST_PREFIX = "gw:"
RID_SEP = "|rid:"  # between a producer's own correlation id and the request_id
_DIGEST_END = re.compile(r"(?:^|\|)gw:[0-9a-f]{32}$")
_TTL = re.compile(r"(\d+(?:\.\d+)?)s?")


class Priority(enum.IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2


_PRIORITIES = {"high": Priority.HIGH, "normal": Priority.NORMAL, "low": Priority.LOW}


class Status(enum.StrEnum):
    SENT = "sent"
    FAILED = "failed"
    EXPIRED = "expired"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class Request:
    """One decoded send request and where it came from."""

    request_id: str
    app_id: str
    payload: dict[str, Any]
    project_id: str | None = None
    region: str | None = None
    expire_at: float | None = None  # unix seconds
    priority: Priority = Priority.NORMAL
    channel: str | None = None
    size: int = 0
    campaign: str | None = None
    # the delivery's own state
    attempts: int = 0
    first_error_at: float | None = None
    last_error_at: float | None = None
    received_at: float = 0.0
    renewed: bool = False
    # the record it was read from (None for a request built in code)
    origin: Origin | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def partition(self) -> int:
        return self.origin.partition if self.origin is not None else -1

    def body(self, now: float) -> bytes:
        """The SendMessageRequest to POST, with the gateway-owned fields filled in.

        ``correlation_id`` is :func:`correlation_for` (at most 128 characters).
        ``ttl`` is never below Sinch's minimum of 3 s: from ``expire_at`` it is
        the whole seconds left, and "3s" when less than 3 s are left (the
        message may then live up to 3 s past ``expire_at``; not sending a
        request whose ``expire_at`` has passed is the lanes' job, not this
        method's). A producer's own ``ttl`` below 3 s is raised to "3s"; one
        that is not a number of seconds is passed on for Sinch to judge.
        """
        payload = self.payload
        changes: dict[str, Any] = {}
        own = payload.get("correlation_id")
        correlation = correlation_for(self.request_id, own if isinstance(own, str) else None)
        if correlation != own:
            changes["correlation_id"] = correlation
        if self.priority is Priority.HIGH and "queue" not in payload:
            changes["queue"] = "HIGH_PRIORITY"
        if "ttl" in payload:
            if _ttl_seconds(payload["ttl"]) < MIN_TTL_S:
                changes["ttl"] = f"{MIN_TTL_S}s"
        elif self.expire_at is not None:
            changes["ttl"] = f"{max(MIN_TTL_S, int(self.expire_at - now))}s"
        if changes:
            payload = {**payload, **changes}
        return orjson.dumps(payload)


def correlation_for(request_id: str, own: str | None) -> str:
    """The ``correlation_id`` to send: at most 128 characters, stable per input.

    Delivery reports carry it back, to whichever replica Sinch calls, so it names
    the request: the ``request_id`` itself when the producer left the field empty
    (a request_id longer than 128 characters becomes ``"gw:" +
    blake2b(request_id, 16 bytes).hex()``, which names it only through the
    message_id map of the replica that sent it). A producer's own correlation id
    stays readable in front: ``"<own>|rid:<request_id>"``, the own part cut short
    where both would not fit. :func:`request_id_in` reads it back.
    """
    rid = request_id if len(request_id) <= MAX_CORRELATION_ID else _digest(request_id)
    if not own:
        return rid
    tail = (RID_SEP + rid) if rid is request_id else ("|" + rid)
    return own[: MAX_CORRELATION_ID - len(tail)] + tail


def request_id_in(correlation: str) -> str | None:
    """The request_id a correlation id made by :func:`correlation_for` names, if any."""
    if RID_SEP in correlation:
        return correlation.rsplit(RID_SEP, 1)[1] or None
    if _DIGEST_END.search(correlation):
        return None  # a digest names no request by itself
    return correlation or None


def _digest(value: str) -> str:
    return DIGEST_PREFIX + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def _ttl_seconds(value: Any) -> float:
    """A payload ``ttl`` ("10s", "2.5s", "10" or a number) in seconds; inf if unparseable."""
    if isinstance(value, bool):
        return float("inf")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _TTL.fullmatch(value.strip())
        if match:
            return float(match.group(1))
    return float("inf")


def _rfc3339(key: str, value: Any) -> float:
    if not isinstance(value, str):
        raise InvalidMessage("bad_field", f"{key} must be an RFC 3339 string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidMessage("bad_field", f"{key} is not RFC 3339") from None
    if moment.tzinfo is None:
        raise InvalidMessage("bad_field", f"{key} has no time zone")
    return moment.timestamp()


def _recipient_channel(recipient: Any) -> str | None:
    if not isinstance(recipient, dict):
        raise InvalidMessage("bad_field", "payload.recipient must be an object")
    if isinstance(recipient.get("contact_id"), str) and recipient["contact_id"]:
        return None
    identified = recipient.get("identified_by")
    idents = identified.get("channel_identities") if isinstance(identified, dict) else None
    if not isinstance(idents, list) or not idents:
        raise InvalidMessage("missing_field", "payload.recipient needs contact_id or identified_by")
    first = idents[0]
    if not isinstance(first, dict) or not isinstance(first.get("identity"), str):
        raise InvalidMessage("bad_field", "payload.recipient channel identity is malformed")
    channel = first.get("channel")
    return channel.upper() if isinstance(channel, str) else None


def decode(value: bytes | None, *, max_bytes: int) -> Request:
    """Decode and validate one record value. Raises :class:`InvalidMessage`."""
    if value is None:
        raise InvalidMessage("empty", "record has no value")
    if len(value) > max_bytes:
        raise InvalidMessage("too_large", f"{len(value)} bytes > {max_bytes}")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        reason = "invalid_utf8" if "utf-8" in str(exc).lower() else "invalid_json"
        raise InvalidMessage(reason, "value is not a JSON document") from None
    if not isinstance(doc, dict):
        raise InvalidMessage("bad_field", "envelope must be a JSON object")

    request_id = doc.get("request_id")
    if request_id is None or request_id == "":
        raise InvalidMessage("missing_field", "request_id")
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID:
        raise InvalidMessage("bad_field", "request_id must be a string of at most 256 chars")
    payload = doc.get("payload")
    if not isinstance(payload, dict):
        raise InvalidMessage("missing_field" if payload is None else "bad_field", "payload")
    app_id = payload.get("app_id")
    if not isinstance(app_id, str) or not app_id:
        raise InvalidMessage("missing_field" if app_id is None else "bad_field", "payload.app_id")
    if "recipient" not in payload:
        raise InvalidMessage("missing_field", "payload.recipient")
    channel = _recipient_channel(payload["recipient"])
    correlation = payload.get("correlation_id")
    if correlation is not None and not isinstance(correlation, str):
        raise InvalidMessage("bad_field", "payload.correlation_id must be a string")
    if correlation is not None and len(correlation) > MAX_CORRELATION_ID:
        raise InvalidMessage("bad_field", "payload.correlation_id longer than 128")
    message = payload.get("message")
    if not isinstance(message, dict):
        raise InvalidMessage("missing_field" if message is None else "bad_field", "payload.message")
    if message.keys().isdisjoint(MESSAGE_KINDS):
        raise InvalidMessage("bad_field", "payload.message has no known message type")

    version = doc.get("envelope_version", 1)
    numeric = isinstance(version, int | float) and not isinstance(version, bool)
    if not numeric or version not in ENVELOPE_VERSIONS:  # checked first: a list is unhashable
        raise InvalidMessage("bad_field", "envelope_version must be 1")
    campaign = doc.get("campaign")
    if campaign is not None and (
        not isinstance(campaign, str) or not campaign or len(campaign) > MAX_CAMPAIGN
    ):
        raise InvalidMessage("bad_field", "campaign must be a string of 1 to 128 chars")
    project_id = doc.get("project_id")
    if project_id is not None and (not isinstance(project_id, str) or not project_id):
        raise InvalidMessage("bad_field", "project_id must be a non-empty string")
    region = doc.get("region")
    if region is not None and (not isinstance(region, str) or region not in REGIONS):
        raise InvalidMessage("bad_field", "region must be one of us, eu, br")
    expire_at = doc.get("expire_at")
    expire_ts = _rfc3339("expire_at", expire_at) if expire_at is not None else None
    priority_raw = doc.get("priority", "normal")
    priority = _PRIORITIES.get(priority_raw) if isinstance(priority_raw, str) else None
    if priority is None:
        raise InvalidMessage("bad_field", "priority must be one of high, normal, low")
    return Request(
        request_id=request_id,
        app_id=app_id,
        payload=payload,
        project_id=project_id,
        region=region,
        expire_at=expire_ts,
        priority=priority,
        channel=channel,
        size=len(value),
        campaign=campaign,
    )


def surely_not_high(value: bytes, app_id: bytes) -> bool:
    """True when the record ``value`` cannot be a high-priority request and names ``app_id``.

    A cheap look at the raw JSON, for records that are about to be spilled without being
    decoded: no ``"high"`` string (nor a ``\\u`` escape that could spell one) means no
    ``"priority": "high"``, and the app's id in quotes is where its ``payload.app_id``
    would be. A false answer only means the record is decoded as usual.
    """
    return b'"high"' not in value and b"\\u" not in value and _quoted(app_id) in value


@functools.lru_cache(maxsize=1024)
def _quoted(app_id: bytes) -> bytes:
    return b'"' + app_id + b'"'


def peek_ids(value: bytes | None, *, max_bytes: int) -> tuple[str | None, str | None]:
    """``(request_id, app_id)`` as far as they can be read from a record that failed to decode.

    A rejected result carries them so that the producer can tell which request it was.
    """
    if not value or len(value) > max_bytes:
        return None, None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    rid = doc.get("request_id")
    payload = doc.get("payload")
    app = payload.get("app_id") if isinstance(payload, dict) else None
    return (
        rid if isinstance(rid, str) and 0 < len(rid) <= MAX_REQUEST_ID else None,
        app if isinstance(app, str) and app else None,
    )


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def result_record(
    *,
    request_id: str | None,
    status: Status,
    app_id: str | None,
    attempts: int,
    http_status: int | None = None,
    message_id: str | None = None,
    accepted_time: str | None = None,
    error: Any = None,
    timings: dict[str, float] | None = None,
    partition: int | None = None,
    offset: int | None = None,
    campaign: str | None = None,
) -> bytes:
    """One record of the results topic (the contract in DESIGN.md)."""
    return orjson.dumps(
        {
            "request_id": request_id,
            "status": status.value,
            "message_id": message_id,
            "accepted_time": accepted_time,
            "http_status": http_status,
            "error": error,
            "attempts": attempts,
            "app_id": app_id,
            "campaign": campaign,
            "timings": timings or {},
            "source": {"partition": partition, "offset": offset},
        }
    )
