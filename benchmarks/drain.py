"""Drain a backlog through the real gateway against the simulator in strict mode.

    python -m benchmarks.drain                      # the four mixes, gateway and simple loop
    python -m benchmarks.drain --only "(b')" --timeline   # one mix, per-second acceptances
    python -m benchmarks.drain --memory --apps 1    # 1,000,000 records in Kafka, RSS while draining
    python -m benchmarks.drain --replicas 2,3       # several replicas: benchmarks/replicas.py

Each mix publishes its backlog first, then starts the gateway (its own process) and
measures, from the simulator's records and /proc:
  ideal      max((N-1)/project_rate, max over apps (N_app-1)/app_rate): the physical limit
  actual     first send to last send (the simulator's clock)
  efficiency ideal/actual
  startup    gateway start to its first send (group join, token)
  429s, and the most requests in any 1-second window, per app (max) and for the project
  CPU        gateway CPU time from its first send to its last, per message
  peak RSS   the gateway's VmHWM
The baseline (benchmarks/baseline_loop.py: read, wait for the limiters, send, repeat) runs
on the same backlog for a bounded time; its efficiency is what it sent over the most Sinch
would have accepted of the backlog in its elapsed time: the fraction of the ideal rate it
reached.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.isolation import (
    CAMPAIGN_PARTITION,
    CASES,
    HIGH_TOPIC_CASE,
    accepted_at,
    at_of,
    describe,
    latencies,
    publish_campaign,
    publish_probes,
    wait_first_send,
)
from benchmarks.stack import (
    cpu_seconds,
    gateway_env,
    gateway_metric,
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
from gateway.settings import load


@dataclass
class Mix:
    name: str
    counts: dict[str, int]
    app_rate: float
    project_rate: float

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def rate_of(self, app: str) -> float:
        return self.app_rate

    @property
    def ideal(self) -> float:
        app = max((n - 1) / self.rate_of(a) for a, n in self.counts.items())
        return max((self.total - 1) / self.project_rate, app)

    def most_in(self, seconds: float) -> float:
        """The most messages of this backlog Sinch accepts in ``seconds``."""
        apps = sum(min(n, self.rate_of(a) * seconds + 1) for a, n in self.counts.items())
        return min(self.project_rate * seconds + 1, apps)


def mixes(scale: float = 1.0) -> list[Mix]:
    uniform = {f"app-{i:02d}": int(200 * scale) for i in range(40)}
    hot = {"hot-app": 500} | {
        f"app-{i:02d}": 500 // 39 + (1 if i < 500 % 39 else 0) for i in range(39)
    }
    hot_scaled = {"hot-app": 2000} | {
        f"app-{i:02d}": 2000 // 39 + (1 if i < 2000 % 39 else 0) for i in range(39)
    }
    many = {f"app-{i:03d}": 40 for i in range(200)}
    return [
        Mix("(a) 40 apps uniform", uniform, 20, 800),
        Mix("(b) hot app = half", hot, 20, 800),
        Mix("(b') hot app = half, app cap scaled to 100/s", hot_scaled, 100, 800),
        Mix("(c) 200 apps, project binds", many, 20, 800),
    ]


async def publish_backlog(bootstrap: str, topic: str, counts: dict[str, int], seed: int) -> None:
    order = [app for app, n in counts.items() for _ in range(n)]
    random.Random(seed).shuffle(order)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks="all"
    )
    await producer.start()
    try:
        for i, app in enumerate(order):
            await producer.send(topic, orjson.dumps(sample_request(app, i)), key=app.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def drain(
    proc: subprocess.Popen[bytes], sim_port: int, total: int, timeout: float
) -> dict[str, Any]:
    """Sample the process and the simulator until every message is accepted."""
    cpu_first: float | None = None
    cpu = hwm = 0.0
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while True:
            stats = await sim_stats(http, sim_port)
            try:
                cpu = max(cpu, cpu_seconds(proc.pid))
                hwm = max(hwm, rss_mb(proc.pid, "VmHWM"))  # a zombie reports none
            except (FileNotFoundError, ProcessLookupError):
                pass  # exited; keep the last sample
            accepted = int(stats["accepted_total"])  # type: ignore[call-overload]
            if cpu_first is None and accepted > 0:
                cpu_first = cpu
            if accepted >= total or time.monotonic() - started > timeout or proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        return {
            "stats": stats,
            "cpu": cpu - (cpu_first or cpu),
            "hwm": hwm,
            "elapsed": time.monotonic() - started,
        }


def figures(
    mix: Mix, stats: dict[str, Any], sent: int, cpu: float, hwm: float, start_wall: float
) -> dict[str, Any]:
    span = (stats["last_send_time"] or 0) - (stats["first_send_time"] or 0)
    # a partial drain (the simple loop's) against the most Sinch accepts of this backlog in
    # the same time: the fraction of the ideal throughput it reached, as "ideal time" for
    # what it sent. (The backlog's ideal time pro rata credits a loop that sends the small
    # apps first; the ideal time of the very messages sent, one that sends app by app.)
    ideal_sent = mix.ideal if sent >= mix.total else span * sent / max(1.0, mix.most_in(span))
    by_app = stats["max_received_per_s"]["by_app"]
    return {
        "sent": sent,
        "ideal_s": ideal_sent,
        "actual_s": span,
        "efficiency": ideal_sent / span if span > 0 else 0.0,
        "startup_s": (stats["first_send_wall"] or start_wall) - start_wall,
        "429": stats["rejected_429"]["total"],
        "429_scopes": {k: v for k, v in stats["rejected_429"].items() if k != "total"},
        "max_app_window": max(by_app.values()) if by_app else 0,
        "max_project_window": stats["max_received_per_s"]["project"],
        "cpu_us": cpu / max(1, sent) * 1e6,
        "rss_mb": hwm,
    }


async def backlog_and_simulator(
    bootstrap: str, mix: Mix, seed: int, spill_partitions: int = 24
) -> tuple[str, int, subprocess.Popen[bytes]]:
    """Fresh topics holding the mix's backlog, and a strict simulator for it."""
    tag = uuid.uuid4().hex[:8]
    await make_topics(bootstrap, tag, spill_partitions=spill_partitions)
    await publish_backlog(bootstrap, f"req-{tag}", mix.counts, seed)
    sim_port = free_port()
    rates = ("--app-rate", str(mix.app_rate), "--project-rate", str(mix.project_rate))
    return tag, sim_port, start_simulator(sim_port, "--strict", *rates)


