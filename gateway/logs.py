"""Logging: one JSON object per line in production, plain text in a terminal.

Log calls use %-style arguments; bodies, recipients and tokens are never passed
to them. Context fields (``request_id``, ``app_id``, ``partition``, ``offset``)
come from :func:`context` (a contextvar, so they follow the task that set them)
or from ``extra=``; both formats show them.

Secrets cannot reach the output: settings wrap them in
:class:`gateway.settings.Secret` (masked repr), values handed to :func:`protect`
are masked wherever they appear in a formatted line (tracebacks included), and
so are ``Bearer``/``Basic`` credentials and ``access_token`` fields.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import re
import sys
import time
from contextvars import ContextVar, Token
from typing import Any

import orjson

CONTEXT_FIELDS = ("request_id", "app_id", "partition", "offset")
MASK = "********"

_context: ContextVar[dict[str, Any] | None] = ContextVar("gateway_log_context", default=None)
# Process-wide like the root logger the formatters are attached to.
_protected: set[str] = set()
_CREDENTIALS = re.compile(
    r"(?P<k>\b(?:Bearer|Basic)\s+|\b(?:access_token|key_secret|client_secret|password)"
    r"[\"']?\s*[:=]\s*[\"']?)(?P<v>[^\s\"',;}&]+)",
    re.IGNORECASE,
)


def _mask(m: re.Match[str]) -> str:
    key, value = m.group("k"), m.group("v")
    scheme = key.strip().lower()
    if scheme == "basic":
        # words ("Basic auth") stay; base64 of "id:secret" goes
        try:
            is_credential = b":" in base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            is_credential = False
        if not is_credential:
            return m.group(0)
    elif scheme == "bearer" and len(value) < 16:
        return m.group(0)
    return key + MASK


class context:  # lower case: it reads as a function, ``with context(request_id=...)``
    """Add fields to every log line written inside the block (by this task).

    A class rather than a generator-based context manager: it wraps every send.
    """

    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: Any) -> None:
        self._fields = fields
        self._token: Token[dict[str, Any] | None] | None = None

    def __enter__(self) -> None:
        outer = _context.get()
        self._token = _context.set({**outer, **self._fields} if outer else self._fields)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _context.reset(self._token)


def protect(*values: str) -> None:
    """Mask these values in every log line from now on (empty and short ones are ignored)."""
    _protected.update(v for v in values if len(v) >= 4)


def protect_secrets(settings: object) -> None:
    """:func:`protect` every secret field (anything with ``reveal()``) of a dataclass."""
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        reveal = getattr(getattr(settings, f.name), "reveal", None)
        if callable(reveal):
            protect(str(reveal()))


def scrub(text: str) -> str:
    """``text`` with protected values and credential-looking tokens masked."""
    for value in _protected:
        if value in text:
            text = text.replace(value, MASK)
    return _CREDENTIALS.sub(_mask, text)


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The context fields of a record: the contextvar's, then ``extra=`` ones."""
    out: dict[str, Any] = {}
    ctx = _context.get()
    if ctx:
        out.update((k, v) for k, v in ctx.items() if v is not None)
    for key in CONTEXT_FIELDS:
        value = record.__dict__.get(key)
        if value is not None:
            out[key] = value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, context fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key, value in fields(record).items():
            doc.setdefault(key, scrub(value) if isinstance(value, str) else value)
        if record.exc_info:
            doc["exc"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in fields(record).items())
        return scrub(f"{line} {extra}" if extra else line)


def setup(level: str = "INFO", fmt: str = "json") -> None:
    """Configure the root logger once (idempotent): ``fmt`` is ``json`` or ``text``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
