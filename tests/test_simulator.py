"""The Sinch simulator against real in-process servers (pytest-aiohttp)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import pytest
from aiohttp import encode_basic_auth, web
from aiohttp.test_utils import TestClient, TestServer
from sinch.domains.conversation.sinch_events.v1.conversation_sinch_event import (
    ConversationSinchEvent,
)

from gateway.simulator import cli
from gateway.simulator.callbacks import Stamper, sign
from gateway.simulator.ingress import IngressQueue
from gateway.simulator.server import SIMULATOR_KEY, make_app
from gateway.simulator.settings import ProjectSpec, SimulatorSettings, patch
from gateway.simulator.windows import LeakyQueue, SlidingWindow

Client = TestClient[web.Request, web.Application]
SimFactory = Callable[..., Awaitable[Client]]

BASIC = encode_basic_auth("demo-key", "demo-secret")
SEND = "/us/v1/projects/demo-project/messages:send"
# Public test vector of the Sinch SDKs (Node, Java, .NET authorization helper tests).
VECTOR = {
    "secret": "foo_secret1234",
    "nonce": "01FJA8B4A7BM43YGWSG9GBV067",
    "timestamp": "1634579353",
    "body": (
        '{"app_id":"","accepted_time":"2021-10-18T17:49:13.813615Z",'
        '"project_id":"e2df3a34-a71b-4448-9db5-a8d2baad28e4",'
        '"contact_create_notification":{"contact":{"id":"01FJA8B466Y0R2GNXD78MD9SM1",'
        '"channel_identities":[{"channel":"SMS","identity":"48123456789","app_id":""}],'
        '"display_name":"New Test Contact","email":"new.contact@email.com",'
        '"external_id":"","metadata":"","language":"EN_US"}},"message_metadata":""}'
    ),
    "signature": "6bpJoRmFoXVjfJIVglMoJzYXxnoxRujzR4k2GOXewOE=",
}
ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def sim(aiohttp_client: Any) -> SimFactory:
    async def factory(**overrides: Any) -> Client:
        client: Client = await aiohttp_client(make_app(SimulatorSettings(**overrides)))
        return client

    return factory


def body(app_id: str = "app-1", **extra: Any) -> dict[str, Any]:
    return {
        "app_id": app_id,
        "recipient": {
            "identified_by": {"channel_identities": [{"channel": "SMS", "identity": "46701"}]}
        },
        "message": {"text_message": {"text": "hello"}},
        **extra,
    }


async def get_token(client: Client) -> str:
    resp = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, headers={"Authorization": BASIC}
    )
    assert resp.status == 200
    data = await resp.json()
    return str(data["access_token"])


async def send(
    client: Client, token: str, payload: Any = None, path: str = SEND, **extra: Any
) -> tuple[int, Any, Any]:
    resp = await client.post(
        path,
        json=body(**extra) if payload is None else payload,
        headers={"Authorization": f"Bearer {token}"},
    )
    return resp.status, await resp.json(), resp.headers


async def stats(client: Client) -> dict[str, Any]:
    resp = await client.get("/_sim/stats")
    result: dict[str, Any] = await resp.json()
    return result


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


def assert_error(data: Any, code: int, status: str) -> None:
    assert data["error"]["code"] == code
    assert data["error"]["status"] == status
    assert isinstance(data["error"]["message"], str)
    assert isinstance(data["error"]["details"], list)


# -- settings and windows ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"app_rate": 0}, "app_rate"),
        ({"apps": {"a": "asia"}}, "apps['a']"),
        ({"port": 70000}, "port"),
        ({"callback_url": "ftp://x"}, "callback_url"),
        ({"app_rates": {"a": -1}}, "app_rates['a']"),
        ({"drain_factors": {"a": 0}}, "drain_factors['a']"),
        ({"processing_mode": "BATCH"}, "processing_mode"),
        ({"processing_modes": {"a": "BATCH"}}, "processing_modes['a']"),
        ({"queue_size": 0}, "queue_size"),
        ({"max_request_bytes": 10}, "max_request_bytes"),
    ],
)
def test_settings_reject_bad_values_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        SimulatorSettings(**overrides)


def test_patch_merges_app_rates_and_rejects_unknown_keys() -> None:
    base = SimulatorSettings(app_rates={"a": 5.0, "b": 6.0})
    changed = patch(base, {"app_rates": {"a": None, "c": 7}, "strict": True})
    assert changed.app_rates == {"b": 6.0, "c": 7.0}
    assert changed.strict
    with pytest.raises(ValueError, match="host"):
        patch(base, {"host": "0.0.0.0"})
    with pytest.raises(ValueError, match="strict"):
        patch(base, {"strict": 1})


def test_patch_merges_drain_factors_and_modes() -> None:
    base = SimulatorSettings(app_rate=20, drain_factors={"a": 0.5})
    changed = patch(
        base,
        {
            "drain_factors": {"a": None, "b": 0.25},
            "processing_modes": {"b": "CONVERSATION"},
            "project_forbidden": True,
            "queue_size": 10,
        },
    )
    assert changed.drain_factors == {"b": 0.25}
    assert changed.drain_rate("a") == 20.0
    assert changed.drain_rate("b") == 5.0
    assert changed.processing_mode_of("b") == "CONVERSATION"
    assert changed.processing_mode_of("a") == "DISPATCH"
    assert changed.project_forbidden
    assert changed.queue_size == 10
    for bad, field in (
        ({"processing_modes": {"b": "X"}}, "processing_modes['b']"),
        ({"drain_factors": {"b": "fast"}}, "drain_factors['b']"),
        ({"queue_size": 2.5}, "queue_size"),
        ({"project_forbidden": 1}, "project_forbidden"),
    ):
        with pytest.raises(ValueError, match=re.escape(field)):
            patch(base, bad)


def test_ingress_queue_lets_tracked_messages_out_in_order() -> None:
    queue = IngressQueue("a", 0.0)
    assert queue.push("m1")  # the queue just got its first tracked message
    assert not queue.push("m2")
    assert not queue.push()  # untracked: counts in the depth only
    queue.push("m4")
    assert queue.size(0.0, 2.0) == 4
    assert queue.next_departure(0.0, 2.0) == pytest.approx(0.5)
    assert queue.leave(0.49, 2.0) == []
    assert queue.leave(0.5, 2.0) == ["m1"]
    assert queue.size(0.5, 2.0) == 3
    assert queue.next_departure(0.5, 2.0) == pytest.approx(1.0)
    assert queue.leave(1.6, 2.0) == ["m2"]  # 3.2 drained: m4 leaves at 4
    assert queue.size(1.6, 2.0) == 1  # a partly drained message still waits
    assert queue.next_departure(1.6, 4.0) == pytest.approx(1.8)  # at a new rate
    assert queue.leave(1.8, 4.0) == ["m4"]
    assert queue.size(1.8, 4.0) == 0
    assert queue.next_departure(1.8, 4.0) is None


def test_sliding_window_is_exact() -> None:
    window = SlidingWindow(1.0)
    for t in (0.0, 0.1, 0.5, 0.9):
        window.add(t)
    assert window.count(0.95) == 4
    assert window.count(1.0) == 3  # the event at 0.0 has left (t > now - 1)
    assert window.wait_s(1.0, 3) == pytest.approx(0.1)
    assert window.add(1.15) == 3  # 0.5, 0.9, 1.15
    assert window.peak == 4


def test_leaky_queue_drains_at_rate() -> None:
    queue = LeakyQueue(0.0)
    assert queue.wait_s(0.0, 2.0, 2) == 0.0
    queue.push()
    queue.push()
    assert queue.wait_s(0.0, 2.0, 2) == pytest.approx(0.5)
    assert queue.wait_s(0.5, 2.0, 2) == 0.0
    assert queue.depth == pytest.approx(1.0)


# -- OAuth -------------------------------------------------------------------------


async def test_token_issue_and_bad_credentials(sim: SimFactory) -> None:
    client = await sim(token_lifetime_s=120.5)
    resp = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, headers={"Authorization": BASIC}
    )
    data = await resp.json()
    assert resp.status == 200
    assert set(data) == {"access_token", "expires_in", "scope", "token_type"}
    assert data["expires_in"] == 120
    assert data["token_type"] == "bearer"
    assert data["scope"] == ""

    wrong = encode_basic_auth("demo-key", "nope")
    for headers in ({"Authorization": wrong}, {}):
        resp = await client.post(
            "/oauth2/token", data={"grant_type": "client_credentials"}, headers=headers
        )
        assert resp.status == 401
        assert_error(await resp.json(), 401, "UNAUTHENTICATED")

    resp = await client.post(
        "/oauth2/token", data={"grant_type": "password"}, headers={"Authorization": BASIC}
    )
    assert resp.status == 400
    assert_error(await resp.json(), 400, "INVALID_ARGUMENT")
    assert (await stats(client))["token_requests"] == 4


async def test_token_expires_after_its_fractional_lifetime(sim: SimFactory) -> None:
    client = await sim(token_lifetime_s=0.2)
    token = await get_token(client)
    status, _, _ = await send(client, token)
    assert status == 200
    await asyncio.sleep(0.25)
    status, data, headers = await send(client, token)
    assert status == 401
    assert_error(data, 401, "UNAUTHENTICATED")
    assert "expired" in headers["www-authenticate"]


async def test_expire_tokens_endpoint(sim: SimFactory) -> None:
    client = await sim()
    token = await get_token(client)
    assert (await send(client, token))[0] == 200
    resp = await client.post("/_sim/expire-tokens")
    assert resp.status == 200
    status, _, headers = await send(client, token)
    assert status == 401
    assert (
        headers["www-authenticate"] == 'Bearer error="invalid_token", error_description="expired"'
    )
    assert (await send(client, await get_token(client)))[0] == 200


async def test_send_401_bodies(sim: SimFactory) -> None:
    client = await sim()
    resp = await client.post(SEND, json=body())
    assert resp.status == 401
    assert_error(await resp.json(), 401, "UNAUTHENTICATED")
    assert "expired" not in resp.headers.get("www-authenticate", "")
    status, data, headers = await send(client, "not-a-token")
    assert status == 401
    assert_error(data, 401, "UNAUTHENTICATED")
    assert "expired" not in headers["www-authenticate"]
    assert (await stats(client))["unauthorized_401"] == 2


# -- send validation and routing -----------------------------------------------------


async def test_send_success_shape(sim: SimFactory) -> None:
    client = await sim()
    token = await get_token(client)
    status, data, _ = await send(client, token)
    assert status == 200
    assert set(data) == {"accepted_time", "message_id"}
    assert ULID_RE.match(data["message_id"])
    assert TIME_RE.match(data["accepted_time"])
    resp = await client.post(
        "/v1/projects/demo-project/messages:send",
        json=body(recipient={"contact_id": "c-1"}),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resp.status == 200


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"{not json", ""),
        ([1, 2], ""),
        ({**body(), "app_id": 5}, "app_id"),
        ({**body(), "recipient": {}}, "recipient.identified_by.channel_identities"),
        (
            {
                **body(),
                "recipient": {"identified_by": {"channel_identities": [{"channel": "SMS"}]}},
            },
            "recipient.identified_by.channel_identities[0]",
        ),
        ({**body(), "message": {"text_message": {"text": "a"}, "media_message": {}}}, "message"),
        ({**body(), "message": {"unknown_message": {}}}, "message"),
        ({**body(), "message": {"text_message": {}}}, "message.text_message.text"),
    ],
)
async def test_send_400_field_violations(sim: SimFactory, payload: Any, field: str) -> None:
    client = await sim()
    token = await get_token(client)
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    resp = await client.post(
        SEND,
        data=data,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert resp.status == 400
    error = await resp.json()
    assert_error(error, 400, "INVALID_ARGUMENT")
    (detail,) = error["error"]["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert field in [v["field"] for v in detail["field_violations"]]
    assert all(v["description"] for v in detail["field_violations"])


async def test_send_404_project_app_and_region(sim: SimFactory) -> None:
    client = await sim(apps={"app-us": "us", "app-eu": "eu"})
    token = await get_token(client)
    status, data, _ = await send(client, token, path=SEND.replace("demo-project", "other"))
    assert (status, data["error"]["status"]) == (404, "NOT_FOUND")
    status, data, _ = await send(client, token, app_id="ghost")
    assert (status, data["error"]["status"]) == (404, "NOT_FOUND")
    status, data, _ = await send(client, token, app_id="app-eu")
    assert (status, data["error"]["status"]) == (404, "NOT_FOUND")
    bare = "/v1/projects/demo-project/messages:send"
    assert (await send(client, token, path=bare, app_id="app-eu"))[0] == 404
    assert (await send(client, token, path=bare, app_id="app-us"))[0] == 200
    eu = "/eu/v1/projects/demo-project/messages:send"
    assert (await send(client, token, path=eu, app_id="app-eu"))[0] == 200
    assert (await stats(client))["not_found_404"] == 4


# -- rate limits ---------------------------------------------------------------------


async def test_strict_mode_429_over_the_app_rate(sim: SimFactory) -> None:
    client = await sim(strict=True, app_rate=5.0)
    token = await get_token(client)
    results = [await send(client, token) for _ in range(7)]
    assert [r[0] for r in results] == [200] * 5 + [429, 429]
    _, data, headers = results[5]
    assert_error(data, 429, "RESOURCE_EXHAUSTED")
    assert data["error"]["details"] == [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}
    ]
    assert headers["Retry-After"] == "1"
    assert (await send(client, token, app_id="app-2"))[0] == 200  # other apps unaffected
    counters = await stats(client)
    assert counters["rejected_429"] == {"total": 2, "project": 0, "app": 2, "basic": 0}
    assert counters["max_received_per_s"]["by_app"]["app-1"] == 7
    assert counters["max_accepted_per_s"]["by_app"]["app-1"] == 5


async def test_strict_mode_no_429_when_paced_just_under(sim: SimFactory) -> None:
    client = await sim(strict=True, app_rate=10.0)
    token = await get_token(client)
    for _ in range(14):
        status, _, _ = await send(client, token)
        assert status == 200
        await asyncio.sleep(0.11)
    counters = await stats(client)
    assert counters["rejected_429"]["total"] == 0
    assert counters["max_accepted_per_s"]["by_app"]["app-1"] <= 10


async def test_project_cap_429_across_apps(sim: SimFactory) -> None:
    client = await sim(project_rate=4, app_rate=100.0)
    token = await get_token(client)
    statuses = [(await send(client, token, app_id=f"app-{i % 2}"))[0] for i in range(6)]
    assert statuses == [200] * 4 + [429, 429]
    status, data, headers = await send(client, token, app_id="app-9")
    assert status == 429
    assert_error(data, 429, "RESOURCE_EXHAUSTED")
    assert headers["Retry-After"] == "1"
    counters = await stats(client)
    assert counters["rejected_429"]["project"] == 3
    assert counters["max_received_per_s"]["project"] == 7
    assert counters["max_accepted_per_s"]["project"] == 4


async def test_normal_mode_queue_full_429(sim: SimFactory) -> None:
    client = await sim(queue_size=3, app_rate=0.5)
    token = await get_token(client)
    statuses = [(await send(client, token))[0] for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    status, data, headers = await send(client, token)
    assert status == 429
    assert data["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert 1 <= int(headers["Retry-After"]) <= 2  # one message drains in 2 s
    assert (await stats(client))["rejected_429"]["app"] == 3


async def test_basic_auth_sends_are_heavily_limited(sim: SimFactory) -> None:
    client = await sim(basic_auth_rate=2.0)
    statuses = []
    for _ in range(4):
        resp = await client.post(SEND, json=body(), headers={"Authorization": BASIC})
        statuses.append(resp.status)
    assert statuses == [200, 200, 429, 429]
    resp = await client.post(
        SEND, json=body(), headers={"Authorization": encode_basic_auth("demo-key", "x")}
    )
    assert resp.status == 401
    assert (await stats(client))["rejected_429"]["basic"] == 2


async def test_error_rate_one_gives_only_5xx(sim: SimFactory) -> None:
    client = await sim(error_rate=1.0, seed=7)
    token = await get_token(client)
    seen = set()
    for _ in range(30):
        status, data, headers = await send(client, token)
        assert status in (500, 503)
        assert_error(data, status, "INTERNAL" if status == 500 else "UNAVAILABLE")
        assert "Retry-After" not in headers
        seen.add(status)
    assert seen == {500, 503}
    counters = await stats(client)
    assert counters["injected_5xx"]["total"] == 30
    assert counters["accepted_total"] == 0


async def test_runtime_config_patch(sim: SimFactory) -> None:
    client = await sim()
    token = await get_token(client)
    resp = await client.post("/_sim/config", json={"error_rate": 1.0, "app_rates": {"x": 3}})
    assert resp.status == 200
    assert await resp.json() == {"app_rates": {"x": 3.0}, "error_rate": 1.0}
    assert (await send(client, token))[0] in (500, 503)
    await client.post("/_sim/config", json={"error_rate": 0})
    assert (await send(client, token))[0] == 200
    for bad in ({"error_rate": 2}, {"port": 1}, {"strict": "yes"}):
        resp = await client.post("/_sim/config", json=bad)
        assert resp.status == 400
        assert_error(await resp.json(), 400, "INVALID_ARGUMENT")
    await client.post("/_sim/config", json={"strict": True, "app_rate": 1})
    assert [(await send(client, token, app_id="z"))[0] for _ in range(2)] == [200, 429]


async def test_latency_is_added(sim: SimFactory) -> None:
    client = await sim(latency_s=0.1)
    token = await get_token(client)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await send(client, token))[0] == 200
    assert loop.time() - started >= 0.1


# -- hold, stats, accepted log, metrics ----------------------------------------------


async def test_hold_and_release(sim: SimFactory) -> None:
    client = await sim()
    token = await get_token(client)
    resp = await client.post("/_sim/hold", json={"app_id": "app-1"})
    assert await resp.json() == {"hold_all": False, "held_apps": ["app-1"]}
    held = asyncio.create_task(send(client, token))

    async def one_held() -> bool:
        return bool((await stats(client))["held"] == 1)

    await wait_for(one_held)
    assert (await send(client, token, app_id="app-2"))[0] == 200  # other apps flow
    assert not held.done()
    await client.post("/_sim/release", json={})
    status, _, _ = await asyncio.wait_for(held, 5)
    assert status == 200

    await client.post("/_sim/hold", json={})
    held = asyncio.create_task(send(client, token, app_id="app-3"))
    await wait_for(one_held)
    await client.post("/_sim/release")
    assert (await asyncio.wait_for(held, 5))[0] == 200
    assert (await stats(client))["held"] == 0


async def test_stats_duplicates_and_accepted_log(sim: SimFactory) -> None:
    client = await sim()
    token = await get_token(client)
    ids = []
    for cid in ("r-1", "r-2", "r-1", "r-1"):
        status, data, _ = await send(client, token, correlation_id=cid)
        assert status == 200
        ids.append(data["message_id"])
    status, data, _ = await send(client, token, app_id="app-2", message_metadata="r-2")
    ids.append(data["message_id"])
    await send(client, token, app_id="app-2")  # no id: never a duplicate
    counters = await stats(client)
    assert counters["duplicates"] == {"total": 3, "accepted": 3, "ids": ["r-1", "r-2"]}
    assert counters["accepted_total"] == 6
    assert counters["accepted_by_app"] == {"app-1": 4, "app-2": 2}
    assert counters["max_received_per_s"]["project"] == 6
    assert counters["max_accepted_per_s"]["by_app"] == {"app-1": 4, "app-2": 2}
    assert counters["first_send_time"] <= counters["last_send_time"]
    assert counters["first_send_wall"] <= counters["last_send_wall"]

    log = await (await client.get("/_sim/accepted")).json()
    assert [e["message_id"] for e in log[:5]] == ids
    assert [e["correlation_id"] for e in log] == ["r-1", "r-2", "r-1", "r-1", "r-2", None]
    assert {e["app_id"] for e in log} == {"app-1", "app-2"}
    assert all(TIME_RE.match(e["accepted_time"]) for e in log)

    await client.post("/_sim/reset")
    counters = await stats(client)
    assert counters["accepted_total"] == 0
    assert counters["duplicates"]["total"] == 0
    assert counters["max_received_per_s"]["project"] == 0
    assert await (await client.get("/_sim/accepted")).json() == []
    assert (await send(client, token, correlation_id="r-1"))[0] == 200  # token kept
    assert (await stats(client))["duplicates"]["total"] == 0


async def test_metrics_use_own_registry_and_cap_app_labels(sim: SimFactory) -> None:
    client = await sim(project_rate=1000, app_rate=100.0)
    token = await get_token(client)
    for i in range(102):
        assert (await send(client, token, app_id=f"app-{i}"))[0] == 200
    await send(client, "bad")
    text = await (await client.get("/metrics")).text()
    assert 'sinch_sim_requests_total{code="200",endpoint="send"} 102.0' in text
    assert 'sinch_sim_requests_total{code="401",endpoint="send"} 1.0' in text
    assert 'sinch_sim_accepted_total{app_id="other"} 2.0' in text
    assert 'sinch_sim_accepted_total{app_id="app-99"} 1.0' in text
    assert "sinch_sim_token_requests_total 1.0" in text
    assert text.count("sinch_sim_accepted_total{") == 101
    assert "sinch_sim_callbacks_total" in text


def test_stamper_ids_and_times() -> None:
    stamper = Stamper(random.Random(1))
    stamps = [stamper.stamp() for _ in range(1000)]
    assert len({s[0] for s in stamps}) == 1000
    assert all(ULID_RE.match(s[0]) and TIME_RE.match(s[1]) for s in stamps)
    # The first 10 characters are the millisecond timestamp, as in a ULID.
    ms = 0
    for char in stamps[0][0][:10]:
        ms = ms * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(char)
    first = datetime.fromisoformat(stamps[0][1].replace("Z", "+00:00")).timestamp()
    assert abs(ms / 1000 - first) < 0.002


# -- callbacks -----------------------------------------------------------------------


def test_signature_matches_the_public_vector() -> None:
    vector = VECTOR
    body_bytes = vector["body"].encode()
    signature = sign(vector["secret"], body_bytes, vector["nonce"], vector["timestamp"])
    assert signature == vector["signature"]
    headers = {
        "x-sinch-webhook-signature": signature,
        "x-sinch-webhook-signature-nonce": vector["nonce"],
        "x-sinch-webhook-signature-timestamp": vector["timestamp"],
    }
    validator = ConversationSinchEvent(vector["secret"])
    assert validator.validate_authentication_header(headers, body_bytes)
    assert not ConversationSinchEvent("other").validate_authentication_header(headers, body_bytes)


class Receiver:
    """A webhook that records callbacks; the first ``fail_first`` posts get a 500."""

    def __init__(self, secret: str, fail_first: int = 0) -> None:
        self.validator = ConversationSinchEvent(secret)
        self.events: list[dict[str, Any]] = []
        self.valid: list[bool] = []
        self.fail_first = fail_first
        self.gate = asyncio.Event()
        self.gate.set()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=500)
        await self.gate.wait()
        headers = dict(request.headers)
        self.valid.append(self.validator.validate_authentication_header(headers, raw))
        event = self.validator.parse_event(raw, headers)
        self.events.append({"raw": json.loads(raw), "parsed": event})
        return web.Response(status=200)


@pytest.fixture
def receiver_url(aiohttp_server: Any) -> Callable[[Receiver], Awaitable[str]]:
    async def start(receiver: Receiver) -> str:
        app = web.Application()
        app.router.add_post("/webhooks/sinch", receiver.handle)
        server: TestServer = await aiohttp_server(app)
        return str(server.make_url("/webhooks/sinch"))

    return start


async def test_callbacks_are_signed_and_sdk_parsable(
    sim: SimFactory, receiver_url: Callable[[Receiver], Awaitable[str]]
) -> None:
    receiver = Receiver("s3cret")
    client = await sim(
        callback_url=await receiver_url(receiver),
        callback_secret="s3cret",
        callback_delay_s=0.05,
        processing_modes={"app-1": "CONVERSATION"},
    )
    token = await get_token(client)
    status, data, _ = await send(client, token, correlation_id="req-1", message_metadata="meta")
    assert status == 200

    async def received(n: int) -> bool:
        return len(receiver.events) >= n

    await wait_for(lambda: received(2))
    reports = [e["raw"] for e in receiver.events]
    assert [r["message_delivery_report"]["status"] for r in reports] == [
        "QUEUED_ON_CHANNEL",
        "DELIVERED",
    ]
    first = reports[0]
    assert first["app_id"] == "app-1"
    assert first["project_id"] == "demo-project"
    assert first["correlation_id"] == "req-1"
    assert first["message_metadata"] == "meta"
    assert first["accepted_time"] == data["accepted_time"]
    dr = first["message_delivery_report"]
    assert dr["message_id"] == data["message_id"]
    assert dr["channel_identity"] == {"channel": "SMS", "identity": "46701", "app_id": "app-1"}
    assert dr["processing_mode"] == "CONVERSATION"
    assert dr["contact_id"]
    assert dr["conversation_id"]
    assert type(receiver.events[0]["parsed"]).__name__ == "MessageDeliveryReceiptEvent"
    assert all(receiver.valid)

    await client.post("/_sim/config", json={"callback_failed_fraction": 1.0})
    await send(client, token, recipient={"contact_id": "c-9"})
    await wait_for(lambda: received(4))
    failed = receiver.events[3]["raw"]["message_delivery_report"]
    assert failed["status"] == "FAILED"
    assert failed["reason"]["code"] == "RECIPIENT_NOT_REACHABLE"
    assert failed["contact_id"] == "c-9"

    resp = await client.post(
        "/_sim/inbound", json={"app_id": "app-1", "text": "hi", "identity": "46702"}
    )
    assert resp.status == 200
    await wait_for(lambda: received(5))
    inbound = receiver.events[4]["raw"]
    assert inbound["message"]["direction"] == "TO_APP"
    assert inbound["message"]["contact_message"] == {"text_message": {"text": "hi"}}
    assert inbound["message"]["id"] == (await resp.json())["message_id"]
    assert type(receiver.events[4]["parsed"]).__name__ == "MessageInboundEvent"
    assert all(receiver.valid)
    counts = (await stats(client))["callbacks"]
    assert counts == {"ok": 5, "retry": 0, "failed": 0, "dropped": 0}


async def test_callbacks_retry_then_succeed(
    sim: SimFactory, receiver_url: Callable[[Receiver], Awaitable[str]]
) -> None:
    receiver = Receiver("k", fail_first=2)
    client = await sim(callback_url=await receiver_url(receiver), callback_secret="k")
    resp = await client.post("/_sim/inbound", json={"app_id": "app-1", "text": "yo"})
    assert resp.status == 200

    async def delivered() -> bool:
        return bool((await stats(client))["callbacks"]["ok"] == 1)

    await wait_for(delivered)
    assert (await stats(client))["callbacks"]["retry"] == 2
    assert receiver.valid == [True]
    text = await (await client.get("/metrics")).text()
    assert 'sinch_sim_callbacks_total{result="retry"} 2.0' in text


async def test_callback_queue_full_drops_without_slowing_sends(
    sim: SimFactory, receiver_url: Callable[[Receiver], Awaitable[str]]
) -> None:
    receiver = Receiver("k")
    receiver.gate.clear()
    client = await sim(
        callback_url=await receiver_url(receiver),
        callback_workers=1,
        callback_queue_size=2,
        callback_delay_s=60.0,
    )
    token = await get_token(client)
    for _ in range(6):
        assert (await send(client, token))[0] == 200

    async def dropped() -> bool:
        return bool((await stats(client))["callbacks"]["dropped"] >= 6)

    await wait_for(dropped)  # as the messages leave the ingress queue
    receiver.gate.set()
    resp = await client.post("/_sim/inbound", json={"app_id": "a", "text": "t"})
    assert resp.status in (200, 503)


async def test_a_send_may_name_its_own_callback_url(
    sim: SimFactory, receiver_url: Callable[[Receiver], Awaitable[str]]
) -> None:
    receiver = Receiver("k")
    url = await receiver_url(receiver)
    client = await sim(callback_secret="k", callback_delay_s=0.0)
    token = await get_token(client)
    assert (await send(client, token, callback_url=url, correlation_id="own"))[0] == 200
    assert (await send(client, token))[0] == 200  # no URL anywhere: no callbacks

    async def two() -> bool:
        return len(receiver.events) >= 2

    await wait_for(two)
    assert {e["raw"]["correlation_id"] for e in receiver.events} == {"own"}
    assert all(receiver.valid)


async def test_inbound_without_callback_url_is_409(sim: SimFactory) -> None:
    client = await sim()
    resp = await client.post("/_sim/inbound", json={"app_id": "a", "text": "t"})
    assert resp.status == 409
    resp = await client.post("/_sim/inbound", json={"app_id": 1})
    assert resp.status == 400


# -- CLI -----------------------------------------------------------------------------


def test_cli_flags_to_settings() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    ns = parser.parse_args(
        [
            "--port",
            "9999",
            "--project-rate",
            "5",
            "--strict",
            "--apps",
            "a1:us,a2:eu",
            "--app-rates",
            "a1:50",
            "--error-rate",
            "0.1",
            "--callback-url",
            "http://x/y",
            "--drain-factors",
            "a1:0.5",
            "--processing-modes",
            "a2:CONVERSATION",
            "--max-request-bytes",
            "2048",
        ]
    )
    settings = cli.settings_from_args(ns)
    assert settings.port == 9999
    assert settings.project_rate == 5
    assert settings.strict
    assert settings.apps == {"a1": "us", "a2": "eu"}
    assert settings.app_rates == {"a1": 50.0}
    assert settings.error_rate == 0.1
    assert settings.callback_url == "http://x/y"
    assert settings.drain_factors == {"a1": 0.5}
    assert settings.processing_modes == {"a2": "CONVERSATION"}
    assert settings.processing_mode_of("a1") == "DISPATCH"
    assert settings.max_request_bytes == 2048
    assert (
        cli.settings_from_args(
            parser.parse_args(["--processing-mode", "CONVERSATION"])
        ).processing_mode_of("a1")
        == "CONVERSATION"
    )
    assert cli.settings_from_args(parser.parse_args([])) == SimulatorSettings()
    with pytest.raises(ValueError, match=re.escape("processing_modes['a1']")):
        cli.settings_from_args(parser.parse_args(["--processing-modes", "a1:BATCH"]))
    with pytest.raises(ValueError, match="--drain-factors"):
        cli.settings_from_args(parser.parse_args(["--drain-factors", "a1:slow"]))
    with pytest.raises(ValueError, match="--apps"):
        cli.settings_from_args(parser.parse_args(["--apps", "a1:asia"]))
    with pytest.raises(ValueError, match="error_rate"):
        cli.settings_from_args(parser.parse_args(["--error-rate", "3"]))


async def test_cli_serve_runs_until_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(cli.serve(SimulatorSettings(), stop))

    async def listening() -> bool:
        return "simulator listening on http://127.0.0.1:" in capsys.readouterr().out

    line_seen = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not line_seen:
        assert loop.time() < deadline
        line_seen = await listening()
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_cli_start_returns_the_bound_port() -> None:
    runner, port = await cli.start(SimulatorSettings())
    try:
        assert port > 0
        app = runner.app
        assert isinstance(app, web.Application)
        assert app[SIMULATOR_KEY].settings.port == 0
    finally:
        await runner.cleanup()


# -- ingress queue, app resource, field limits, faults, processing modes ---------------

APP = "/us/v1/projects/demo-project/apps/"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


async def get_app(
    client: Client, app_id: str = "app-1", token: str | None = None, path: str = APP
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {"Authorization": BASIC}
    resp = await client.get(path + app_id, headers=headers)
    return resp.status, await resp.json()


async def queued(client: Client, app_id: str = "app-1") -> int:
    status, data = await get_app(client, app_id)
    assert status == 200
    return int(data["queue_stats"]["outbound_size"])


async def test_queue_mode_accepts_above_the_rate_and_429s_only_when_full(sim: SimFactory) -> None:
    # The queue drains at 0.001 msg/s: nothing leaves while the test runs.
    client = await sim(app_rate=1.0, queue_size=30, drain_factors={"app-1": 0.001})
    token = await get_token(client)
    statuses = [(await send(client, token))[0] for _ in range(30)]
    assert statuses == [200] * 30  # 30 sends in well under a second at 1/s: all queued
    status, data, headers = await send(client, token)
    assert status == 429
    assert_error(data, 429, "RESOURCE_EXHAUSTED")
    assert data["error"]["message"] == "App ingress queue is full."
    (hint,) = data["error"]["details"]
    assert hint["@type"] == RETRY_INFO
    assert hint["retryDelay"] == f"{headers['Retry-After']}s"
    assert int(headers["Retry-After"]) > 900  # one message drains in 1000 s
    assert (await send(client, token, app_id="app-2"))[0] == 200  # other apps unaffected
    counters = await stats(client)
    assert counters["rejected_429"] == {"total": 1, "project": 0, "app": 1, "basic": 0}
    assert counters["queue_size_by_app"] == {"app-1": 30, "app-2": 1}
    status, resource = await get_app(client, token=token)
    assert status == 200
    assert resource["queue_stats"] == {"outbound_size": 30, "outbound_limit": 30}


async def test_get_app_reports_rate_limits_and_a_live_queue(sim: SimFactory) -> None:
    client = await sim(app_rate=20, drain_factors={"app-1": 0.001})
    token = await get_token(client)
    status, resource = await get_app(client, token=token)
    assert status == 200
    assert resource["id"] == "app-1"
    assert resource["processing_mode"] == "DISPATCH"
    assert resource["rate_limits"] == {"outbound": 20, "inbound": 20, "webhooks": 25}
    assert resource["queue_stats"] == {"outbound_size": 0, "outbound_limit": 500_000}

    for _ in range(10):
        assert (await send(client, token))[0] == 200
    assert await queued(client) == 10  # reported 20/s, really drains at 0.02/s

    resp = await client.post("/_sim/config", json={"app_rates": {"app-1": 5}})
    assert resp.status == 200
    status, resource = await get_app(client, token=token)
    assert resource["rate_limits"]["outbound"] == 5
    assert resource["queue_stats"]["outbound_size"] == 10

    # The real drain catches up with a fast rate: the queue empties.
    await client.post(
        "/_sim/config", json={"drain_factors": {"app-1": None}, "app_rates": {"app-1": 1000}}
    )

    async def empty() -> bool:
        return await queued(client) == 0

    await wait_for(empty)
    assert (await stats(client))["app_reads"] >= 4


async def test_get_app_auth_region_project_and_cap(sim: SimFactory) -> None:
    client = await sim(apps={"app-us": "us", "app-eu": "eu"}, project_rate=3)
    resp = await client.get(APP + "app-us")
    assert resp.status == 401
    assert_error(await resp.json(), 401, "UNAUTHENTICATED")
    status, data = await get_app(client, "app-us", token="not-a-token")
    assert status == 401
    status, data = await get_app(client, "app-us", path="/eu/v1/projects/demo-project/apps/")
    assert status == 404
    assert_error(data, 404, "NOT_FOUND")
    status, data = await get_app(client, "ghost")
    assert (status, data["error"]["status"]) == (404, "NOT_FOUND")
    status, data = await get_app(client, "app-us", path="/us/v1/projects/other/apps/")
    assert (status, data["error"]["status"]) == (404, "NOT_FOUND")
    status, data = await get_app(client, "app-eu", path="/eu/v1/projects/demo-project/apps/")
    assert status == 200
    assert data["id"] == "app-eu"
    # Reads count toward the project's requests per second, as on Sinch.
    assert (await get_app(client, "app-us", path="/v1/projects/demo-project/apps/"))[0] == 200
    status, data, _ = await send(client, await get_token(client), app_id="app-us")
    assert status == 200
    status, data = await get_app(client, "app-us")
    assert status == 429
    assert data["error"]["details"][0]["@type"] == RETRY_INFO
    assert (await stats(client))["rejected_429"]["total"] == 0  # counts sends only


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"ttl": "2s"}, "ttl"),
        ({"ttl": 2}, "ttl"),
        ({"ttl": "2.999s"}, "ttl"),
        ({"ttl": "ten seconds"}, "ttl"),
        ({"correlation_id": "x" * 129}, "correlation_id"),
        ({"correlation_id": 7}, "correlation_id"),
        ({"queue": "LOW_PRIORITY"}, "queue"),
    ],
)
async def test_field_limits_400_with_sinch_body(
    sim: SimFactory, extra: dict[str, Any], field: str
) -> None:
    client = await sim()
    token = await get_token(client)
    status, data, _ = await send(client, token, **extra)
    assert status == 400
    assert_error(data, 400, "INVALID_ARGUMENT")
    (detail,) = data["error"]["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert [v["field"] for v in detail["field_violations"]] == [field]
    assert data["error"]["message"] == detail["field_violations"][0]["description"]
    counters = await stats(client)
    assert counters["invalid"] == {"total": 1, field: 1}
    assert counters["accepted_total"] == 0


async def test_field_limits_admit_the_edges(sim: SimFactory) -> None:
    client = await sim()
    token = await get_token(client)
    for extra in (
        {"ttl": "3s"},
        {"ttl": 3},
        {"ttl": "10.5s"},
        {"correlation_id": "x" * 128},
        {"queue": "HIGH_PRIORITY"},
        {"queue": "NORMAL_PRIORITY"},
    ):
        assert (await send(client, token, **extra))[0] == 200, extra
    assert (await stats(client))["invalid"] == {"total": 0}


async def test_oversized_request_is_400(sim: SimFactory) -> None:
    assert SimulatorSettings().max_request_bytes == 1024 * 1024
    client = await sim(max_request_bytes=4096)
    token = await get_token(client)
    big = body(message={"text_message": {"text": "x" * 5000}})
    status, data, _ = await send(client, token, payload=big)
    assert status == 400
    assert_error(data, 400, "INVALID_ARGUMENT")
    assert "4096 bytes" in data["error"]["message"]
    fits = body(message={"text_message": {"text": "x" * 3000}})
    assert (await send(client, token, payload=fits))[0] == 200
    assert (await stats(client))["invalid"] == {"total": 1, "size": 1}


async def test_project_forbidden_is_403_until_turned_off(sim: SimFactory) -> None:
    client = await sim()
    token = await get_token(client)
    resp = await client.post("/_sim/config", json={"project_forbidden": True})
    assert await resp.json() == {"project_forbidden": True}
    expected = {
        "error": {
            "code": 403,
            "message": "Project demo-project is disabled",
            "status": "PERMISSION_DENIED",
            "details": [],
        }
    }
    status, data, _ = await send(client, token)
    assert (status, data) == (403, expected)
    assert await get_app(client, token=token) == (403, expected)
    await client.post("/_sim/config", json={"project_forbidden": False})
    assert (await send(client, token))[0] == 200
    assert (await get_app(client, token=token))[0] == 200
    counters = await stats(client)
    assert counters["forbidden_403"] == 1
    assert counters["accepted_total"] == 1


async def test_dispatch_callbacks_echo_metadata_without_contact_or_conversation(
    sim: SimFactory, receiver_url: Callable[[Receiver], Awaitable[str]]
) -> None:
    receiver = Receiver("k")
    client = await sim(
        callback_url=await receiver_url(receiver),
        callback_secret="k",
        callback_delay_s=0.0,
        callback_workers=1,
        processing_modes={"conv-app": "CONVERSATION"},
    )
    token = await get_token(client)
    status, sent, _ = await send(client, token, message_metadata="order-7", correlation_id="c-1")
    assert status == 200

    async def received(n: int) -> bool:
        return len(receiver.events) >= n

    await wait_for(lambda: received(2))
    for event in receiver.events:
        raw, parsed = event["raw"], event["parsed"]
        report = raw["message_delivery_report"]
        assert report["processing_mode"] == "DISPATCH"
        assert report["contact_id"] == ""
        assert report["conversation_id"] == ""
        assert report["message_id"] == sent["message_id"]
        assert raw["message_metadata"] == "order-7"
        assert raw["correlation_id"] == "c-1"
        assert parsed.message_metadata == "order-7"
        assert parsed.message_delivery_report.processing_mode == "DISPATCH"
    assert [e["parsed"].message_delivery_report.status for e in receiver.events] == [
        "QUEUED_ON_CHANNEL",
        "DELIVERED",
    ]

    # A CONVERSATION app reports ids, unless the send asks for DISPATCH_ONLY.
    await send(client, token, app_id="conv-app", message_metadata="m-2")
    await send(client, token, app_id="conv-app", processing_strategy="DISPATCH_ONLY")
    await wait_for(lambda: received(6))
    modes = {
        (e["raw"]["message_metadata"], e["raw"]["message_delivery_report"]["processing_mode"])
        for e in receiver.events[2:]
    }
    assert modes == {("m-2", "CONVERSATION"), ("", "DISPATCH")}
    conv = next(e["raw"] for e in receiver.events[2:] if e["raw"]["message_metadata"] == "m-2")
    assert conv["message_delivery_report"]["contact_id"]

    resp = await client.post("/_sim/inbound", json={"app_id": "app-1", "text": "hi"})
    assert resp.status == 200
    await wait_for(lambda: received(7))
    inbound = receiver.events[6]["raw"]["message"]
    assert (inbound["processing_mode"], inbound["contact_id"]) == ("DISPATCH", "")
    assert all(receiver.valid)
    assert (await stats(client))["invalid"] == {"total": 0}


async def test_delivery_reports_wait_for_the_ingress_queue(
    sim: SimFactory, receiver_url: Callable[[Receiver], Awaitable[str]]
) -> None:
    receiver = Receiver("k")
    client = await sim(
        callback_url=await receiver_url(receiver),
        callback_secret="k",
        callback_delay_s=0.0,
        callback_workers=1,
        app_rate=20,
        drain_factors={"slow": 0.001},  # the first message leaves after 50 s
    )
    token = await get_token(client)
    assert (await send(client, token, app_id="slow", correlation_id="s-1"))[0] == 200
    assert (await send(client, token, app_id="slow", correlation_id="s-2"))[0] == 200
    assert (await send(client, token, app_id="fast", correlation_id="f-1"))[0] == 200

    async def received(n: int) -> bool:
        return len(receiver.events) >= n

    # One worker posts in order: had the slow app's reports been due at accept time,
    # they would have come before the fast app's.
    await wait_for(lambda: received(2))
    assert [e["raw"]["correlation_id"] for e in receiver.events] == ["f-1", "f-1"]
    assert await queued(client, "slow") == 2

    # The drain speeds up: the queued messages leave, in order, and report.
    await client.post("/_sim/config", json={"drain_factors": {"slow": 100.0}})
    await wait_for(lambda: received(6))
    later = [
        (e["raw"]["correlation_id"], e["raw"]["message_delivery_report"]["status"])
        for e in receiver.events[2:]
    ]
    assert later[0] == ("s-1", "QUEUED_ON_CHANNEL")
    assert later.index(("s-1", "QUEUED_ON_CHANNEL")) < later.index(("s-2", "QUEUED_ON_CHANNEL"))
    assert sorted(later) == [
        ("s-1", "DELIVERED"),
        ("s-1", "QUEUED_ON_CHANNEL"),
        ("s-2", "DELIVERED"),
        ("s-2", "QUEUED_ON_CHANNEL"),
    ]
    assert await queued(client, "slow") == 0


# -- several projects ----------------------------------------------------------------

KEY_B = encode_basic_auth("key-b", "secret-b")
PROJECT_B = {"proj-b": {"key_id": "key-b", "key_secret": "secret-b", "rate": 2}}
SEND_B = "/us/v1/projects/proj-b/messages:send"
APP_B = "/us/v1/projects/proj-b/apps/"


async def get_token_for(client: Client, basic: str) -> str:
    resp = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, headers={"Authorization": basic}
    )
    assert resp.status == 200
    return str((await resp.json())["access_token"])


def test_projects_settings_take_specs_or_mappings_and_name_bad_fields() -> None:
    settings = SimulatorSettings(projects=PROJECT_B)
    assert settings.projects == {
        "proj-b": ProjectSpec(key_id="key-b", key_secret="secret-b", rate=2)
    }
    assert settings.project_ids() == ["demo-project", "proj-b"]
    assert settings.project_limit("proj-b") == 2
    assert settings.project_limit("demo-project") == settings.project_rate
    spec = ProjectSpec(key_id="k", key_secret="s")
    assert SimulatorSettings(projects={"p": spec}).projects["p"] is spec
    bad = [
        ({"p": {"key_id": "k", "key_secret": "s", "rate": 0}}, "projects['p'].rate"),
        ({"p": {"key_id": "", "key_secret": "s"}}, "projects['p'].key_id"),
        ({"p": {"key_id": "k", "key_secret": "s", "burst": 1}}, "projects['p'].burst"),
        ({"p": {"key_id": "k"}}, "projects['p']"),
        ({"p": "k:s"}, "projects['p']"),
        ({"demo-project": {"key_id": "k", "key_secret": "s"}}, "projects['demo-project']"),
        ({"p": {"key_id": "demo-key", "key_secret": "s"}}, "projects"),
    ]
    for projects, field in bad:
        with pytest.raises(ValueError, match=re.escape(field)):
            SimulatorSettings(projects=projects)
    # Secrets never appear in the messages.
    with pytest.raises(ValueError, match="rate") as caught:
        SimulatorSettings(projects={"p": {"key_id": "k", "key_secret": "hush", "rate": -1}})
    assert "hush" not in str(caught.value)


async def test_a_key_and_its_tokens_serve_only_their_own_project(sim: SimFactory) -> None:
    client = await sim(projects={"proj-b": {**PROJECT_B["proj-b"], "rate": 50}})
    token_a, token_b = await get_token(client), await get_token_for(client, KEY_B)
    assert (await send(client, token_b, path=SEND_B))[0] == 200
    assert (await send(client, token_a))[0] == 200
    for token, path in ((token_a, SEND_B), (token_b, SEND)):
        status, data, _ = await send(client, token, path=path)
        assert status == 403
        assert_error(data, 403, "PERMISSION_DENIED")
        assert data["error"]["message"] == "The key does not belong to this project."
    resp = await client.post(SEND, json=body(), headers={"Authorization": KEY_B})
    assert resp.status == 403
    resp = await client.post(SEND_B, json=body(), headers={"Authorization": KEY_B})
    assert resp.status == 200
    status, _, _ = await send(client, token_b, path="/us/v1/projects/ghost/messages:send")
    assert status == 404
    wrong = encode_basic_auth("key-b", "demo-secret")  # a key with another key's secret
    resp = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, headers={"Authorization": wrong}
    )
    assert resp.status == 401
    # App reads: the same rule.
    assert (await get_app(client, "app-1", token=token_b, path=APP_B))[0] == 200
    status, data = await get_app(client, "app-1", token=token_b)
    assert (status, data["error"]["status"]) == (403, "PERMISSION_DENIED")
    assert (await get_app(client, "app-1", token=token_a, path=APP_B))[0] == 403
    counters = await stats(client)
    assert counters["accepted_by_project"] == {"demo-project": 1, "proj-b": 2}
    assert counters["forbidden_403"] == 3


async def test_each_project_has_its_own_window_at_its_own_rate(sim: SimFactory) -> None:
    client = await sim(project_rate=3, app_rate=100.0, strict=True, projects=PROJECT_B)
    token_a, token_b = await get_token(client), await get_token_for(client, KEY_B)
    statuses_b = [(await send(client, token_b, path=SEND_B, app_id="b1"))[0] for _ in range(4)]
    assert statuses_b == [200, 200, 429, 429]
    # Project B is full; the default project's window is untouched.
    statuses_a = [(await send(client, token_a, app_id="a1"))[0] for _ in range(4)]
    assert statuses_a == [200, 200, 200, 429]
    status, data, headers = await send(client, token_b, path=SEND_B, app_id="b2")
    assert status == 429
    assert data["error"]["message"] == "Project rate limit exceeded."
    assert headers["Retry-After"] == "1"
    # An app read of B counts toward B's cap only.
    assert (await get_app(client, "b1", token=token_b, path=APP_B))[0] == 429
    counters = await stats(client)
    assert counters["accepted_by_project"] == {"demo-project": 3, "proj-b": 2}
    assert counters["rejected_429_by_project"] == {"demo-project": 1, "proj-b": 3}
    assert counters["rejected_429"]["project"] == 4
    assert counters["max_accepted_per_s"]["by_project"] == {"demo-project": 3, "proj-b": 2}
    assert counters["max_accepted_per_s"]["project"] == 3
    assert counters["max_received_per_s"]["by_project"] == {"demo-project": 4, "proj-b": 5}
    log = await (await client.get("/_sim/accepted")).json()
    assert [(e["project_id"], e["app_id"]) for e in log] == [
        ("proj-b", "b1"),
        ("proj-b", "b1"),
        ("demo-project", "a1"),
        ("demo-project", "a1"),
        ("demo-project", "a1"),
    ]
    await client.post("/_sim/reset")
    counters = await stats(client)
    assert counters["accepted_by_project"] == {"demo-project": 0, "proj-b": 0}
    assert counters["max_accepted_per_s"]["by_project"] == {"demo-project": 0, "proj-b": 0}


async def test_basic_auth_limit_is_per_project(sim: SimFactory) -> None:
    client = await sim(basic_auth_rate=1, projects=PROJECT_B)
    for path, key in ((SEND, BASIC), (SEND_B, KEY_B)):
        resp = await client.post(path, json=body(), headers={"Authorization": key})
        assert resp.status == 200
    resp = await client.post(SEND_B, json=body(), headers={"Authorization": KEY_B})
    assert resp.status == 429
    assert (await resp.json())["error"]["message"].startswith("Basic authentication")


async def test_expire_tokens_covers_every_project(sim: SimFactory) -> None:
    client = await sim(projects=PROJECT_B)
    token_b = await get_token_for(client, KEY_B)
    await client.post("/_sim/expire-tokens")
    status, _, headers = await send(client, token_b, path=SEND_B)
    assert status == 401
    assert "expired" in headers["www-authenticate"]
    assert (await send(client, await get_token_for(client, KEY_B), path=SEND_B))[0] == 200


def test_cli_projects_flag() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    ns = parser.parse_args(["--projects", "proj-b:key-b:sec:ret:50, proj-c:key-c:s:7.5"])
    settings = cli.settings_from_args(ns)
    assert settings.projects == {
        "proj-b": ProjectSpec(key_id="key-b", key_secret="sec:ret", rate=50),
        "proj-c": ProjectSpec(key_id="key-c", key_secret="s", rate=7.5),
    }
    for text, match in (
        ("proj-b:key-b:50", "PROJECT_ID:KEY_ID:KEY_SECRET:RATE"),
        ("proj-b:key-b:s:fast", "rate of 'proj-b'"),
        ("proj-b:key-b:s:0", "'proj-b': rate"),
    ):
        with pytest.raises(ValueError, match=re.escape(match)):
            cli.settings_from_args(parser.parse_args(["--projects", text]))
