"""Signed Sinch callbacks from the simulator to a webhook: delivery reports, inbound.

For every accepted send the simulator posts a MESSAGE_DELIVERY callback with status
``QUEUED_ON_CHANNEL`` when the message leaves its app's ingress queue (at once when
the queue is empty, and always at once in strict mode) and, ``callback_delay_s``
later, ``DELIVERED`` (or ``FAILED`` with a ``reason`` for ``callback_failed_fraction``
of the messages).
``POST /_sim/inbound`` produces a MESSAGE_INBOUND callback. In the DISPATCH
processing mode (the default for new apps) callbacks carry empty ``conversation_id``
and ``contact_id``, as Sinch stores neither; CONVERSATION mode fills both. Every
delivery report echoes the send's ``message_metadata`` and ``correlation_id``.
Delivery reports go to
the send's own ``callback_url`` when it has one (as Sinch allows per message), else
to the configured ``callback_url``; with neither, none are produced.

The send path only appends to bounded in-memory queues (:meth:`CallbackDispatcher.
message_accepted` never awaits); a pool of ``callback_workers`` tasks and one
``ClientSession`` do the HTTP. A full queue drops the callback and counts it. A POST
that fails (connection error or non-2xx) is retried ``callback_retries`` times with
exponential back-off, re-signed each time.

Signature, as Sinch does it: ``x-sinch-webhook-signature`` is
``base64(HMAC-SHA256(secret, body + "." + nonce + "." + timestamp))`` with the
nonce and the unix-seconds timestamp in ``x-sinch-webhook-signature-nonce`` and
``x-sinch-webhook-signature-timestamp``. Without ``callback_secret`` no signature
headers are sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import heapq
import hmac
import itertools
import logging
import random
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

import aiohttp
import orjson

from gateway.simulator.settings import ProcessingMode, SimulatorSettings

log = logging.getLogger(__name__)

_B32: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_CROCKFORD: Final = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_CROCKFORD: Final = bytes.maketrans(_B32, _CROCKFORD)
#: Two Crockford characters for every 10-bit value.
_PAIRS: Final = tuple(chr(a) + chr(b) for a in _CROCKFORD for b in _CROCKFORD)
_RETRY_BASE_S: Final = 0.1
_RESULTS: Final = ("ok", "retry", "failed", "dropped")
_FAILURE_REASON: Final = {
    "code": "RECIPIENT_NOT_REACHABLE",
    "description": "Simulated delivery failure.",
    "sub_code": "UNSPECIFIED_SUB_CODE",
}


def sign(secret: str, body: bytes, nonce: str, timestamp: str) -> str:
    """Sinch webhook signature of ``body`` (see the module docstring)."""
    signed = body + b"." + nonce.encode() + b"." + timestamp.encode()
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_headers(secret: str, body: bytes) -> dict[str, str]:
    """Fresh nonce and timestamp headers plus the signature over them."""
    nonce = secrets.token_hex(13)
    timestamp = str(int(time.time()))
    return {
        "x-sinch-webhook-signature-nonce": nonce,
        "x-sinch-webhook-signature-timestamp": timestamp,
        "x-sinch-webhook-signature": sign(secret, body, nonce, timestamp),
    }


class Stamper:
    """Fresh ULID-shaped message ids and RFC 3339 UTC times from one clock read.

    An id is 26 Crockford base32 characters: 48 bits of wall-clock milliseconds
    then 80 random bits. The id prefix is cached per millisecond and the time
    prefix per second, so a stamp costs a few table lookups.
    """

    __slots__ = ("_ms", "_ms_prefix", "_rng", "_sec", "_sec_prefix")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._ms = -1
        self._ms_prefix = ""
        self._sec = -1
        self._sec_prefix = ""

    def stamp(self) -> tuple[str, str]:
        """A new message id and the current time, e.g. ``2021-10-18T17:49:13.813615Z``."""
        ns = time.time_ns()
        ms = ns // 1_000_000
        p = _PAIRS
        if ms != self._ms:
            self._ms = ms
            self._ms_prefix = "".join(p[ms >> shift & 1023] for shift in (40, 30, 20, 10, 0))
        r = self._rng.getrandbits(80)
        message_id = (
            self._ms_prefix
            + p[r >> 70]
            + p[r >> 60 & 1023]
            + p[r >> 50 & 1023]
            + p[r >> 40 & 1023]
            + p[r >> 30 & 1023]
            + p[r >> 20 & 1023]
            + p[r >> 10 & 1023]
            + p[r & 1023]
        )
        sec, us = divmod(ns // 1000, 1_000_000)
        if sec != self._sec:
            self._sec = sec
            self._sec_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return message_id, f"{self._sec_prefix}.{us:06d}Z"

    def new_id(self) -> str:
        return self.stamp()[0]


def derived_id(*parts: str) -> str:
    """A stable 26-character id for (contact, conversation) derived from ``parts``."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).digest()
    value = int.from_bytes(digest, "big") >> 2
    return base64.b32encode(value.to_bytes(20, "big"))[6:].translate(_TO_CROCKFORD).decode()


