"""Conversation API client: regional URLs, one POST, error mapping. No retries here.

``send`` returns the parsed 200 answer or raises :class:`SinchError` (any HTTP
error answer, with Sinch's error object and ``Retry-After``) or
:class:`TransportError` (no answer; ``in_doubt`` when the body may have
reached Sinch). Retry decisions belong to :mod:`gateway.retry`.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.errors import SinchError, TransportError
from gateway.settings import Settings

_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Accepted:
    message_id: str
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


class SinchClient:
    """POSTs ``messages:send`` for any region and project, over one pooled session."""

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
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                www_auth = resp.headers.get("WWW-Authenticate", "")
        except aiohttp.ClientConnectorError as exc:
            raise TransportError("connect", in_doubt=False) from exc
        except TimeoutError as exc:
            raise TransportError("timeout", in_doubt=True) from exc
        except aiohttp.ClientError as exc:
            raise TransportError(type(exc).__name__, in_doubt=True) from exc
        if status == 200:
            try:
                doc = orjson.loads(raw)
                return Accepted(str(doc["message_id"]), doc.get("accepted_time"))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise SinchError(200, {"message": "unparseable 200 answer"}, None) from exc
        error: dict[str, Any] | None
        try:
            doc = orjson.loads(raw)
            error = doc.get("error") if isinstance(doc, dict) else None
            if not isinstance(error, dict):
                error = {"code": status, "message": "non-standard error body"}
        except orjson.JSONDecodeError:
            error = {"code": status, "message": "error body is not JSON"}
        answer = SinchError(status, error, parse_retry_after(retry_after))
        answer.token_expired = status == 401 and "expired" in www_auth.lower()
        raise answer
