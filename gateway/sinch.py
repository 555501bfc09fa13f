"""Conversation API client: regional URLs, send and app reads, error mapping. No retries here.

``send`` returns the parsed 200 answer or raises :class:`SinchError` (any HTTP
error answer, with Sinch's error object and a retry hint) or
:class:`TransportError` (no answer). Retry decisions belong to
:mod:`gateway.retry`.

Where a failure happened decides whether the message may already be at Sinch:
a connect error or connect timeout (``ConnectionTimeoutError``, which also
covers waiting for a pooled connection) means nothing left the host, so it is
*not* in doubt; a read timeout, a total timeout or a reset once the request
was on the wire is in doubt. A 200 status line means Sinch accepted the
message even when its body cannot be read or parsed.
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from gateway.errors import SinchError, TransportError
from gateway.settings import Settings

log = logging.getLogger(__name__)

_JSON = "application/json"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
# protobuf Duration in JSON: decimal seconds with up to 9 fractional digits, then "s"
_DURATION = re.compile(r"-?\d+(?:\.\d{1,9})?s")


@dataclass(frozen=True, slots=True)
class AppInfo:
    """What the App resource says about sending: None where Sinch said nothing usable.

    ``outbound_rate`` is ``rate_limits.outbound`` (messages per second, > 0);
    ``outbound_size``/``outbound_limit`` are ``queue_stats``: messages waiting in
    the app's MT ingress queue and its capacity.
    """

    app_id: str
    outbound_rate: float | None
    outbound_size: int | None
    outbound_limit: int | None


@dataclass(frozen=True, slots=True)
class Accepted:
    """Sinch's 200 answer. Both fields are None when the body could not be read."""

    message_id: str | None
    accepted_time: str | None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def parse_retry_delay(error: dict[str, Any]) -> float | None:
    """``retryDelay`` of a ``google.rpc.RetryInfo`` in ``error.details``, in seconds.

    Accepts the JSON form of a protobuf Duration (``"3s"``, ``"0.500s"``) and
    the object form (``{"seconds": 2, "nanos": 500000000}``). None when absent
    or malformed; negative delays count as 0.
    """
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict) or detail.get("@type") != _RETRY_INFO:
            continue
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and _DURATION.fullmatch(delay.strip()):
            return max(0.0, float(delay.strip()[:-1]))
        if isinstance(delay, dict):
            seconds, nanos = delay.get("seconds", 0), delay.get("nanos", 0)
            if isinstance(seconds, int | str) and isinstance(nanos, int):
                try:
                    return max(0.0, int(seconds) + nanos / 1e9)
                except ValueError:
                    return None
    return None


def retry_hint(
    retry_after: float | None, error: dict[str, Any], max_delay_s: float | None = None
) -> float | None:
    """The wait Sinch asked for: the larger of ``Retry-After`` and RetryInfo, capped."""
    hints = [h for h in (retry_after, parse_retry_delay(error)) if h is not None]
    if not hints:
        return None
    wait = max(hints)
    return wait if max_delay_s is None else min(wait, max_delay_s)