def rfc3339(epoch_s: float | None = None) -> str:
    """UTC time with microseconds and a ``Z``, e.g. ``2021-10-18T17:49:13.813615Z``."""
    moment = datetime.now(UTC) if epoch_s is None else datetime.fromtimestamp(epoch_s, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def recipient_identity(app_id: str, recipient: Mapping[str, Any]) -> dict[str, str]:
    """Channel identity and contact id the callbacks report for a send's recipient."""
    identities = recipient.get("identified_by", {}).get("channel_identities") or []
    if identities:
        first = identities[0]
        channel, identity = str(first.get("channel", "SMS")), str(first.get("identity", ""))
        contact_id = derived_id(app_id, channel, identity)
    else:
        contact_id = str(recipient.get("contact_id", ""))
        digest = hashlib.blake2b(contact_id.encode(), digest_size=8).digest()
        channel, identity = "SMS", f"46{int.from_bytes(digest, 'big') % 10**9:09d}"
    return {"channel": channel, "identity": identity, "contact_id": contact_id}


def delivery_report(
    *,
    project_id: str,
    app_id: str,
    message_id: str,
    accepted_time: str,
    status: str,
    recipient: Mapping[str, Any],
    message_metadata: str,
    correlation_id: str,
    failed: bool = False,
    processing_mode: ProcessingMode = "CONVERSATION",
) -> dict[str, Any]:
    """A MESSAGE_DELIVERY callback body in the Conversation API format."""
    who = recipient_identity(app_id, recipient)
    conversation = processing_mode == "CONVERSATION"
    report: dict[str, Any] = {
        "message_id": message_id,
        "conversation_id": derived_id(app_id, who["contact_id"]) if conversation else "",
        "status": status,
        "channel_identity": {
            "channel": who["channel"],
            "identity": who["identity"],
            "app_id": app_id,
        },
        "contact_id": who["contact_id"] if conversation else "",
        "metadata": "",
        "processing_mode": processing_mode,
    }
    if failed:
        report["reason"] = dict(_FAILURE_REASON)
    return {
        "app_id": app_id,
        "accepted_time": accepted_time,
        "event_time": rfc3339(),
        "project_id": project_id,
        "message_delivery_report": report,
        "message_metadata": message_metadata,
        "correlation_id": correlation_id,
    }


def inbound_message(
    *,
    project_id: str,
    app_id: str,
    message_id: str,
    text: str,
    identity: str,
    processing_mode: ProcessingMode = "CONVERSATION",
) -> dict[str, Any]:
    """A MESSAGE_INBOUND callback body: ``identity`` wrote ``text`` over SMS."""
    now = rfc3339()
    conversation = processing_mode == "CONVERSATION"
    contact_id = derived_id(app_id, "SMS", identity) if conversation else ""
    return {
        "app_id": app_id,
        "accepted_time": now,
        "event_time": now,
        "project_id": project_id,
        "message": {
            "id": message_id,
            "direction": "TO_APP",
            "contact_message": {"text_message": {"text": text}},
            "channel_identity": {"channel": "SMS", "identity": identity, "app_id": app_id},
            "conversation_id": derived_id(app_id, contact_id) if conversation else "",
            "contact_id": contact_id,
            "metadata": "",
            "accept_time": now,
            "processing_mode": processing_mode,
        },
        "message_metadata": "",
    }


class _Delivery:
    """One delivery report to post; the body is built by the worker, off the send path."""

    __slots__ = (
        "accepted_time",
        "app_id",
        "failed",
        "message",
        "message_id",
        "mode",
        "status",
        "url",
    )

    def __init__(
        self,
        url: str,
        app_id: str,
        message_id: str,
        accepted_time: str,
        message: Mapping[str, Any],
        status: str,
        failed: bool,
        mode: ProcessingMode,
    ) -> None:
        self.url = url
        self.app_id = app_id
        self.message_id = message_id
        self.accepted_time = accepted_time
        self.message = message
        self.status = status
        self.failed = failed
        self.mode = mode


_Job = _Delivery | tuple[str, dict[str, Any]]


class CallbackDispatcher:
    """Bounded worker pool posting signed callbacks; owned by the simulator app.

    ``start()``/``stop()`` are idempotent. ``totals`` (monotonic) counts ``ok``
    (posted, 2xx), ``retry`` (attempts retried), ``failed`` (given up) and
    ``dropped`` (queue full).
    """

    def __init__(
        self,
        settings: SimulatorSettings,
        rng: random.Random,
        stamper: Stamper,
    ) -> None:
        self._settings = settings
        self._rng = rng
        self._stamper = stamper
        self.failed_fraction = settings.callback_failed_fraction
        self.totals: dict[str, int] = dict.fromkeys(_RESULTS, 0)
        self._baseline = dict(self.totals)
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(settings.callback_queue_size)
        # (due, sequence, job): departures of different apps interleave, so a heap.
        self._delayed: list[tuple[float, int, _Delivery]] = []
        self._sequence = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def counts(self) -> dict[str, int]:
        """Results since the last :meth:`reset_counts` (``totals`` never go back)."""
        return {k: n - self._baseline[k] for k, n in self.totals.items()}

    def reset_counts(self) -> None:
        self._baseline = dict(self.totals)

    @property
    def pending(self) -> int:
        """Callbacks queued or waiting for their delay."""
        return self._queue.qsize() + len(self._delayed)

    async def start(self) -> None:
        if self._session is not None or self._closed:
            return
        timeout = aiohttp.ClientTimeout(total=self._settings.callback_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._tasks.append(asyncio.create_task(self._scheduler(), name="sim-callback-delay"))
        self._tasks.extend(
            asyncio.create_task(self._worker(), name=f"sim-callback-{i}")
            for i in range(self._settings.callback_workers)
        )

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> CallbackDispatcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def message_accepted(
        self,
        now: float,
        app_id: str,
        message_id: str,
        accepted_time: str,
        body: dict[str, Any],
        mode: ProcessingMode = "CONVERSATION",
    ) -> None:
        """Queue QUEUED_ON_CHANNEL now and DELIVERED/FAILED after the delay.

        Called when the message leaves its app's ingress queue (``now``).
        """
        url = self.report_url(body)
        if url is None:
            return
        self._offer(
            _Delivery(
                url, app_id, message_id, accepted_time, body, "QUEUED_ON_CHANNEL", False, mode
            )
        )
        failed = self.failed_fraction > 0.0 and self._rng.random() < self.failed_fraction
        final = "FAILED" if failed else "DELIVERED"
        self._schedule(
            now + self._settings.callback_delay_s,
            _Delivery(url, app_id, message_id, accepted_time, body, final, failed, mode),
        )

    def report_url(self, body: Mapping[str, Any]) -> str | None:
        """Where the delivery reports of a send go: its own URL, else the configured one."""
        url = body.get("callback_url") or self._settings.callback_url
        return url if isinstance(url, str) and url else None

    def _schedule(self, due: float, job: _Delivery) -> None:
        delayed = self._delayed
        if len(delayed) >= self._settings.callback_queue_size:
            self._count("dropped")
            return
        heapq.heappush(delayed, (due, next(self._sequence), job))
        if delayed[0][2] is job:
            self._wake.set()  # a new earliest job: the scheduler re-arms its timer

    def inbound(
        self, app_id: str, text: str, identity: str, mode: ProcessingMode = "CONVERSATION"
    ) -> str | None:
        """Queue a MESSAGE_INBOUND callback; its message id, or None if not queued."""
        url = self._settings.callback_url
        if url is None:
            return None
        message_id = self._stamper.new_id()
        body = inbound_message(
            project_id=self._settings.project_id,
            app_id=app_id,
            message_id=message_id,
            text=text,
            identity=identity,
            processing_mode=mode,
        )
        return message_id if self._offer((url, body)) else None

    def _offer(self, job: _Job) -> bool:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._count("dropped")
            return False
        return True

    def _count(self, result: str) -> None:
        self.totals[result] += 1

    async def _scheduler(self) -> None:
        loop = asyncio.get_running_loop()
        delayed = self._delayed
        wake = self._wake
        while True:
            wake.clear()
            if not delayed:
                await wake.wait()
                continue
            due = delayed[0][0]
            if due > loop.time():
                timer = loop.call_at(due, wake.set)
                try:
                    await wake.wait()
                finally:
                    timer.cancel()
                continue
            self._offer(heapq.heappop(delayed)[2])

    async def _worker(self) -> None:
        queue = self._queue
        while True:
            job = await queue.get()
            try:
                await self._post(job)
            except Exception:
                log.exception("simulator callback crashed")
                self._count("failed")
            finally:
                queue.task_done()

    def _render(self, job: _Job) -> tuple[str, bytes]:
        if isinstance(job, tuple):
            return job[0], orjson.dumps(job[1])
        message = job.message
        metadata = message.get("message_metadata", "")
        correlation = message.get("correlation_id", "")
        body = delivery_report(
            project_id=self._settings.project_id,
            app_id=job.app_id,
            message_id=job.message_id,
            accepted_time=job.accepted_time,
            status=job.status,
            recipient=message.get("recipient", {}),
            message_metadata=metadata if isinstance(metadata, str) else "",
            correlation_id=correlation if isinstance(correlation, str) else "",
            failed=job.failed,
            processing_mode=job.mode,
        )
        return job.url, orjson.dumps(body)

    async def _post(self, job: _Job) -> None:
        assert self._session is not None  # noqa: S101 - workers run only after start()
        url, body = self._render(job)
        secret = self._settings.callback_secret
        retries = self._settings.callback_retries
        for attempt in range(retries + 1):
            headers = {"Content-Type": "application/json"}
            if secret:
                headers.update(signature_headers(secret, body))
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        self._count("ok")
                        return
            if attempt < retries:
                self._count("retry")
                await asyncio.sleep(_RETRY_BASE_S * 2**attempt)
        self._count("failed")
