"""A small typed helper for Python producers of send requests.

:func:`envelope` builds the value of one requests-topic record and checks it with
the gateway's own decoder, so a record it returns is never rejected for its
form; :func:`publish` sends one to Kafka keyed by its ``app_id`` (an app's
records stay in one partition, in order, on one replica)::

    from aiokafka import AIOKafkaProducer
    from gateway import client

    value = client.envelope(
        app_id="01HXYZ...",
        recipient=client.channel_recipient("+46700000001", "SMS"),
        message=client.text_message("Your code is 1234"),
        expire_in_s=300,
        campaign="otp",
    )
    async with AIOKafkaProducer(bootstrap_servers="kafka:9092", acks="all") as producer:
        await client.publish(producer, value)

Nothing here does I/O except :func:`publish`; the JSON Schemas of the records
are shipped with the package (:func:`schema`).
"""

from __future__ import annotations

import importlib.resources
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, Protocol

import orjson

from gateway.envelope import Priority, decode, iso
from gateway.errors import InvalidMessage

REQUESTS_TOPIC = "sinch.outbound.requests"  # the Settings defaults of requests_topic
REQUESTS_HIGH_TOPIC = "sinch.outbound.requests.high"  # and requests_high_topic
MAX_MESSAGE_BYTES = 1024 * 1024  # the gateway's default max_message_bytes
SCHEMAS = ("send-request", "result", "status")

PriorityName = Literal["high", "normal", "low"]
Region = Literal["us", "eu", "br"]


class Producer(Protocol):
    """What :func:`publish` needs of a producer (``aiokafka.AIOKafkaProducer`` has it)."""

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None
    ) -> Any: ...


def channel_recipient(identity: str, channel: str = "SMS") -> dict[str, Any]:
    """A recipient by channel identity (a phone number for SMS, a PSID for Messenger...)."""
    if not identity:
        raise ValueError("identity must be a non-empty string")
    return {"identified_by": {"channel_identities": [{"channel": channel, "identity": identity}]}}


def contact_recipient(contact_id: str) -> dict[str, Any]:
    """A recipient by Sinch contact id."""
    if not contact_id:
        raise ValueError("contact_id must be a non-empty string")
    return {"contact_id": contact_id}


def text_message(text: str) -> dict[str, Any]:
    """An AppMessage with one text message."""
    return {"text_message": {"text": text}}


def envelope(
    *,
    app_id: str,
    recipient: Mapping[str, Any],
    message: Mapping[str, Any],
    request_id: str | None = None,
    priority: PriorityName = "normal",
    expire_at: datetime | None = None,
    expire_in_s: float | None = None,
    campaign: str | None = None,
    correlation_id: str | None = None,
    project_id: str | None = None,
    region: Region | None = None,
    payload_extra: Mapping[str, Any] | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> bytes:
    """The value of one send-request record, checked by the gateway's decoder.

    ``request_id`` defaults to a new UUID4. ``message`` is an AppMessage dict
    (:func:`text_message`, or any of Sinch's message kinds). Expiry is either
    ``expire_at`` (a datetime with a time zone) or ``expire_in_s`` (seconds from
    now). ``payload_extra`` adds members of Sinch's SendMessageRequest
    (``channel_priority_order``, ``message_metadata``, ...). Raises
    :class:`ValueError` naming the first problem (the decoder's reason and detail)
    when the gateway would reject the record, also when it is over ``max_bytes``
    (the gateway's ``max_message_bytes``).
    """
    if expire_at is not None and expire_in_s is not None:
        raise ValueError("give expire_at or expire_in_s, not both")
    payload: dict[str, Any] = {
        "app_id": app_id,
        "recipient": dict(recipient),
        "message": dict(message),
    }
    if correlation_id is not None:
        payload["correlation_id"] = correlation_id
    for key, extra in (payload_extra or {}).items():
        if key in payload:
            raise ValueError(f"payload_extra must not set {key}: it has an argument of its own")
        payload[key] = extra
    doc: dict[str, Any] = {
        "request_id": str(uuid.uuid4()) if request_id is None else request_id,
        "envelope_version": 1,
        "priority": priority,
        "payload": payload,
    }
    if expire_at is not None:
        if expire_at.tzinfo is None:
            raise ValueError("expire_at needs a time zone (datetime.now(UTC) + ..., not now())")
        doc["expire_at"] = iso(expire_at.timestamp())
    elif expire_in_s is not None:
        doc["expire_at"] = iso(time.time() + expire_in_s)
    optional = {"campaign": campaign, "project_id": project_id, "region": region}
    doc.update({key: given for key, given in optional.items() if given is not None})
    value = orjson.dumps(doc)
    checked(value, max_bytes=max_bytes)
    return value


def checked(value: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[str, bool]:
    """``(app_id, is high priority)`` of a record value the gateway accepts; else ValueError."""
    try:
        req = decode(value, max_bytes=max_bytes)
    except InvalidMessage as exc:
        raise ValueError(f"not a valid send request: {exc}") from None
    return req.app_id, req.priority is Priority.HIGH


async def publish(
    producer: Producer,
    value: bytes,
    *,
    topic: str = REQUESTS_TOPIC,
    high_topic: str | None = REQUESTS_HIGH_TOPIC,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Any:
    """Send one envelope with key = its ``app_id``; the producer's record metadata.

    A ``priority: high`` envelope goes to ``high_topic`` (which intake reads
    first); ``high_topic=None`` sends every envelope to ``topic``, where high
    priority is honoured too. The value is checked first (ValueError when the
    gateway would reject it), so nothing malformed reaches the topic.
    """
    app_id, high = checked(value, max_bytes=max_bytes)
    target = high_topic if high and high_topic is not None else topic
    return await producer.send_and_wait(target, value, key=app_id.encode())


def schema(name: str = "send-request") -> dict[str, Any]:
    """One of the JSON Schemas (draft 2020-12) shipped with the package: see :data:`SCHEMAS`."""
    if name not in SCHEMAS:
        raise ValueError(f"no schema {name!r}: one of {', '.join(SCHEMAS)}")
    resource = importlib.resources.files("gateway") / "schemas" / f"{name}.schema.json"
    loaded: dict[str, Any] = orjson.loads(resource.read_bytes())
    return loaded