def _transport_error(exc: Exception) -> TransportError:
    """Where in the exchange ``exc`` happened decides ``in_doubt`` (order matters)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TransportError("connect_timeout", in_doubt=False)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransportError("connect_error", in_doubt=False)
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return TransportError("read_timeout", in_doubt=True)
    if isinstance(exc, TimeoutError):
        return TransportError("timeout", in_doubt=True)
    return TransportError(type(exc).__name__, in_doubt=True)


class SinchClient:
    """``messages:send`` and app reads for any region and project, over one pooled session."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session
        self._urls: dict[tuple[str, str], str] = {}

    def url(self, region: str, project_id: str) -> str:
        key = (region, project_id)
        url = self._urls.get(key)
        if url is None:
            base = self._settings.conversation_base(region)
            url = self._urls[key] = f"{base}/v1/projects/{project_id}/messages:send"
        return url

    async def send(
        self, *, region: str, project_id: str, body: bytes, authorization: str
    ) -> Accepted:
        url = self.url(region, project_id)
        headers = {"Authorization": authorization, "Content-Type": _JSON, "Accept": _JSON}
        raw: bytes | None = None
        unreadable = ""
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                www_auth = resp.headers.get("WWW-Authenticate", "")
                try:
                    raw = await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # the status line arrived: the answer stands, only its body is lost
                    unreadable = type(exc).__name__
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_error(exc) from exc
        if status == 200:
            return _accepted(raw, unreadable)
        raise self._error(status, raw, retry_after, www_auth)

    async def get_app(
        self, *, region: str, project_id: str, app_id: str, authorization: str
    ) -> AppInfo:
        """``GET .../apps/{app_id}``: the app's outbound rate and ingress queue.

        Errors map as for :meth:`send` (:class:`SinchError` with Sinch's error
        object, :class:`TransportError` without an answer). A 200 whose body
        cannot be read or lacks a field gives None for that field.
        """
        base = self._settings.conversation_base(region)
        url = f"{base}/v1/projects/{quote(project_id, safe='')}/apps/{quote(app_id, safe='')}"
        headers = {"Authorization": authorization, "Accept": _JSON}
        raw: bytes | None = None
        try:
            async with self._session.get(url, headers=headers) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                www_auth = resp.headers.get("WWW-Authenticate", "")
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_error(exc) from exc
        if status == 200:
            return _app_info(app_id, raw)
        raise self._error(status, raw, retry_after, www_auth)

    def _error(
        self, status: int, raw: bytes | None, retry_after: str | None, www_auth: str
    ) -> SinchError:
        """The :class:`SinchError` of an error answer, with its retry hint."""
        error: dict[str, Any] | None = None
        if raw is None:
            error = {"code": status, "message": "error body unreadable"}
        else:
            try:
                doc = orjson.loads(raw)
                error = doc.get("error") if isinstance(doc, dict) else None
                if not isinstance(error, dict):
                    error = {"code": status, "message": "non-standard error body"}
            except orjson.JSONDecodeError:
                error = {"code": status, "message": "error body is not JSON"}
        wait = retry_hint(parse_retry_after(retry_after), error, self._settings.backoff_max_s)
        answer = SinchError(status, error, wait)
        answer.token_expired = status == 401 and "expired" in www_auth.lower()
        return answer


def _accepted(raw: bytes | None, unreadable: str) -> Accepted:
    """Parse a 200 answer; an unreadable one is still a sent message, id unknown."""
    if raw is not None:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            unreadable = "not JSON"
        else:
            message_id = doc.get("message_id") if isinstance(doc, dict) else None
            if isinstance(message_id, str) and message_id:
                accepted_time = doc.get("accepted_time")
                return Accepted(
                    message_id, accepted_time if isinstance(accepted_time, str) else None
                )
            unreadable = "no message_id"
    log.warning("Sinch answered 200 without a readable body (%s): sent, id unknown", unreadable)
    return Accepted(message_id=None, accepted_time=None)


def _number(doc: Any, section: str, name: str) -> float | None:
    """``doc[section][name]`` as a finite number >= 0; int64 fields may come as strings."""
    part = doc.get(section) if isinstance(doc, dict) else None
    value = part.get(name) if isinstance(part, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _app_info(app_id: str, raw: bytes | None) -> AppInfo:
    try:
        doc = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        log.warning("Sinch answered 200 to an app read without a readable App resource")
    rate = _number(doc, "rate_limits", "outbound")
    size = _number(doc, "queue_stats", "outbound_size")
    limit = _number(doc, "queue_stats", "outbound_limit")
    return AppInfo(
        app_id=app_id,
        outbound_rate=rate if rate else None,
        outbound_size=None if size is None else int(size),
        outbound_limit=None if limit is None else int(limit),
    )
