"""The Conversation API client against real in-process aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.errors import SinchError, TransportError
from gateway.settings import Settings, load
from gateway.sinch import Accepted, AppInfo, SinchClient, parse_retry_delay, retry_hint

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def settings_for(base: str, **overrides: Any) -> Settings:
    return load(
        env={},
        project_id="demo-project",
        key_id="demo-key",
        key_secret="demo-secret",
        conversation_url=base + "/{region}",
        auth_url=base + "/oauth2/token",
        **overrides,
    )


def error_body(status: int, name: str, details: list[Any] | None = None) -> bytes:
    error = {"code": status, "message": "m", "status": name, "details": details or []}
    return orjson.dumps({"error": error})


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Callable[[Handler], Awaitable[str]]:
    """Serve one handler for every path; returns the base URL."""

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = await aiohttp_server(app)
        return f"http://127.0.0.1:{server.port}"

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def send(client: SinchClient) -> Accepted:
    return await client.send(
        region="us", project_id="p1", body=b'{"app_id": "a1"}', authorization="Bearer t"
    )


def answering(status: int, body: bytes, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=body, headers=headers)

    return handler


async def error_for(upstream: Any, http: aiohttp.ClientSession, handler: Handler, **kw: Any) -> Any:
    base = await upstream(handler)
    with pytest.raises(SinchError) as info:
        await send(SinchClient(settings_for(base, **kw), http))
    return info.value


async def test_a_200_answer_is_parsed(upstream, http):
    base = await upstream(answering(200, b'{"message_id": "m1", "accepted_time": "t1"}'))
    assert await send(SinchClient(settings_for(base), http)) == Accepted("m1", "t1")


@pytest.mark.parametrize("body", [b"not json", b"{}", b'{"message_id": 7}', b"[]", b""])
async def test_a_200_without_a_readable_body_is_sent_with_no_id(upstream, http, caplog, body):
    base = await upstream(answering(200, body))
    with caplog.at_level(logging.WARNING, logger="gateway.sinch"):
        accepted = await send(SinchClient(settings_for(base), http))
    assert accepted == Accepted(message_id=None, accepted_time=None)
    assert len(caplog.records) == 1
    if body:
        assert body.decode() not in caplog.text


async def test_a_200_whose_body_is_cut_off_is_still_sent(upstream, http):
    async def truncated(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=200)
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"message_id": "m')
        assert request.transport is not None
        request.transport.close()
        return resp

    base = await upstream(truncated)
    assert await send(SinchClient(settings_for(base), http)) == Accepted(None, None)


async def test_retry_after_is_capped_at_backoff_max(upstream, http):
    handler = answering(429, error_body(429, "RESOURCE_EXHAUSTED"), {"Retry-After": "3600"})
    error = await error_for(upstream, http, handler, backoff_max_s=7.0)
    assert (error.status, error.retry_after_s) == (429, 7.0)


async def test_retry_info_in_the_error_body_is_honoured(upstream, http):
    details = [{"@type": RETRY_INFO, "retryDelay": "2.5s"}]
    error = await error_for(upstream, http, answering(429, error_body(429, "X", details)))
    assert error.retry_after_s == 2.5


@pytest.mark.parametrize(
    ("header", "delay", "expected"),
    [("1", "2.5s", 2.5), ("4", "0.500s", 4.0), ("120", "90s", 10.0), (None, "600s", 10.0)],
)
async def test_the_larger_hint_wins_and_is_capped(upstream, http, header, delay, expected):
    details = [{"@type": RETRY_INFO, "retryDelay": delay}]
    headers = {"Retry-After": header} if header else None
    handler = answering(503, error_body(503, "UNAVAILABLE", details), headers)
    error = await error_for(upstream, http, handler, backoff_max_s=10.0)
    assert error.retry_after_s == expected


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        ({"@type": RETRY_INFO, "retryDelay": "3s"}, 3.0),
        ({"@type": RETRY_INFO, "retryDelay": "0.500s"}, 0.5),
        ({"@type": RETRY_INFO, "retryDelay": {"seconds": "2", "nanos": 500_000_000}}, 2.5),
        ({"@type": RETRY_INFO, "retryDelay": "-1s"}, 0.0),
        ({"@type": RETRY_INFO, "retryDelay": "soon"}, None),
        ({"@type": RETRY_INFO, "retryDelay": "3"}, None),
        ({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "retryDelay": "3s"}, None),
        ("RetryInfo 3s", None),
    ],
)
def test_retry_delay_parsing(detail, expected):
    assert parse_retry_delay({"details": [detail]}) == expected
    assert parse_retry_delay({"details": "oops"}) is None
    assert retry_hint(None, {}) is None


async def test_an_error_body_that_is_not_json_keeps_the_status(upstream, http):
    error = await error_for(upstream, http, answering(502, b"<html>bad gateway</html>"))
    assert (error.status, error.error["message"]) == (502, "error body is not JSON")
    assert error.retry_after_s is None


async def test_an_expired_token_401_is_flagged(upstream, http):
    handler = answering(
        401,
        error_body(401, "UNAUTHENTICATED"),
        {"WWW-Authenticate": 'Bearer error="invalid_token", error_description="expired"'},
    )
    error = await error_for(upstream, http, handler)
    assert error.token_expired


async def test_a_refused_connection_is_not_in_doubt():
    # a bound socket that does not listen: connecting to it is refused at once
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        async with aiohttp.ClientSession() as http:
            client = SinchClient(settings_for(f"http://127.0.0.1:{port}"), http)
            with pytest.raises(TransportError) as info:
                await send(client)
    assert (info.value.kind, info.value.in_doubt) == ("connect_error", False)
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)


class Silent:
    """A server that reads each request and never answers (until the test ends)."""

    def __init__(self) -> None:
        self.base = ""
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handler(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrived.set()
        await self.release.wait()
        return web.Response(status=500)


@pytest.fixture
async def silent(upstream: Any) -> AsyncIterator[Silent]:
    server = Silent()
    server.base = await upstream(server.handler)
    yield server
    server.release.set()


async def test_a_connect_timeout_is_not_in_doubt(silent):
    # the only pooled connection is held by a request Sinch never answers: the
    # next one times out waiting to connect, before anything left the host
    timeout = aiohttp.ClientTimeout(total=5, connect=0.2)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        client = SinchClient(settings_for(silent.base), http)
        holder = asyncio.create_task(send(client))
        async with asyncio.timeout(5):
            await silent.arrived.wait()
        with pytest.raises(TransportError) as info:
            await send(client)
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
    assert (info.value.kind, info.value.in_doubt) == ("connect_timeout", False)
    assert isinstance(info.value.__cause__, aiohttp.ConnectionTimeoutError)


@pytest.mark.parametrize(
    ("timeout", "kind"),
    [
        (aiohttp.ClientTimeout(total=5, sock_read=0.2), "read_timeout"),
        (aiohttp.ClientTimeout(total=0.2), "timeout"),
    ],
)
async def test_a_request_that_got_no_answer_is_in_doubt(silent, timeout, kind):
    async with aiohttp.ClientSession(timeout=timeout) as http:
        with pytest.raises(TransportError) as info:
            await send(SinchClient(settings_for(silent.base), http))
    assert (info.value.kind, info.value.in_doubt) == (kind, True)


# -- get_app ---------------------------------------------------------------------


async def get_app(client: SinchClient, app_id: str = "a1", region: str = "us") -> AppInfo:
    return await client.get_app(
        region=region, project_id="demo-project", app_id=app_id, authorization="Bearer t"
    )


async def test_get_app_reads_rate_and_queue_from_the_simulator(simulator_factory, http):
    sim = await simulator_factory(
        app_rates={"fast": 100},
        drain_factors={"fast": 0.001},  # what is sent stays queued while the test runs
        apps={"fast": "eu"},
        basic_auth_rate=100,
    )
    client = SinchClient(settings_for(sim.base), http)
    basic = "Basic " + base64.b64encode(b"demo-key:demo-secret").decode()
    for _ in range(3):
        await client.send(
            region="eu",
            project_id="demo-project",
            body=orjson.dumps(
                {
                    "app_id": "fast",
                    "recipient": {"contact_id": "c"},
                    "message": {"text_message": {"text": "x"}},
                }
            ),
            authorization=basic,
        )
    info = await client.get_app(
        region="eu", project_id="demo-project", app_id="fast", authorization=basic
    )
    assert info == AppInfo(
        app_id="fast", outbound_rate=100.0, outbound_size=3, outbound_limit=500_000
    )


async def test_get_app_in_the_wrong_region_is_a_sinch_error(simulator_factory, http):
    sim = await simulator_factory(apps={"fast": "eu"})
    client = SinchClient(settings_for(sim.base), http)
    basic = "Basic " + base64.b64encode(b"demo-key:demo-secret").decode()
    with pytest.raises(SinchError) as info:
        await client.get_app(
            region="us", project_id="demo-project", app_id="fast", authorization=basic
        )
    assert info.value.status == 404
    assert info.value.error["status"] == "NOT_FOUND"


async def test_get_app_quotes_the_app_id_and_sends_the_authorization(upstream, http):
    seen: list[tuple[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.raw_path, request.headers["Authorization"]))
        return web.json_response({"rate_limits": {"outbound": 20}})

    client = SinchClient(settings_for(await upstream(handler)), http)
    info = await get_app(client, app_id="a/b c")
    assert seen == [("/us/v1/projects/demo-project/apps/a%2Fb%20c", "Bearer t")]
    assert info == AppInfo(
        app_id="a/b c", outbound_rate=20.0, outbound_size=None, outbound_limit=None
    )


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        # int64 fields in proto JSON may come as strings
        (
            {
                "rate_limits": {"outbound": "40"},
                "queue_stats": {"outbound_size": "7", "outbound_limit": "500000"},
            },
            (40.0, 7, 500_000),
        ),
        ({"rate_limits": {"outbound": 0}, "queue_stats": {}}, (None, None, None)),
        ({"rate_limits": {"outbound": -5, "inbound": 20}}, (None, None, None)),
        (
            {"rate_limits": {"outbound": True}, "queue_stats": {"outbound_size": "many"}},
            (None, None, None),
        ),
        ({"rate_limits": "20"}, (None, None, None)),
        ([1, 2], (None, None, None)),
    ],
)
async def test_get_app_fields_it_cannot_use_are_none(upstream, http, doc, expected):
    client = SinchClient(settings_for(await upstream(answering(200, orjson.dumps(doc)))), http)
    info = await get_app(client)
    assert (info.outbound_rate, info.outbound_size, info.outbound_limit) == expected


async def test_get_app_errors_map_as_for_send(upstream, http):
    handler = answering(
        429,
        error_body(429, "RESOURCE_EXHAUSTED", [{"@type": RETRY_INFO, "retryDelay": "2s"}]),
        {"Retry-After": "1"},
    )
    client = SinchClient(settings_for(await upstream(handler)), http)
    with pytest.raises(SinchError) as info:
        await get_app(client)
    assert (info.value.status, info.value.retry_after_s) == (429, 2.0)
    expired = answering(
        401,
        error_body(401, "UNAUTHENTICATED"),
        {"WWW-Authenticate": 'Bearer error="invalid_token", error_description="expired"'},
    )
    client = SinchClient(settings_for(await upstream(expired)), http)
    with pytest.raises(SinchError) as info:
        await get_app(client)
    assert info.value.token_expired


async def test_get_app_without_an_answer_is_a_transport_error(silent):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as http:
        with pytest.raises(TransportError) as info:
            await get_app(SinchClient(settings_for(silent.base), http))
    assert info.value.kind == "timeout"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        async with aiohttp.ClientSession() as http:
            with pytest.raises(TransportError) as info:
                await get_app(SinchClient(settings_for(f"http://127.0.0.1:{port}"), http))
    assert info.value.kind == "connect_error"