async def run_gateway(
    bootstrap: str,
    mix: Mix,
    seed: int,
    timeline: bool = False,
    lane_horizon_s: float = 0,
    spill_partitions: int = 24,
    event_loop: str = "asyncio",
    idle_s: float = 0.0,
) -> dict[str, Any]:
    tag, sim_port, sim = await backlog_and_simulator(bootstrap, mix, seed, spill_partitions)
    http_port = free_port()
    extra: dict[str, object] = {"spill_partitions": spill_partitions, "event_loop": event_loop}
    if lane_horizon_s:
        extra["lane_horizon_s"] = lane_horizon_s
    env = gateway_env(
        bootstrap,
        sim_port,
        http_port,
        tag,
        app_rate=mix.app_rate,
        project_rate=mix.project_rate,
        **extra,
    )
    start_wall = time.time()
    gw = start_gateway(env)
    try:
        wait_port(http_port)
        out = await drain(gw, sim_port, mix.total, timeout=mix.ideal * 3 + 60)
        if idle_s > 0:  # the fixed costs: the backlog is drained, the lanes are there
            await asyncio.sleep(2.0)
            cpu0, wall0 = cpu_seconds(gw.pid), time.monotonic()
            await asyncio.sleep(idle_s)
            idle = (cpu_seconds(gw.pid) - cpu0) / (time.monotonic() - wall0)
            rate = mix.total / max(1e-9, mix.ideal)
            print(
                f"  idle after the drain ({event_loop}): {idle * 1e3:.1f} ms of CPU a second, "
                f"{idle / rate * 1e6:.1f} us per message at the mix's {rate:.0f}/s"
            )
        if timeline:
            async with aiohttp.ClientSession() as http:
                print_timeline(mix, await sim_accepted(http, sim_port))
    finally:
        stop(gw)
        stop(sim)
    stats = out["stats"]
    return figures(mix, stats, int(stats["accepted_total"]), out["cpu"], out["hwm"], start_wall)


