"""Several gateway replicas in one consumer group drain a backlog: issue 11's figures.

    python -m benchmarks.drain --replicas 2,3                  # mixes (a) and (r)
    python -m benchmarks.drain --replicas 2 --rolling-restarts 2 --scale 2
    python -m benchmarks.drain --replicas 3 --kill --scale 2

Each run has fresh topics (6 request partitions), a ``redis-server`` of its own (free
127.0.0.1 port, ``--save "" --appendonly no``), the simulator in strict mode and N ``gateway
run`` processes in one consumer group, each with its own HTTP port and ``GATEWAY_REDIS_URL``.
The backlog is published once the group has formed (every partition owned by one replica,
the same in two looks 1 s apart), as a campaign reaches a running deployment; ``--cold``
publishes it before the replicas start, so that the group forms during the drain. The same
mix also runs with one replica (no Redis: the default for one replica) in the same
invocation, for the column beside (``--no-single`` skips it). Mixes (``--only`` picks;
``--rolling-restarts`` and ``--kill`` run (a) unless ``--only`` says otherwise; ``--scale``
multiplies both backlogs):
  (a) 40 apps uniform, 8,000 requests, 20/s per app, 800/s per project
  (r) 200 apps, one ("hot-app") with 30 % of 8,000 requests, every app 20/s (Sinch's
      default): the project cap binds while the 199 others have work, and the hot app's
      2,400 bind the ideal time at 2,399/20 = 120 s: it must keep its whole rate from the
      first second, beside 199 apps that would take the whole project cap. ``--hot-rate R``
      gives the hot app a rate of its own; at 200/s the ideal (12 s) needs it at its whole
      rate beside the others, which the fair shares of issue 10 (every busy app at least
      90 % of its weighted max-min share) do not allow: at most 0.77 there, by design

Figures, from the simulator's records with drain.py's definitions (efficiency = ideal /
actual from the first send to the last; 429s by scope; the most requests received in any
1-second window, per app against its own cap and for the project), and:
  duplicates  request_ids the simulator accepted more than once (extra copies in brackets)
  lost        published request_ids never accepted
  sends       per replica, its ``gateway_requests_finished_total{status="sent"}`` at its last
              scrape (every 0.3 s, and once more just before a SIGKILL)
  CPU, RSS    CPU of every replica from the first send to the end, per message; the largest
              VmHWM of one replica

``--rolling-restarts K`` (a Kubernetes rolling deploy): once 10 % of the backlog is accepted,
K times: start a new replica, wait until its ``/readyz`` says its partitions are assigned,
SIGTERM the oldest replica and wait for it to exit; the next step starts at once. A step
that ends after the drain did is flagged.

``--kill``: once 30 % of the backlog is accepted, SIGKILL the first replica that owns
partitions (no restart: the others take its partitions over after the session timeout,
6 s). A SIGKILL leaves no time to write outcomes, commit or flush the group's sent ids to
Redis (batched every 0.2 s), so what the killed replica sent since its last commit and its
last flush is sent again by the new owner. The window this is compared with: the requests
the simulator accepted, in the last second before the kill, of the apps whose partitions
the killed replica owned (its ``gateway_consumer_lag`` labels at the scrape just before the
kill), plus its in-flight sends at that scrape (``gateway_in_flight_requests``). A second of
sends is more than the 0.2 s flush batch and the commit interval, so duplicates above it
point at something other than the kill's unavoidable loss of state.

For every run with duplicates, each duplicated request is listed with its app, partition and
the acceptance times of its copies, beside the run's events (replica started, assigned,
SIGTERM, exited, SIGKILL), all in seconds from the first send. Replica logs (INFO) are kept
in a directory printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

from benchmarks.drain import Mix, figures
from benchmarks.isolation import at_of
from benchmarks.stack import (
    cpu_seconds,
    gateway_env,
    gateway_ready,
    gateway_samples,
    make_topics,
    rss_mb,
    sim_accepted,
    sim_stats,
    start_gateway,
    start_simulator,
    stop,
    wait_port,
)
from gateway.broker import EmbeddedBroker, free_port
from gateway.cli import sample_request
from gateway.demo import LocalRedis
from gateway.envelope import request_id_in

HOT_APP = "hot-app"
PARTITIONS = 6
ROLL_AT = 0.10  # share of the backlog accepted before the first rolling step
KILL_AT = 0.30  # ... before the SIGKILL
SETTLE_S = 1.0  # after the last request is accepted: late copies still count


@dataclass
class RatedMix(Mix):
    """A mix whose apps may have rates of their own (the simulator's ``--app-rates``)."""

    app_rates: dict[str, float] = field(default_factory=dict)

    def rate_of(self, app: str) -> float:
        return self.app_rates.get(app, self.app_rate)

    def simulator_args(self) -> list[str]:
        args = ["--strict", "--app-rate", f"{self.app_rate:g}"]
        args += ["--project-rate", f"{self.project_rate:g}"]
        if self.app_rates:
            args += ["--app-rates", ",".join(f"{a}:{r:g}" for a, r in self.app_rates.items())]
        return args


def replica_mixes(scale: float, hot_rate: float) -> list[RatedMix]:
    uniform = {f"app-{i:02d}": int(200 * scale) for i in range(40)}
    total = int(8000 * scale)
    hot, rest = int(total * 0.3), total - int(total * 0.3)
    skewed = {HOT_APP: hot} | {
        f"app-{i:03d}": rest // 199 + (1 if i < rest % 199 else 0) for i in range(199)
    }
    return [
        RatedMix("(a) 40 apps uniform", uniform, 20, 800),
        RatedMix("(r) 200 apps, one at 30 %", skewed, 20, 800, {HOT_APP: hot_rate}),
    ]


@dataclass
class Backlog:
    ids: dict[str, str]  # request_id -> app
    partition_of: dict[str, int]  # app -> partition


async def publish(bootstrap: str, topic: str, counts: dict[str, int], seed: int) -> Backlog:
    """The backlog, apps shuffled, keyed by app (as drain.py publishes it)."""
    order = [app for app, n in counts.items() for _ in range(n)]
    random.Random(seed).shuffle(order)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks="all"
    )
    backlog = Backlog({}, {})
    await producer.start()
    try:
        sent = []
        for i, app in enumerate(order):
            doc = sample_request(app, i)
            backlog.ids[doc["request_id"]] = app
            sent.append((app, await producer.send(topic, orjson.dumps(doc), key=app.encode())))
        await producer.flush()
        for app, future in sent:
            backlog.partition_of[app] = (await future).partition
    finally:
        await producer.stop()
    return backlog


