"""What the simulator accepts as a SendMessageRequest, and Sinch's field violations.

Besides the shape (app, recipient, exactly one message kind) it enforces Sinch's
documented field limits: ``ttl`` of at least 3 seconds (a Duration string such as
``"10s"`` or ``"3.5s"``, or a number of seconds), ``correlation_id`` of at most 128
characters, ``queue`` one of ``NORMAL_PRIORITY`` / ``HIGH_PRIORITY``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

from gateway.envelope import MESSAGE_KINDS

MIN_TTL_S: Final = 3.0
MAX_CORRELATION_ID: Final = 128
QUEUES: Final = frozenset({"NORMAL_PRIORITY", "HIGH_PRIORITY"})
_DURATION: Final = re.compile(r"^([0-9]+(?:\.[0-9]{1,9})?)s$")


def violation(field: str, description: str) -> dict[str, str]:
    return {"field": field, "description": description}


def validate_send(body: object) -> list[dict[str, str]]:
    """Field violations of a SendMessageRequest; empty when it is acceptable."""
    if not isinstance(body, dict):
        return [violation("", "The request body must be a JSON object.")]
    out: list[dict[str, str]] = _field_limits(body)
    app_id = body.get("app_id")
    if not isinstance(app_id, str) or not app_id:
        out.append(violation("app_id", "app_id is required and must be a string."))
    recipient = body.get("recipient")
    if not isinstance(recipient, dict):
        out.append(violation("recipient", "recipient is required and must be an object."))
    elif "contact_id" in recipient and "identified_by" in recipient:
        out.append(violation("recipient", "Set contact_id or identified_by, not both."))
    elif "contact_id" in recipient:
        if not isinstance(recipient["contact_id"], str) or not recipient["contact_id"]:
            out.append(violation("recipient.contact_id", "contact_id must be a string."))
    else:
        identified = recipient.get("identified_by")
        ids = identified.get("channel_identities") if isinstance(identified, dict) else None
        if not isinstance(ids, list) or not ids:
            out.append(
                violation(
                    "recipient.identified_by.channel_identities",
                    "Set recipient.contact_id or a non-empty channel_identities list.",
                )
            )
        else:
            for i, entry in enumerate(ids):
                is_dict = isinstance(entry, dict)
                channel = entry.get("channel") if is_dict else None
                identity = entry.get("identity") if is_dict else None
                if not (
                    channel and identity and isinstance(channel, str) and isinstance(identity, str)
                ):
                    out.append(
                        violation(
                            f"recipient.identified_by.channel_identities[{i}]",
                            "Each channel identity needs string channel and identity.",
                        )
                    )
    message = body.get("message")
    if not isinstance(message, dict):
        out.append(violation("message", "message is required and must be an object."))
    else:
        kinds = MESSAGE_KINDS.intersection(message)
        if len(kinds) != 1:
            out.append(violation("message", "Exactly one message type must be set."))
        else:
            (kind,) = kinds
            content = message[kind]
            if not isinstance(content, dict):
                out.append(violation(f"message.{kind}", f"{kind} must be an object."))
            elif kind == "text_message" and not isinstance(content.get("text"), str):
                out.append(violation("message.text_message.text", "text must be a string."))
    return out


def ttl_seconds(value: object) -> float | None:
    """``ttl`` in seconds (``"10s"``, ``"2.5s"`` or a number), or None if malformed."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1))
    else:
        return None
    return seconds if math.isfinite(seconds) else None


def _field_limits(body: dict[str, Any]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    if "ttl" in body:
        seconds = ttl_seconds(body["ttl"])
        if seconds is None:
            out.append(violation("ttl", 'ttl must be a duration such as "10s".'))
        elif seconds < MIN_TTL_S:
            out.append(violation("ttl", "ttl must be at least 3 seconds."))
    correlation = body.get("correlation_id")
    if correlation is not None:
        if not isinstance(correlation, str):
            out.append(violation("correlation_id", "correlation_id must be a string."))
        elif len(correlation) > MAX_CORRELATION_ID:
            out.append(
                violation("correlation_id", "correlation_id must be at most 128 characters.")
            )
    queue = body.get("queue")
    if queue is not None and queue not in QUEUES:
        out.append(violation("queue", "queue must be NORMAL_PRIORITY or HIGH_PRIORITY."))
    return out
