"""The shared OAuth2 token manager: one cached token for every sender.

- Client-credentials grant (``grant_type=client_credentials``, HTTP Basic
  key_id:key_secret) against ``auth_url``.
- Single-flight: however many senders wait, one fetch is under way at a time.
- Refresh ahead: a token is renewed in the background once it is within
  ``min(refresh_margin_s, lifetime / 4)`` of expiry, so senders never wait for it.
- ``renew(used)`` after a 401 that says "expired": the first caller renews; the
  others, holding the same stale token, get the new one (as the official SDK).
- Failures back off exponentially (full jitter); during the back-off callers get
  :class:`AuthError` at once instead of hammering the auth endpoint.
- ``auth_mode = "basic"`` sends key_id:key_secret on every call (testing only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Protocol

import aiohttp
import orjson

from gateway.aio import cancel_and_wait, wait_within
from gateway.errors import AuthError
from gateway.settings import Secret

log = logging.getLogger(__name__)


class TokenSource(Protocol):
    async def authorization(self) -> str: ...

    async def renew(self, used: str) -> str: ...

    def is_valid(self) -> bool: ...


def basic_header(key_id: str, key_secret: Secret) -> str:
    raw = f"{key_id}:{key_secret.reveal()}".encode()
    return "Basic " + base64.b64encode(raw).decode()


class BasicAuth:
    """key_id:key_secret on every call; Sinch rate-limits this heavily."""

    def __init__(self, key_id: str, key_secret: Secret) -> None:
        self._header = basic_header(key_id, key_secret)

    async def authorization(self) -> str:
        return self._header

    async def renew(self, used: str) -> str:
        return self._header

    def is_valid(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "BasicAuth(<credentials hidden>)"


class TokenManager:
    """OAuth2 client-credentials tokens, shared by all senders of a process."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        auth_url: str,
        key_id: str,
        key_secret: Secret,
        refresh_margin_s: float = 300.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        clock: Callable[[], float] | None = None,
        on_refresh: Callable[[str, float | None], None] | None = None,
    ) -> None:
        self._session = session
        self._auth_url = auth_url
        self._basic = {"Authorization": basic_header(key_id, key_secret)}
        self._margin = refresh_margin_s
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        self._clock = clock or asyncio.get_running_loop().time
        self._on_refresh = on_refresh
        self._header: str | None = None
        self._expires_at = 0.0
        self._refresh_at = 0.0
        self._inflight: asyncio.Task[str] | None = None
        self._failures = 0
        self._retry_at = 0.0
        self.last_error: AuthError | None = None
        self.fetches = 0

    def __repr__(self) -> str:
        return f"TokenManager(auth_url={self._auth_url!r}, <credentials hidden>)"

    def is_valid(self) -> bool:
        return self._header is not None and self._clock() < self._expires_at

    def seconds_left(self) -> float | None:
        if self._header is None:
            return None
        return self._expires_at - self._clock()

    async def authorization(self) -> str:
        """An ``Authorization`` header value; fetches or refreshes as needed."""
        now = self._clock()
        header = self._header
        if header is not None and now < self._expires_at:
            if now >= self._refresh_at and now >= self._retry_at and self._inflight is None:
                self._start_fetch()
            return header
        return await self._fetch_shared()

    async def renew(self, used: str) -> str:
        """Renew after an expired-token 401, once for all holders of ``used``."""
        if self._header is not None and self._header != used and self.is_valid():
            return self._header
        self._expires_at = 0.0
        return await self._fetch_shared()

    async def keep_fresh(self, stop: asyncio.Event, interval_s: float = 1.0) -> None:
        """Hold a valid token even while idle, so readiness means "can send now"."""
        while not stop.is_set():
            with contextlib.suppress(AuthError):
                await self.authorization()
            await wait_within(stop.wait(), interval_s)

    async def close(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            await cancel_and_wait([task])

    def _start_fetch(self) -> asyncio.Task[str]:
        task = asyncio.create_task(self._fetch(), name="token-fetch")
        self._inflight = task
        task.add_done_callback(self._fetch_done)
        return task

    def _fetch_done(self, task: asyncio.Task[str]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here; waiters get it through shield

    async def _fetch_shared(self) -> str:
        if self._inflight is None:
            if self._clock() < self._retry_at and self.last_error is not None:
                raise self.last_error
            return await asyncio.shield(self._start_fetch())
        return await asyncio.shield(self._inflight)

    async def _fetch(self) -> str:
        started = self._clock()
        self.fetches += 1
        try:
            async with self._session.post(
                self._auth_url,
                data={"grant_type": "client_credentials"},
                headers=self._basic,
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = type(exc).__name__
            raise self._failed(AuthError(f"token endpoint unreachable ({kind})")) from None
        if status != 200:
            permanent = status in (400, 401, 403)
            raise self._failed(
                AuthError(
                    f"token endpoint answered HTTP {status}", status=status, permanent=permanent
                )
            )
        try:
            doc = orjson.loads(body)
            token = doc["access_token"]
            lifetime = float(doc.get("expires_in", 3600))
            if not isinstance(token, str) or not token or lifetime <= 0:
                raise ValueError("bad token document")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise self._failed(
                AuthError("token endpoint sent an unusable answer", status=status)
            ) from None
        self._header = f"Bearer {token}"
        self._expires_at = started + lifetime
        self._refresh_at = started + lifetime - min(self._margin, lifetime / 4)
        self._failures = 0
        self._retry_at = 0.0
        self.last_error = None
        if self._on_refresh:
            self._on_refresh("success", self._expires_at)
        log.info("access token refreshed, valid for %.0f s", lifetime)
        return self._header

    def _failed(self, err: AuthError) -> AuthError:
        self._failures += 1
        cap = min(self._backoff_max, self._backoff_base * 2 ** min(self._failures, 16))
        self._retry_at = self._clock() + random.uniform(cap / 2, cap)  # noqa: S311 - jitter
        self.last_error = err
        if self._on_refresh:
            self._on_refresh("failure", None)
        log.warning(
            "token refresh failed (%s); next attempt in %.1f s", err, self._retry_at - self._clock()
        )
        return err