def owned(ready: dict[str, Any]) -> tuple[int, ...] | None:
    """The requests partitions a replica's ``/readyz`` says it owns; None before it has any."""
    detail = str(ready["checks"].get("partitions", {}).get("detail", ""))
    if not detail.startswith("assigned: "):
        return None
    parts = detail.rsplit(" ", 1)[-1]
    return tuple(int(p) for p in parts.split(",")) if parts != "-" else None


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    sent: float = 0.0
    in_flight: float = 0.0
    partitions: tuple[int, ...] = ()
    cpu: float = 0.0
    hwm: float = 0.0
    drawn: float = 0.0  # slots drawn from the group's limiter, every bucket
    lost: dict[str, float] = field(default_factory=dict)  # of those, not taken, by kind
    ending: str = ""  # "SIGTERM", "SIGKILL" or why it stopped on its own

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class KillWindow:
    at: float
    victim: str
    partitions: tuple[int, ...]
    in_flight: float
    last_second: int = 0


class Run:
    """One drain: the simulator, Redis (N > 1) and the replicas, sampled while it lasts."""

    def __init__(
        self,
        mix: RatedMix,
        bootstrap: str,
        tag: str,
        sim_port: int,
        redis_url: str | None,
        event_loop: str,
    ) -> None:
        self.mix, self.bootstrap, self.tag = mix, bootstrap, tag
        self.event_loop = event_loop
        self.sim_port, self.redis_url = sim_port, redis_url
        self.logdir = Path(tempfile.gettempdir()) / f"bench-replicas-{tag}"
        self.logdir.mkdir(exist_ok=True)
        self.replicas: list[Replica] = []
        self.events: list[tuple[float, str]] = []
        self.stats: dict[str, Any] = {}
        self.cpu_at_first_send: float | None = None
        self.kill: KillWindow | None = None
        self.http = aiohttp.ClientSession()

    @property
    def unique(self) -> int:
        if not self.stats:
            return 0
        return int(self.stats["accepted_total"]) - int(self.stats["duplicates"]["accepted"])

    @property
    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))

    async def start_replica(self) -> Replica:
        name = f"r{len(self.replicas) + 1}"
        port = free_port()
        extra: dict[str, object] = {
            "client_id": f"{self.tag}-{name}",
            "log_level": "INFO",
            "event_loop": self.event_loop,
        }
        if self.redis_url:
            extra["redis_url"] = self.redis_url
        env = gateway_env(
            self.bootstrap,
            self.sim_port,
            port,
            self.tag,
            app_rate=self.mix.app_rate,
            project_rate=self.mix.project_rate,
            **extra,
        )
        log = self.logdir / f"{name}.log"
        replica = Replica(name, start_gateway(env, str(log)), port, log)
        self.replicas.append(replica)
        self.note(f"{name} started")
        await asyncio.to_thread(wait_port, port, 30.0)
        return replica

    async def assigned(self, replica: Replica, timeout: float = 60.0) -> None:
        """Until the replica's /readyz says its partitions are assigned."""

        async def check() -> bool:
            try:
                body = await gateway_ready(self.http, replica.port)
            except (aiohttp.ClientError, OSError):
                return False
            return owned(body) is not None

        deadline = time.monotonic() + timeout
        while not await check():
            if not replica.alive or time.monotonic() > deadline:
                raise RuntimeError(f"{replica.name} was not assigned partitions in {timeout:.0f} s")
            await asyncio.sleep(0.05)
        self.note(f"{replica.name} assigned")

    async def formed(self, timeout: float = 60.0) -> None:
        """Until the group is stable: each partition owned by one replica, twice 1 s apart."""
        deadline = time.monotonic() + timeout
        last: list[tuple[int, ...] | None] = []
        while time.monotonic() < deadline:
            bodies = await asyncio.gather(
                *(gateway_ready(self.http, r.port) for r in self.live), return_exceptions=True
            )
            now = [None if isinstance(b, BaseException) else owned(b) for b in bodies]
            flat = sorted(p for parts in now for p in parts or ())
            if flat == list(range(PARTITIONS)) and all(now) and now == last:
                self.note("group formed")
                return
            last = now
            await asyncio.sleep(1.0)
        raise RuntimeError(f"the group did not settle within {timeout:.0f} s: {last}")

    async def scrape(self, replica: Replica) -> None:
        try:
            samples = await gateway_samples(self.http, replica.port)
        except (aiohttp.ClientError, OSError):
            return  # starting or gone: keep the last figures
        replica.sent = sum(
            v
            for n, labels, v in samples
            if n == "gateway_requests_finished_total" and labels.get("status") == "sent"
        )
        replica.drawn = sum(v for n, _, v in samples if n == "gateway_shared_limiter_slots_drawn")
        replica.lost = {
            labels["kind"]: v
            for n, labels, v in samples
            if n == "gateway_shared_limiter_slots_lost" and v
        }
        replica.in_flight = sum(v for n, _, v in samples if n == "gateway_in_flight_requests")
        replica.partitions = tuple(
            sorted(
                int(labels["partition"]) for n, labels, _ in samples if n == "gateway_consumer_lag"
            )
        )

    async def monitor(self, done: asyncio.Event) -> None:
        tick = 0
        while not done.is_set():
            self.stats = await sim_stats(self.http, self.sim_port)
            for r in self.live:
                try:
                    r.cpu = cpu_seconds(r.proc.pid)
                    r.hwm = max(r.hwm, rss_mb(r.proc.pid, "VmHWM"))
                except (FileNotFoundError, ProcessLookupError):
                    pass  # exited: keep the last sample
            if self.cpu_at_first_send is None and self.unique > 0:
                self.cpu_at_first_send = sum(r.cpu for r in self.replicas)
            if tick % 3 == 0:
                await asyncio.gather(*(self.scrape(r) for r in self.live))
            for r in self.replicas:
                if not r.ending and not r.alive:
                    r.ending = f"exited by itself ({r.proc.returncode})"
                    self.note(f"{r.name} {r.ending}")
            tick += 1
            await asyncio.sleep(0.1)

    async def until(self, cond: Callable[[], bool], timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                print(f"  ! {what}: not within {timeout:.0f} s")
                return False
            await asyncio.sleep(0.05)
        return True

    async def terminate(self, replica: Replica) -> None:
        replica.ending = "SIGTERM"
        self.note(f"SIGTERM {replica.name}")
        replica.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(replica.proc.wait, 60)
        self.note(f"{replica.name} exited ({code})")

    async def rolling(self, steps: int) -> None:
        await self.until(lambda: self.unique >= ROLL_AT * self.mix.total, 120, "first sends")
        for step in range(1, steps + 1):
            old = self.live[0]
            new = await self.start_replica()
            await self.assigned(new)
            await self.terminate(old)
            if self.unique >= self.mix.total:
                self.note(f"rolling step {step} ended after the drain")

    async def kill_one(self) -> None:
        await self.until(lambda: self.unique >= KILL_AT * self.mix.total, 120, "30 % accepted")
        await asyncio.gather(*(self.scrape(r) for r in self.live))
        victim = next(r for r in self.live if r.partitions)
        await self.scrape(victim)
        victim.ending = "SIGKILL"
        victim.proc.kill()
        self.kill = KillWindow(time.time(), victim.name, victim.partitions, victim.in_flight)
        self.note(f"SIGKILL {victim.name} (partitions {list(victim.partitions)})")
        await asyncio.to_thread(victim.proc.wait, 10)

    async def close(self) -> None:
        for r in self.live:
            await asyncio.to_thread(stop, r.proc)
        await self.http.close()


async def run_once(
    bootstrap: str,
    mix: RatedMix,
    n: int,
    seed: int,
    event_loop: str = "asyncio",
    rolling: int = 0,
    kill: bool = False,
    cold: bool = False,
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    await make_topics(bootstrap, tag, partitions=PARTITIONS)
    backlog = Backlog({}, {})
    if cold:
        backlog = await publish(bootstrap, f"req-{tag}", mix.counts, seed)
    redis: LocalRedis | None = None
    if n > 1:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found on the PATH (apt-get install redis-server)")
        redis = LocalRedis(binary)
        await asyncio.to_thread(redis.start)
    sim_port = free_port()
    sim = start_simulator(sim_port, *mix.simulator_args())
    run = Run(mix, bootstrap, tag, sim_port, redis.url if redis else None, event_loop)
    done = asyncio.Event()
    start_wall = time.time()
    load = os.getloadavg()[0]
    try:
        for _ in range(n):
            await run.start_replica()
        if not cold:
            await run.formed()
            start_wall = time.time()
            backlog = await publish(bootstrap, f"req-{tag}", mix.counts, seed)
        watcher = asyncio.create_task(run.monitor(done))
        try:
            if rolling:
                await run.rolling(rolling)
            if kill:
                await run.kill_one()
            timeout = mix.ideal * 3 + 60
            await run.until(lambda: run.unique >= mix.total or not run.live, timeout, "drain")
            run.note("last request accepted")
            await asyncio.sleep(SETTLE_S)
            await asyncio.gather(*(run.scrape(r) for r in run.live))
        finally:
            done.set()
            await watcher
        stats = await sim_stats(run.http, sim_port)
        accepted = await sim_accepted(run.http, sim_port)
    finally:
        await run.close()
        stop(sim)
        if redis is not None:
            await asyncio.to_thread(redis.stop)
    return measure(run, stats, accepted, backlog, start_wall) | {"load": load}


def measure(
    run: Run,
    stats: dict[str, Any],
    accepted: list[dict[str, Any]],
    backlog: Backlog,
    start_wall: float,
) -> dict[str, Any]:
    mix = run.mix
    copies = Counter(request_id_in(a["correlation_id"]) for a in accepted)
    cpu = sum(r.cpu for r in run.replicas) - (run.cpu_at_first_send or 0.0)
    unique = sum(1 for rid in backlog.ids if rid in copies)
    out = figures(
        mix, stats, unique, cpu, max((r.hwm for r in run.replicas), default=0.0), start_wall
    )
    by_app: dict[str, int] = stats["max_received_per_s"]["by_app"]
    caps = {a: max(1, math.floor(mix.rate_of(a))) for a in mix.counts}
    others = [w for a, w in by_app.items() if a not in mix.app_rates]
    duplicated = {rid: n for rid, n in copies.items() if rid is not None and n > 1}
    first = min((at_of(a) for a in accepted), default=start_wall)
    out |= {
        "replicas": len(run.replicas),
        "max_app_window": max(others, default=0),
        "hot_window": max((by_app.get(a, 0) for a in mix.app_rates), default=0),
        "apps_over_cap": sum(1 for a, w in by_app.items() if w > caps.get(a, 1)),
        "duplicates": len(duplicated),
        "extra_copies": sum(n - 1 for n in duplicated.values()),
        "lost": sum(1 for rid in backlog.ids if rid not in copies),
        "dup_partitions": dict(
            sorted(
                Counter(
                    backlog.partition_of[backlog.ids[r]] for r in duplicated if r in backlog.ids
                ).items()
            )
        ),
        "sends": ", ".join(
            f"{r.name} {r.sent:.0f}" + (f" ({r.ending})" if r.ending else "") for r in run.replicas
        ),
        "slots": ", ".join(
            f"{r.name} {r.drawn:.0f} drawn, lost "
            + (" ".join(f"{k} {v:.0f}" for k, v in sorted(r.lost.items())) or "none")
            for r in run.replicas
            if r.drawn
        ),
        "events": [(t - first, what) for t, what in run.events],
        "dup_detail": [
            (
                rid,
                backlog.ids.get(rid or "", "?"),
                backlog.partition_of.get(backlog.ids.get(rid or "", ""), -1),
                sorted(
                    at_of(a) - first for a in accepted if request_id_in(a["correlation_id"]) == rid
                ),
            )
            for rid in list(duplicated)[:20]
        ],
        "logdir": str(run.logdir),
        "per_second": per_second(accepted, first),
        "hot_per_second": per_second([a for a in accepted if a["app_id"] == HOT_APP], first),
    }
    if run.kill is not None:
        apps = {a for a, p in backlog.partition_of.items() if p in run.kill.partitions}
        k = run.kill
        k.last_second = sum(
            1 for a in accepted if a["app_id"] in apps and k.at - 1 <= at_of(a) < k.at
        )
        out["kill"] = k
        out["kill_window"] = k.last_second + k.in_flight
    return out


def per_second(accepted: list[dict[str, Any]], first: float) -> list[int]:
    counts = Counter(int(at_of(a) - first) for a in accepted)
    return [counts[i] for i in range(max(counts, default=-1) + 1)]


ROWS = [
    ("requests accepted (unique)", "sent", "{:.0f}"),
    ("ideal time (s)", "ideal_s", "{:.2f}"),
    ("actual time (s)", "actual_s", "{:.2f}"),
    ("efficiency", "efficiency", "{:.3f}"),
    ("start to first send (s)", "startup_s", "{:.2f}"),
    ("429 answers", "429", "{:.0f}"),
    ("max in 1 s, busiest app", "max_app_window", "{:.0f}"),
    ("max in 1 s, hot app", "hot_window", "{:.0f}"),
    ("apps above their cap", "apps_over_cap", "{:.0f}"),
    ("max in 1 s, project", "max_project_window", "{:.0f}"),
    ("duplicates", "duplicates", "{:.0f}"),
    ("lost", "lost", "{:.0f}"),
    ("CPU per message (us)", "cpu_us", "{:.0f}"),
    ("peak RSS, one replica (MB)", "rss_mb", "{:.0f}"),
    ("load average at start", "load", "{:.1f}"),
]


def print_table(mix: RatedMix, runs: list[tuple[str, dict[str, Any]]]) -> None:
    rates = ", ".join(f"{a} {r:g}/s" for a, r in mix.app_rates.items())
    print(
        f"\n{mix.name}: {mix.total} requests, {len(mix.counts)} apps, app cap "
        f"{mix.app_rate:g}/s{' (' + rates + ')' if rates else ''}, project cap "
        f"{mix.project_rate:g}/s"
    )
    width = max(14, *(len(label) + 2 for label, _ in runs))
    print(f"  {'':<28}" + "".join(f"{label:>{width}}" for label, _ in runs))
    for label, key, fmt in ROWS:
        if key == "hot_window" and not mix.app_rates:
            continue
        print(f"  {label:<28}" + "".join(f"{fmt.format(r[key]):>{width}}" for _, r in runs))
    for label, r in runs:
        print(f"  {label}: 429s by scope {r['429_scopes']}; sends {r['sends']}")
        if r["slots"]:
            print(f"    shared limiter slots: {r['slots']}")
        if "kill" in r:
            k: KillWindow = r["kill"]
            print(
                f"    SIGKILL {k.victim} (partitions {list(k.partitions)}): in-flight window "
                f"{r['kill_window']:.0f} = {k.last_second} accepted in its last second "
                f"+ {k.in_flight:.0f} in flight; duplicates {r['duplicates']}"
            )
        if r["events"] and (r["duplicates"] or len(r["events"]) > r["replicas"] + 1):
            print(
                "    events (s from the first send): "
                + "; ".join(f"{t:.2f} {what}" for t, what in r["events"])
            )
        if r["duplicates"]:
            print(f"    duplicates by partition: {r['dup_partitions']}")
        for rid, app, partition, times in r["dup_detail"]:
            at = ", ".join(f"{t:.2f}" for t in times)
            print(f"    twice: {rid} ({app}, partition {partition}) accepted at {at}")
        print(f"    logs: {r['logdir']}")


def print_timeline(label: str, r: dict[str, Any]) -> None:
    print(f"  {label}, accepted per second from the first send:")
    print("  " + " ".join(str(c) for c in r["per_second"]))
    if r["hot_per_second"]:
        print(f"  {label}, {HOT_APP} accepted per second from the first send:")
        print("  " + " ".join(str(c) for c in r["hot_per_second"]))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the replica runs (on drain.py's parser, or this module's own)."""
    p.add_argument(
        "--replicas", help="replicas in one consumer group with one Redis: N or a list, e.g. 2,3"
    )
    p.add_argument(
        "--rolling-restarts", type=int, default=0, metavar="K", help="K rolling restarts mid-drain"
    )
    p.add_argument("--kill", action="store_true", help="SIGKILL one replica mid-drain")
    p.add_argument(
        "--hot-rate", type=float, default=20, help="rate of the hot app of mix (r) (default 20)"
    )
    p.add_argument("--no-single", action="store_true", help="skip the one-replica runs")
    p.add_argument(
        "--cold",
        action="store_true",
        help="publish the backlog before the replicas start (the group forms during the drain)",
    )


def replica_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--replicas: expected N or N,M,..., got {text!r}") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"--replicas: at least one replica, got {text!r}")
    return counts


async def run(ns: argparse.Namespace) -> None:
    counts = replica_counts(ns.replicas)
    if ns.kill and min(counts) < 2:
        raise SystemExit("--kill needs at least two replicas")
    if ns.rolling_restarts < 0:
        raise SystemExit("--rolling-restarts: a count >= 0")
    loop = getattr(ns, "loop", "asyncio")  # drain.py's --loop
    if loop not in ("asyncio", "uvloop"):
        raise SystemExit("--replicas runs on one event loop: --loop asyncio or uvloop")
    only = ns.only or ("(a)" if ns.rolling_restarts or ns.kill else None)
    scenario = (f", {ns.rolling_restarts} rolling restarts" if ns.rolling_restarts else "") + (
        ", one replica SIGKILLed" if ns.kill else ""
    )
    with EmbeddedBroker() as broker:
        for i, mix in enumerate(replica_mixes(ns.scale, ns.hot_rate)):
            if only and only not in mix.name:
                continue
            results: list[tuple[str, dict[str, Any]]] = []
            if not ns.no_single:
                one = await run_once(broker.bootstrap, mix, 1, i, loop, cold=ns.cold)
                results.append(("1 replica", one))
            for n in counts:
                label = f"{n} replicas{scenario}" if n > 1 else f"1 replica{scenario}"
                r = await run_once(
                    broker.bootstrap, mix, n, i, loop, ns.rolling_restarts, ns.kill, ns.cold
                )
                results.append((label, r))
            print_table(mix, results)
            if ns.timeline:
                for label, r in results:
                    print_timeline(label, r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    p.add_argument("--only", help="run only the mixes whose name contains this")
    p.add_argument("--scale", type=float, default=1.0, help="both backlogs times this")
    p.add_argument("--timeline", action="store_true", help="accepted per second, each run")
    ns = p.parse_args()
    if not ns.replicas:
        p.error("--replicas is required")
    asyncio.run(run(ns))


if __name__ == "__main__":
    main()