def print_timeline(mix: Mix, entries: list[dict[str, Any]]) -> None:
    """Acceptances per second of the mix's biggest app and of the project, from the first send."""
    big = max(mix.counts, key=mix.counts.__getitem__)
    times = [(at_of(e), e["app_id"] == big) for e in entries]
    if not times:
        return
    first = min(t for t, _ in times)
    seconds = int(max(t for t, _ in times) - first) + 1
    app, project = [0] * seconds, [0] * seconds
    for t, is_big in times:
        k = int(t - first)
        project[k] += 1
        app[k] += is_big
    print(f"  {mix.name}, per second from the first send: {big} / project")
    print("  " + " ".join(f"{a}/{p}" for a, p in zip(app, project, strict=True)))


async def run_baseline(bootstrap: str, mix: Mix, seed: int, seconds: float) -> dict[str, Any]:
    tag, sim_port, sim = await backlog_and_simulator(bootstrap, mix, seed)
    start_wall = time.time()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.baseline_loop",
            "--bootstrap",
            bootstrap,
            "--topic",
            f"req-{tag}",
            "--results",
            f"res-{tag}",
            "--sim-port",
            str(sim_port),
            "--app-rate",
            str(mix.app_rate),
            "--project-rate",
            str(mix.project_rate),
            "--seconds",
            str(seconds),
        ],
    )
    try:
        out = await drain(proc, sim_port, mix.total, timeout=seconds + 30)
    finally:
        stop(proc)
        stop(sim)
    stats = out["stats"]
    return figures(mix, stats, int(stats["accepted_total"]), out["cpu"], out["hwm"], start_wall)


ROWS = [
    ("messages sent", "sent", "{:.0f}"),
    ("ideal time (s)", "ideal_s", "{:.2f}"),
    ("actual time (s)", "actual_s", "{:.2f}"),
    ("efficiency", "efficiency", "{:.3f}"),
    ("start to first send (s)", "startup_s", "{:.2f}"),
    ("429 answers", "429", "{:.0f}"),
    ("max in 1 s, busiest app", "max_app_window", "{:.0f}"),
    ("max in 1 s, project", "max_project_window", "{:.0f}"),
    ("CPU per message (us)", "cpu_us", "{:.0f}"),
    ("peak RSS (MB)", "rss_mb", "{:.0f}"),
]


def print_mix(mix: Mix, gw: dict[str, Any], base: dict[str, Any]) -> None:
    print(
        f"\n{mix.name}: {mix.total} messages, {len(mix.counts)} apps, app cap "
        f"{mix.app_rate:g}/s, project cap {mix.project_rate:g}/s"
    )
    print(f"  {'':<26}{'gateway':>12}{'simple loop':>14}")
    for label, key, fmt in ROWS:
        print(f"  {label:<26}{fmt.format(gw[key]):>12}{fmt.format(base[key]):>14}")
    print(f"  429s by scope: gateway {gw['429_scopes']}, simple loop {base['429_scopes']}")


async def run_floor(mix: Mix, rate: float, seconds: float, event_loop: str) -> dict[str, Any]:
    """benchmarks/floor.py for the mix: one lane per app, paced to ``rate``.

    Same simulator (its own instance, limits off so that every answer is a 200 like the
    gateway's), as many lanes as the mix has apps, on the same event loop. It runs right
    before the gateway's drain (paced to what the mix allows, 2 % under the caps) and right
    after it (paced to the rate the gateway reached): this machine's CPU time per request
    drifts by 10-25 % from one run to the next, and the mean of the two brackets the drain.
    """
    port = free_port()
    sim = start_simulator(port, "--app-rate", "1000000", "--project-rate", "1000000")
    try:
        wait_port(port)
        cmd = [sys.executable, "-m", "benchmarks.floor", "--port", str(port)]
        cmd += ["--lanes", str(len(mix.counts)), "--rate", f"{rate:.1f}"]
        cmd += ["--seconds", f"{seconds:.1f}", "--loop", event_loop]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
        stdout, _ = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        stop(sim)
    floor: dict[str, Any] = orjson.loads(stdout.splitlines()[-1])
    floor["rate"] = rate
    return floor


