"""App rates from Sinch: the queue policy on its own, then AppRates against the simulator."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.app_rates import AppRates, DrainPolicy, RateSourceKind, next_factor
from gateway.limiter import Bucket, acquire
from gateway.settings import AppSettings, Secret, Settings, load
from gateway.sinch import SinchClient
from gateway.tokens import BasicAuth, TokenManager, TokenSource
from tests.conftest import Sim, wait_for

LOGGER = "gateway.app_rates"

# -- the policy ------------------------------------------------------------------


def test_an_empty_queue_recovers_the_factor_additively_up_to_1():
    policy = DrainPolicy(recover_per_s=0.025)
    assert next_factor(0, 0, 2.0, 100.0, 0.5, policy) == pytest.approx(0.55)
    # a few messages within one second of the rate still count as empty
    assert next_factor(80, 60, 2.0, 100.0, 0.5, policy) == pytest.approx(0.55)
    assert next_factor(0, 0, 300.0, 100.0, 0.2, policy) == 1.0
    assert next_factor(0, 0, 3.0, 100.0, 1.0, policy) == 1.0


def test_a_queue_filling_up_within_the_empty_band_holds_the_factor():
    assert next_factor(10, 50, 2.0, 100.0, 0.7) == 0.7


def test_a_growing_queue_cuts_the_factor_in_proportion_to_its_growth():
    policy = DrainPolicy(clear_s=1e12)  # only the growth counts here
    # sent about 100/s, the queue grew 10/s: it drains about 90/s
    assert next_factor(200, 300, 10.0, 100.0, 1.0, policy) == pytest.approx(0.9 * 0.9)
    # grew 30/s: drains about 70/s
    assert next_factor(200, 500, 10.0, 100.0, 1.0, policy) == pytest.approx(0.9 * 0.7)
    # the same growth while sending at half the rate: drains about 20/s
    assert next_factor(200, 500, 10.0, 100.0, 0.5, policy) == pytest.approx(0.5 * 0.5)


def test_a_backlog_also_counts_so_that_it_empties():
    policy = DrainPolicy(clear_s=30.0)
    # not growing, 600 waiting: aim below the drain by 600/30 = 20/s
    assert next_factor(600, 600, 3.0, 100.0, 0.8) == pytest.approx((0.9 * 80 - 20) / 100)
    assert next_factor(600, 600, 3.0, 100.0, 0.8, policy) < 0.8 * 0.9


def test_one_read_cuts_by_at_most_the_floor_and_never_below_min_factor():
    assert next_factor(200, 100_000, 1.0, 100.0, 1.0) == 0.5
    assert next_factor(200, 100_000, 1.0, 100.0, 0.015) == 0.01


def test_a_shrinking_backlog_never_raises_the_factor():
    # Sinch drained far more than was sent: still no increase while a backlog waits
    assert next_factor(5000, 1000, 3.0, 100.0, 0.3) == 0.3


@pytest.mark.parametrize("interval", [0.0, -1.0, math.inf])
def test_an_unusable_interval_keeps_the_factor(interval):
    assert next_factor(0, 500, interval, 100.0, 0.7) == 0.7


@pytest.mark.parametrize(
    "bad",
    [{"min_factor": 0}, {"floor": 1.0}, {"headroom": 0}, {"clear_s": 0}, {"recover_per_s": -1}],
)
def test_a_policy_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DrainPolicy(**bad)


def closed_loop(share: float, read_s: float, seconds: float = 600.0) -> tuple[float, float, float]:
    """A fluid queue drained at ``share`` of the reported 100/s, fed at rate x factor.

    Returns (largest queue, largest queue once the first backlog is gone (after
    120 s), drained / what the drain allows).
    """
    rate, drain, dt = 100.0, 100.0 * share, 0.05
    queue = drained = largest = steady = 0.0
    factor, prev, last = 1.0, None, 0.0
    for step in range(1, int(seconds / dt) + 1):
        t = step * dt
        queue += rate * 0.98 * factor * dt  # the bucket paces 2 % under the rate
        out = min(queue, drain * dt)
        queue -= out
        drained += out
        if t - last >= read_s - 1e-9:
            size = math.ceil(queue - 1e-9)
            if prev is not None:
                factor = next_factor(prev, size, t - last, rate, factor)
            prev, last = size, t
        largest = max(largest, queue)
        if t > 120.0:
            steady = max(steady, queue)
    return largest, steady, drained / (drain * seconds)


@pytest.mark.parametrize(
    ("share", "read_s"),
    [(0.1, 2.0), (0.1, 3.0), (0.3, 2.0), (0.3, 5.0), (0.5, 3.0), (0.9, 3.0), (0.9, 5.0)],
)
def test_a_queue_that_drains_slower_stays_small_and_the_drain_stays_busy(share, read_s):
    largest, steady, efficiency = closed_loop(share, read_s)
    assert largest <= 3 * read_s * 100  # three reads' worth of the full rate, at the start
    assert steady <= 140  # then about one second of the reported rate
    assert efficiency >= 0.97


def test_a_queue_that_drains_at_the_reported_rate_is_left_alone():
    largest, _, efficiency = closed_loop(1.0, 3.0)
    assert largest <= 2
    assert efficiency == pytest.approx(0.98)


# -- against the simulator ---------------------------------------------------------

SEND_BODY = {
    "recipient": {"contact_id": "c"},
    "message": {"text_message": {"text": "x"}},
}


@dataclass
class Recorder:
    """What AppRates told the rest of the gateway."""

    rates: dict[str, tuple[float, RateSourceKind]] = field(default_factory=dict)
    rate_calls: list[tuple[str, float, RateSourceKind]] = field(default_factory=list)
    factors: dict[str, list[float]] = field(default_factory=dict)
    queues: dict[str, list[int]] = field(default_factory=dict)
    reads: list[tuple[str, str]] = field(default_factory=list)
    #: called after each change of rate or factor, as the app owner's bucket would be
    follow: Callable[[str], None] = lambda app_id: None

    def on_rate(self, app_id: str, rate: float, source: RateSourceKind) -> None:
        self.rates[app_id] = (rate, source)
        self.rate_calls.append((app_id, rate, source))
        self.follow(app_id)

    def on_factor(self, app_id: str, factor: float) -> None:
        self.factors.setdefault(app_id, []).append(factor)
        self.follow(app_id)

    def on_queue(self, app_id: str, size: int, limit: int | None) -> None:
        assert limit == 500_000
        self.queues.setdefault(app_id, []).append(size)

    def on_read(self, app_id: str, result: str) -> None:
        self.reads.append((app_id, result))


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


@dataclass
class Env:
    sim: Sim
    http: aiohttp.ClientSession
    made: list[AppRates]
    managers: list[TokenManager]
    base: str = ""

    def __post_init__(self) -> None:
        self.base = self.base or self.sim.base

    def oauth(self, secret: str = "demo-secret") -> TokenManager:  # noqa: S107 - the simulator's
        manager = TokenManager(
            self.http,
            auth_url=self.sim.base + "/oauth2/token",
            key_id="demo-key",
            key_secret=Secret(secret),
        )
        self.managers.append(manager)
        return manager

    def rates(
        self,
        active: Iterable[str] | Callable[[], Iterable[str]] = (),
        *,
        tokens: TokenSource | None = None,
        policy: DrainPolicy | None = None,
        backlog: Callable[[str], int] | None = None,
        **settings: Any,
    ) -> tuple[AppRates, Recorder]:
        s = settings_for(self.base, **settings)
        rec = Recorder()
        active_apps = active if callable(active) else (lambda names=tuple(active): names)
        rates = AppRates(
            s,
            SinchClient(s, self.http),
            tokens or self.oauth(),
            active_apps=active_apps,
            on_rate=rec.on_rate,
            on_factor=rec.on_factor,
            on_queue=rec.on_queue,
            on_read=rec.on_read,
            policy=policy,
            backlog=backlog,
        )
        self.made.append(rates)
        return rates, rec


@pytest.fixture
async def make_env(simulator_factory: Callable[..., Awaitable[Sim]]) -> AsyncIterator[Any]:
    made: list[AppRates] = []
    managers: list[TokenManager] = []
    async with aiohttp.ClientSession() as http:

        async def make(base: str = "", **sim: Any) -> Env:
            return Env(await simulator_factory(**sim), http, made, managers, base)

        yield make
        for rates in made:
            await rates.stop()
        for manager in managers:
            await manager.close()


async def app_reads(sim: Sim) -> int:
    return int((await sim.stats())["app_reads"])


async def test_rates_it_was_not_told_are_discovered(make_env):
    env = await make_env(app_rates={"fast": 100, "slow": 10})
    rates, rec = env.rates(["fast", "slow"])
    assert rates.rate_for("fast") == 20.0  # app_rate until Sinch has answered
    await rates.start()
    await wait_for(lambda: len(rec.rates) == 2, 5, what="both apps read")
    assert rec.rates == {"fast": (100.0, "sinch"), "slow": (10.0, "sinch")}
    assert (rates.effective_rate("fast"), rates.effective_rate("slow")) == (100.0, 10.0)
    assert rec.queues == {"fast": [0], "slow": [0]}
    # the next read is due in app_rate_refresh_s (300 s): nothing more was asked
    assert await app_reads(env.sim) == 2


async def test_a_configured_rate_wins_over_sinch(make_env, caplog):
    env = await make_env(app_rates={"fast": 100, "slow": 10})
    apps = {"fast": AppSettings(rate=50.0), "slow": AppSettings(rate=15.0)}
    rates, rec = env.rates(tokens=BasicAuth("demo-key", Secret("demo-secret")), apps=apps)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(2):
            await rates.refresh("fast")
            await rates.refresh("slow")
    assert rec.rate_calls == []  # the buckets were made with the configured rates
    assert (rates.rate_for("fast"), rates.source_of("fast")) == (50.0, "configured")
    assert (rates.rate_for("slow"), rates.source_of("slow")) == (15.0, "configured")
    above = [r for r in caplog.records if "above Sinch" in r.getMessage()]
    assert [r.getMessage() for r in above] == [
        "app slow: configured rate 15.00/s is above Sinch's 10.00/s; "
        "its messages will wait in Sinch's queue"
    ]


def closed_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


async def test_unreachable_sinch_falls_back_to_app_rate_and_says_so_once(make_env, caplog):
    sock, port = closed_port()
    with sock:
        env = await make_env(base=f"http://127.0.0.1:{port}")
        basic = BasicAuth("demo-key", Secret("demo-secret"))
        rates, rec = env.rates(tokens=basic, app_rate=25.0)
        with caplog.at_level(logging.INFO, logger=LOGGER):
            for _ in range(3):
                await rates.refresh("a1")
    assert (rates.rate_for("a1"), rates.source_of("a1")) == (25.0, "fallback")
    assert rec.rate_calls == []
    assert rec.reads == [("a1", "transport")] * 3
    assert [r.getMessage() for r in caplog.records] == [
        "app a1: cannot read the app from Sinch (transport_connect_error); using app_rate 25.00/s"
    ]


async def test_a_refused_project_is_logged_once_for_all_apps_and_again_after_recovery(
    make_env, caplog
):
    env = await make_env(app_rates={"a1": 40, "a2": 60}, project_forbidden=True)
    rates, rec = env.rates()

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    with caplog.at_level(logging.INFO, logger=LOGGER):
        for app in ("a1", "a2", "a1", "a2"):
            await rates.refresh(app)
        assert warnings() == [
            "app reads (all apps of the project): cannot read the app from Sinch (http_403); "
            "using app_rate 20.00/s"
        ]
        assert rates.rate_for("a1") == rates.rate_for("a2") == 20.0
        await env.sim.post("/_sim/config", {"project_forbidden": False})
        await rates.refresh("a1")
        assert rec.rates == {"a1": (40.0, "sinch")}
        await env.sim.post("/_sim/config", {"project_forbidden": True})
        await rates.refresh("a1")
        await rates.refresh("a1")
    assert len(warnings()) == 2
    # Sinch's last answer is kept while it cannot be asked
    assert warnings()[1].endswith("keeping Sinch's last rate 40.00/s")
    assert (rates.rate_for("a1"), rates.source_of("a1")) == (40.0, "sinch")
    assert [r.getMessage() for r in caplog.records].count("app reads: Sinch answers again") == 1


async def test_a_rejected_token_is_logged_once_and_keeps_the_fallback(make_env, caplog):
    env = await make_env(app_rates={"a1": 40})
    rates, rec = env.rates(tokens=env.oauth("wrong-secret"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        await rates.refresh("a1")
        await rates.refresh("a2")
    assert rec.reads == [("a1", "auth"), ("a2", "auth")]
    ours = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert ours == [
        "app reads (all apps of the project): cannot read the app from Sinch (auth); "
        "using app_rate 20.00/s"
    ]
    assert "wrong-secret" not in caplog.text
    assert rates.rate_for("a1") == 20.0


async def test_a_rate_lowered_on_sinch_is_followed_within_the_refresh_interval(make_env):
    env = await make_env(app_rates={"fast": 100})
    refresh_s = 0.5
    rates, rec = env.rates(["fast"], app_rate_refresh_s=refresh_s)
    await rates.start()
    await wait_for(lambda: rec.rates.get("fast") == (100.0, "sinch"), 5, what="rate 100")
    loop = asyncio.get_running_loop()
    changed = loop.time()
    await env.sim.post("/_sim/config", {"app_rates": {"fast": 40}})
    await wait_for(lambda: rec.rates.get("fast") == (40.0, "sinch"), 5, what="rate 40")
    assert loop.time() - changed <= refresh_s + 1.0
    assert rec.rate_calls[-2:] == [("fast", 100.0, "sinch"), ("fast", 40.0, "sinch")]


async def test_a_newly_active_app_is_read_promptly(make_env):
    env = await make_env(app_rates={"late": 70, "listed": 30})
    active: list[str] = []
    rates, rec = env.rates(lambda: active, app_queue_refresh_s=0.2)
    await rates.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    rates.note_app("late")
    await wait_for(lambda: "late" in rec.rates, 2, what="the noted app read")
    assert loop.time() - started < 1.0  # not at the next 300-s period
    # an app that only appears in active_apps() is found within app_queue_refresh_s
    active.append("listed")
    await wait_for(lambda: "listed" in rec.rates, 2, what="the listed app read")
    assert rec.reads == [("late", "ok"), ("listed", "ok")]
    assert await app_reads(env.sim) == 2


async def test_an_app_with_records_waiting_is_read_again_soon_after_its_first_read(make_env):
    """The first read comes before the first send, so Sinch's queue is empty: an app with
    more records waiting in its lane than it sends in app_queue_refresh_s is read again
    within that time, to see the queue grow; an app with none, or with fewer (gone before
    that read), waits for app_rate_refresh_s."""
    env = await make_env(app_rates={"busy": 20, "idle": 20, "few": 20})
    waiting = {"busy": 500, "idle": 0, "few": 4}  # 20/s x 0.2 s: 4 go before the next read
    rates, rec = env.rates(
        ["busy", "idle", "few"],
        backlog=lambda app_id: waiting[app_id],
        app_queue_refresh_s=0.2,
        app_rate_refresh_s=300,
    )
    await rates.start()
    started = asyncio.get_running_loop().time()
    await wait_for(lambda: rec.reads.count(("busy", "ok")) == 2, 5, what="busy read again")
    assert asyncio.get_running_loop().time() - started < 1.0  # not at the next 300-s period
    # nothing was sent, so its queue stayed empty: from now on it is read every 300 s
    assert rec.reads.count(("idle", "ok")) == 1
    assert rec.reads.count(("few", "ok")) == 1
    assert rates.queue_size("busy") == 0


async def test_nothing_is_read_when_rates_from_sinch_is_off(make_env):
    env = await make_env(app_rates={"a1": 70})
    rates, rec = env.rates(["a1"], app_rates_from_sinch=False)
    async with rates:
        rates.note_app("a1")
        await asyncio.sleep(0)
        assert rates.rate_for("a1") == 20.0
    assert rec.reads == []
    assert await app_reads(env.sim) == 0


async def pump(
    client: SinchClient, tokens: TokenSource, bucket: Bucket, app_id: str, stop: asyncio.Event
) -> int:
    """Send as fast as ``bucket`` allows until ``stop``, as a lane would."""
    clock = asyncio.get_running_loop().time
    body = orjson.dumps({"app_id": app_id, **SEND_BODY})
    sent = 0
    while not stop.is_set():
        await acquire([bucket], clock)
        await client.send(
            region="us",
            project_id="demo-project",
            body=body,
            authorization=await tokens.authorization(),
        )
        sent += 1
    return sent


async def test_a_queue_that_grows_slows_the_app_and_it_recovers_when_it_empties(make_env):
    # Sinch reports 20/s but its queue drains 8/s
    env = await make_env(app_rates={"q": 20}, drain_factors={"q": 0.4})
    policy = DrainPolicy(recover_per_s=0.2, clear_s=5.0)
    tokens = env.oauth()
    rates, rec = env.rates(["q"], tokens=tokens, policy=policy, app_queue_refresh_s=0.25)
    clock = asyncio.get_running_loop().time
    bucket = Bucket("app:q", rates.rate_for("q"), clock=clock)

    rec.follow = lambda app_id: bucket.set_rate(rates.effective_rate(app_id))
    client = SinchClient(settings_for(env.base), env.http)
    stop = asyncio.Event()
    sender = asyncio.create_task(pump(client, tokens, bucket, "q", stop))
    try:
        await rates.start()
        await wait_for(lambda: rates.factor_of("q") < 0.5, 15, what="the app slowed down")
        # the slowed app sends below the drain: the backlog stays in "Kafka"
        slowed = len(rec.queues["q"])
        await wait_for(lambda: len(rec.queues["q"]) >= slowed + 16, 15, what="4 s of reads")
        assert max(rec.queues["q"]) <= 60  # 3 s of the reported rate
        assert rec.queues["q"][-1] <= 30
        # Sinch drains at the full rate again: the factor climbs back to 1
        await env.sim.post("/_sim/config", {"drain_factors": {"q": None}})
        await wait_for(lambda: rates.factor_of("q") == 1.0, 20, what="recovery")
        assert bucket.rate == 20.0
        assert max(rec.queues["q"][slowed:]) <= 60
    finally:
        stop.set()
        sent = await sender
    assert sent > 0
    factors = rec.factors["q"]
    assert min(factors) < 0.5
    assert factors[-1] == 1.0
    assert rec.rates["q"] == (20.0, "sinch")
