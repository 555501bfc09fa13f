"""The gateway's exception hierarchy.

Behaviour hangs off class attributes (``retriable``, ``dead_letter_reason``),
never off message strings. Messages never contain secrets, bodies or recipients.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    retriable: ClassVar[bool] = False


class ConfigError(GatewayError):
    """A configuration value is missing or wrong; startup stops with this message."""

    def __init__(self, key: str, expected: str, got: Any) -> None:
        self.key = key
        self.expected = expected
        self.got = got
        super().__init__(f"config {key}: expected {expected}, got {got!r}")


class InvalidMessage(GatewayError):
    """A Kafka record that can never be sent: it goes to the DLQ, never retried."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class AuthError(GatewayError):
    """The token endpoint refused or could not be reached."""

    retriable = True

    def __init__(self, message: str, *, status: int | None = None, permanent: bool = False):
        self.status = status
        self.permanent = permanent
        super().__init__(message)


class SinchError(GatewayError):
    """An error answer from the Conversation API (status and Sinch's error object)."""

    def __init__(self, status: int, error: dict[str, Any] | None, retry_after_s: float | None):
        self.status = status
        self.error = error or {}
        self.retry_after_s = retry_after_s
        self.token_expired = False
        status_name = self.error.get("status", "")
        super().__init__(f"Sinch answered HTTP {status} {status_name}".rstrip())


class TransportError(GatewayError):
    """The request did not get an answer (connect error, timeout, reset).

    ``in_doubt`` is True when the request may have reached Sinch: a timeout or a
    reset after the body was written. ``messages:send`` has no idempotency key,
    so a retry of an in-doubt request may send the message twice.
    """

    retriable = True

    def __init__(self, kind: str, *, in_doubt: bool) -> None:
        self.kind = kind
        self.in_doubt = in_doubt
        super().__init__(f"no answer from Sinch ({kind})")