def cpu_ratio(gw: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> float:
    """The gateway's CPU per message over the mean of the floors measured around it."""
    cpu_us: float = gw["cpu_us"]
    floor: float = before["cpu_us_per_request"] + after["cpu_us_per_request"]
    return 2 * cpu_us / floor


def print_cpu(mix: Mix, gw: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    floor = (before["cpu_us_per_request"] + after["cpu_us_per_request"]) / 2
    print(
        f"  CPU ({after['loop']}): gateway {gw['cpu_us']:.0f} us per message; a bare aiohttp "
        f"client, {len(mix.counts)} lanes paced to {after['rate']:.0f}/s, {floor:.0f} us per "
        f"request (before the drain {before['cpu_us_per_request']:.0f}, after it "
        f"{after['cpu_us_per_request']:.0f}); ratio {cpu_ratio(gw, before, after):.2f}; "
        f"efficiency {gw['efficiency']:.3f}, {gw['429']} 429s"
    )


async def bare_copy(
    bootstrap: str, src: str, partition: int, dst: str, records: int
) -> tuple[float, float]:
    """Records/s and CPU us per record of a bare aiokafka copy from ``src`` to ``dst``.

    What spilling a backlog costs at least, in Python: read every record and write it
    again, no decoding and no bookkeeping, batches of the gateway's fetch size.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await consumer.start()
    await producer.start()
    tp = TopicPartition(src, partition)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    copied, acks = 0, []
    t0, cpu0 = time.monotonic(), time.process_time()
    try:
        while copied < records:
            batch = await consumer.getmany(tp, timeout_ms=1000, max_records=2000)
            for part in batch.values():
                builder = producer.create_batch()
                for record in part:
                    if builder.append(key=record.key, value=record.value, timestamp=None) is None:
                        acks.append(await producer.send_batch(builder, dst, partition=0))
                        builder = producer.create_batch()
                        builder.append(key=record.key, value=record.value, timestamp=None)
                copied += len(part)
                acks.append(await producer.send_batch(builder, dst, partition=0))
        await asyncio.gather(*acks)
        return copied / (time.monotonic() - t0), (time.process_time() - cpu0) / copied * 1e6
    finally:
        await consumer.stop()
        await producer.stop()


# a memory run's sample: seconds since the first send, RSS (MB), sent, spilled, CPU seconds
Sample = tuple[float, float, int, float, float]


def crossing(samples: list[Sample], level: float) -> float | None:
    """When the spilled count reached ``level``, interpolated between two samples."""
    before = (0.0, 0.0)
    for t, _, _, spilled, _ in samples:
        if spilled >= level:
            t0, n0 = before
            return t0 + (t - t0) * (level - n0) / (spilled - n0) if spilled > n0 else t
        before = (t, spilled)
    return None


def spill_cpu(samples: list[Sample], lo: float, hi: float) -> float | None:
    """The gateway's CPU us per record spilled between the samples at ``lo`` and ``hi``
    spilled records (its sends of the time included)."""
    inside = [s for s in samples if lo <= s[3] <= hi]
    if len(inside) < 2 or inside[-1][3] <= inside[0][3]:
        return None
    return (inside[-1][4] - inside[0][4]) / (inside[-1][3] - inside[0][3]) * 1e6


async def memory_run(
    bootstrap: str, records: int, seconds: float, apps: int, project_rate: float = 10_000
) -> None:
    """Drain ``records`` over ``apps`` apps for ``seconds``: RSS, and other apps' latency.

    One app's backlog goes to partition 0. From 5 s after the first send, a request of a
    new app is published to partition 0 and one to partition 1 every 2 s (20 of each);
    their latency is publication to the simulator's acceptance.
    """
    tag = uuid.uuid4().hex[:8]
    await make_topics(bootstrap, tag)
    topic = f"req-{tag}"
    t0 = time.monotonic()
    if apps == 1:
        await publish_campaign(bootstrap, topic, "bulk", records)
    else:
        counts = {f"app-{i:03d}": records // apps for i in range(apps)}
        await publish_backlog(bootstrap, topic, counts, seed=1)
    print(f"published {records:,} records of {apps} app(s) in {time.monotonic() - t0:.0f} s")
    copy_rate = copy_cpu = 0.0
    if apps == 1:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(f"copy-{tag}", 1, 1)])
        finally:
            await admin.close()
        copy_rate, copy_cpu = await bare_copy(
            bootstrap, topic, CAMPAIGN_PARTITION, f"copy-{tag}", records // 2
        )
        print(
            f"a bare aiokafka copy of half of them to another topic: {copy_rate:,.0f} records/s, "
            f"{copy_cpu:.1f} us of CPU per record"
        )
    sim_port, http_port = free_port(), free_port()
    sim = start_simulator(sim_port, "--app-rate", "500", "--project-rate", f"{project_rate:g}")
    env = gateway_env(bootstrap, sim_port, http_port, tag, app_rate=500, project_rate=project_rate)
    gw = start_gateway(env)
    samples: list[Sample] = []
    try:
        wait_port(http_port)
        async with aiohttp.ClientSession() as http:
            start = time.monotonic()
            await wait_first_send(http, sim_port, 60)

            async def probe() -> dict[str, list[tuple[str, float]]]:
                await asyncio.sleep(5)
                return await publish_probes(
                    bootstrap,
                    topic,
                    20,
                    2.0,
                    cases="hbc" if apps == 1 else "bc",
                    campaign_app="bulk",
                    high_topic=f"high-{tag}",
                )

            probing = asyncio.create_task(probe())
            while time.monotonic() - start < seconds:
                await asyncio.sleep(1)
                stats = await sim_stats(http, sim_port)
                sent = int(stats["accepted_total"])  # type: ignore[call-overload]
                spilled = await gateway_metric(http, http_port, "gateway_spilled_records_total")
                t, rss, cpu = time.monotonic() - start, rss_mb(gw.pid), cpu_seconds(gw.pid)
                samples.append((t, rss, sent, spilled, cpu))
            probes = await probing
            hwm = rss_mb(gw.pid, "VmHWM")
            spilled = await gateway_metric(http, http_port, "gateway_spilled_records_total")
            stop(gw)
            at = accepted_at(await sim_accepted(http, sim_port))
    finally:
        stop(gw)
        stop(sim)
    print(f"{'t (s)':>6}{'RSS (MB)':>10}{'sent':>10}{'spilled':>10}")
    for t, rss, sent, spill, _ in samples:
        print(f"{t:>6.0f}{rss:>10.1f}{sent:>10}{spill:>10.0f}")
    t10, t90 = crossing(samples, 0.1 * records), crossing(samples, 0.9 * records)
    if t10 is not None and t90 is not None and t90 > t10:
        speed = 0.8 * records / (t90 - t10)
        line = (
            f"spill: 90 % of the backlog in {t90:.0f} s; from 10 % to 90 % {speed:,.0f} records/s"
        )
        if copy_rate:
            line += f"; a bare aiokafka copy {copy_rate:,.0f}/s (ratio {speed / copy_rate:.2f})"
        print(line)
        per = spill_cpu(samples, 0.1 * records, 0.9 * records)
        if per is not None:
            line = f"spill: {per:.1f} us of the gateway's CPU per record (its sends included)"
            if copy_cpu:
                line += f"; a bare aiokafka copy {copy_cpu:.1f} us (ratio {per / copy_cpu:.2f})"
            print(line)
    rate = samples[-1][2] / samples[-1][0] if samples else 0
    print(
        f"backlog {records:,} over {apps} app(s), apps 500/s, project {project_rate:,.0f}/s; "
        f"drained {samples[-1][2]:,} in "
        f"{samples[-1][0]:.0f} s ({rate:,.0f}/s); {spilled:,.0f} spilled; peak RSS {hwm:.0f} MB"
    )
    for case, values in latencies(probes, at).items():
        print(f"  ({case}) {({**CASES, **HIGH_TOPIC_CASE})[case]}: {describe(values, seconds)}")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--memory", action="store_true", help="the 1,000,000-record memory run")
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--apps", type=int, default=200, help="apps of the memory run's backlog")
    p.add_argument(
        "--memory-project-rate",
        type=float,
        default=10_000,
        help="the memory run's project cap (apps 500/s each)",
    )
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--baseline-seconds", type=float, default=20)
    p.add_argument(
        "--timeline", action="store_true", help="per-second acceptances of each mix's biggest app"
    )
    p.add_argument(
        "--lane-horizon", type=float, default=0, help="the gateway's lane_horizon_s (0: default)"
    )
    p.add_argument("--spill-partitions", type=int, default=24, help="partitions of the spill topic")
    p.add_argument("--only", help="run only the mixes whose name contains this")
    p.add_argument(
        "--repeat", type=int, default=1, help="drains per mix and loop, each between two floors"
    )
    p.add_argument("--scale", type=float, default=1.0, help="backlog of mix (a) times this")
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=0,
        help="after each drain, the gateway's CPU while idle for this long (its fixed costs)",
    )
    p.add_argument(
        "--loop",
        choices=["asyncio", "uvloop", "both"],
        default="asyncio",
        help="event loop of the gateway and of the CPU floor (both: each mix twice)",
    )
    # several replicas (issue 11): benchmarks/replicas.py runs them, with its own mixes
    from benchmarks import replicas

    replicas.add_arguments(p)
    ns = p.parse_args()
    if ns.replicas:
        await replicas.run(ns)
        return
    if ns.rolling_restarts or ns.kill:
        p.error("--rolling-restarts and --kill need --replicas")
    with EmbeddedBroker() as broker:
        if ns.memory:
            await memory_run(
                broker.bootstrap, ns.records, ns.seconds, ns.apps, ns.memory_project_rate
            )
            return
        print(
            "rates as in Sinch (app 20/s, project 800/s); mix (b') scales the app cap to "
            "100/s; simulator in strict mode"
        )
        loops = ["asyncio", "uvloop"] if ns.loop == "both" else [ns.loop]
        for i, mix in enumerate(mixes(ns.scale)):
            if ns.only and ns.only not in mix.name:
                continue
            runs: dict[str, list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]] = {}
            for event_loop in loops:
                # floor, gateway, floor, gateway, ...: each drain between two floors
                expected = mix.total / mix.ideal * (1 - load(env={}).rate_margin)
                before = await run_floor(mix, expected, min(10.0, mix.ideal), event_loop)
                for _ in range(ns.repeat):
                    gw = await run_gateway(
                        broker.bootstrap,
                        mix,
                        seed=i,
                        timeline=ns.timeline,
                        lane_horizon_s=ns.lane_horizon,
                        spill_partitions=ns.spill_partitions,
                        event_loop=event_loop,
                        idle_s=ns.idle_seconds,
                    )
                    reached = min(mix.project_rate, gw["sent"] / gw["actual_s"])
                    after = await run_floor(
                        mix, reached, min(10.0, max(2.0, gw["actual_s"])), event_loop
                    )
                    runs.setdefault(event_loop, []).append((gw, before, after))
                    before = after
            base = await run_baseline(broker.bootstrap, mix, seed=i, seconds=ns.baseline_seconds)
            print_mix(mix, runs[loops[0]][0][0], base)
            for event_loop in loops:
                for gw, before, after in runs[event_loop]:
                    print_cpu(mix, gw, before, after)
                if ns.repeat > 1:
                    ratios = sorted(cpu_ratio(*run) for run in runs[event_loop])
                    median = statistics.median(ratios)
                    print(
                        f"  CPU ({event_loop}), {ns.repeat} drains: median ratio {median:.2f} "
                        f"(from {ratios[0]:.2f} to {ratios[-1]:.2f})"
                    )


if __name__ == "__main__":
    asyncio.run(main())
