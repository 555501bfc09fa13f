"""What the simulator accepts as a SendMessageRequest, and Sinch's field violations."""

from __future__ import annotations

from gateway.envelope import MESSAGE_KINDS


def violation(field: str, description: str) -> dict[str, str]:
    return {"field": field, "description": description}


def validate_send(body: object) -> list[dict[str, str]]:
    """Field violations of a SendMessageRequest; empty when it is acceptable."""
    if not isinstance(body, dict):
        return [violation("", "The request body must be a JSON object.")]
    out: list[dict[str, str]] = []
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
