"""Isolation: requests published during a one-app campaign larger than the in-memory budget.

    python -m benchmarks.isolation          # 27,000 requests of one app, budget 20,000

One app has a campaign in one partition of the requests topic (Sinch's real rates: 20/s per
app, 800/s per project; simulator in strict mode). The gateway starts on it; 3 s after its
first send, 20 requests of each case are published, one of each every 0.1 s:
  (a) high-priority requests of the campaign's app (the campaign's partition)
  (b) a new app, published to the campaign's partition
  (c) a new app, published to another partition
Each request's latency is publication (before the producer's send) to the simulator's
acceptance (``/_sim/accepted``: correlation_id = request_id, accepted_time). The same
scenario runs twice in one go: with spill-over (the settings' defaults) and with
spill-over effectively off (``lane_min_read_ahead`` = the budget, so a lane takes
everything up to the budget: the behaviour before per-app read-ahead). Requests not
accepted within ``--wait`` seconds count as lost for the percentiles (shown as "> wait").
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

from benchmarks.stack import (
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

CASES = {
    "a": "high priority, campaign's app",
    "b": "new app, campaign's partition",
    "c": "new app, another partition",
}
# the memory run's probes add the backlog's app on the high-priority topic, as
# gateway.client.publish sends a high-priority request
HIGH_TOPIC_CASE = {"h": "high priority, backlog's app, high-priority topic"}
CAMPAIGN_APP = "campaign"
CAMPAIGN_PARTITION = 0
OTHER_PARTITION = 1
Probes = dict[str, list[tuple[str, float]]]


async def publish(
    producer: AIOKafkaProducer, topic: str, docs: Sequence[dict[str, Any]], partition: int
) -> list[float]:
    """Publish ``docs`` to one partition, acknowledged; each one's publication time."""
    times: list[float] = []
    futures = []
    for doc in docs:
        times.append(time.time())
        key = doc["payload"]["app_id"].encode()
        futures.append(await producer.send(topic, orjson.dumps(doc), key=key, partition=partition))
    await asyncio.gather(*futures)
    return times


async def publish_campaign(bootstrap: str, topic: str, app: str, count: int) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks="all"
    )
    await producer.start()
    try:
        for i in range(count):
            doc = sample_request(app, i)
            await producer.send(
                topic, orjson.dumps(doc), key=app.encode(), partition=CAMPAIGN_PARTITION
            )
        await producer.flush()
    finally:
        await producer.stop()


async def publish_probes(
    bootstrap: str,
    topic: str,
    count: int,
    gap_s: float,
    cases: str = "abc",
    *,
    campaign_app: str = CAMPAIGN_APP,
    high_topic: str | None = None,
) -> Probes:
    """``count`` requests per case, one of each every ``gap_s`` seconds.

    Case ``h`` (:data:`HIGH_TOPIC_CASE`) goes to ``high_topic``, partition 0.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    probes: Probes = {case: [] for case in cases}
    plan = {
        "a": (campaign_app, "high", CAMPAIGN_PARTITION, topic),
        "b": ("otp-same", "normal", CAMPAIGN_PARTITION, topic),
        "c": ("otp-other", "normal", OTHER_PARTITION, topic),
        "h": (campaign_app, "high", 0, high_topic or topic),
    }
    try:
        for i in range(count):
            for case in cases:
                app, priority, partition, to = plan[case]
                doc = sample_request(app, 500_000 + i, priority=priority)
                (at,) = await publish(producer, to, [doc], partition)
                probes[case].append((doc["request_id"], at))
            await asyncio.sleep(gap_s)  # paces the publisher, as one-time passwords come
    finally:
        await producer.stop()
    return probes


def at_of(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["accepted_time"].replace("Z", "+00:00")).timestamp()


def accepted_at(entries: list[dict[str, Any]]) -> dict[str, float]:
    """correlation_id (the request_id) -> first acceptance time."""
    out: dict[str, float] = {}
    for entry in entries:
        out.setdefault(entry["correlation_id"], at_of(entry))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def latencies(probes: Probes, at: dict[str, float]) -> dict[str, list[float]]:
    """Per case, each request's latency; ``inf`` when it was not accepted."""
    return {
        case: [at[rid] - t if rid in at else math.inf for rid, t in sent]
        for case, sent in probes.items()
    }


def describe(values: list[float], wait_s: float) -> str:
    """'20/20, p50 0.08 s, p99 0.15 s' (a percentile past the wait reads '> wait')."""

    def fmt(v: float) -> str:
        return f"> {wait_s:.0f} s" if math.isinf(v) else f"{v:.2f} s"

    done = sum(1 for v in values if not math.isinf(v))
    p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
    return f"{done}/{len(values)}, p50 {fmt(p50)}, p99 {fmt(p99)}"


async def wait_first_send(http: aiohttp.ClientSession, sim_port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while int(str((await sim_stats(http, sim_port))["accepted_total"])) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway sent nothing")
        await asyncio.sleep(0.1)


async def scenario(
    bootstrap: str,
    campaign: int,
    budget: int,
    lanes: dict[str, Any],
    wait_s: float,
    window_s: float,
) -> dict[str, Any]:
    """One run: campaign, gateway, probes 3 s into the drain; figures of the run."""
    tag = uuid.uuid4().hex[:8]
    await make_topics(bootstrap, tag)
    topic = f"req-{tag}"
    await publish_campaign(bootstrap, topic, CAMPAIGN_APP, campaign)
    sim_port, http_port = free_port(), free_port()
    sim = start_simulator(sim_port, "--strict", "--app-rate", "20", "--project-rate", "800")
    env = gateway_env(
        bootstrap,
        sim_port,
        http_port,
        tag,
        app_rate=20,
        project_rate=800,
        max_buffered_records=budget,
        **lanes,
    )
    gw = start_gateway(env)
    try:
        wait_port(http_port)
        async with aiohttp.ClientSession() as http:
            await wait_first_send(http, sim_port, 60)
            await asyncio.sleep(3)  # "three seconds into the drain"
            t0 = time.time()
            probes = await publish_probes(bootstrap, topic, 20, 0.1)
            wanted = {rid for sent in probes.values() for rid, _ in sent}
            while True:  # until every probe is accepted (at least window_s) or wait_s is over
                now = time.time()
                at = accepted_at(await sim_accepted(http, sim_port))
                if now - t0 >= wait_s or (wanted <= set(at) and now - t0 >= window_s):
                    break
                await asyncio.sleep(0.5)
            t1 = time.time()
            entries = await sim_accepted(http, sim_port)
            stats = await sim_stats(http, sim_port)
            spilled = await gateway_metric(http, http_port, "gateway_spilled_records_total")
            hwm = rss_mb(gw.pid, "VmHWM")
    finally:
        stop(gw)
        stop(sim)
    at = accepted_at(entries)
    camp = sorted(at_of(e) for e in entries if e["app_id"] == CAMPAIGN_APP)
    in_window = [t for t in camp if t0 <= t <= t1]
    per_s = [sum(1 for t in camp if t0 + k <= t < t0 + k + 1) for k in range(int(t1 - t0))]
    return {
        "latency": latencies(probes, at),
        "campaign_rate": len(in_window) / (t1 - t0),
        "campaign_min_1s": min(per_s, default=0),
        "window_s": t1 - t0,
        "rejected_429": stats["rejected_429"]["total"],  # type: ignore[index]
        "spilled": spilled,
        "rss_mb": hwm,
    }


def print_side_by_side(runs: dict[str, dict[str, Any]], wait_s: float) -> None:
    names = list(runs)
    print(f"  {'':<34}" + "".join(f"{n:>40}" for n in names))
    for case, label in CASES.items():
        cells = [describe(runs[n]["latency"][case], wait_s) for n in names]
        print(f"  ({case}) {label:<30}" + "".join(f"{c:>40}" for c in cells))
    rows: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
        ("campaign app, rate in the window", lambda r: f"{r['campaign_rate']:.1f}/s"),
        ("  fewest in one second", lambda r: f"{r['campaign_min_1s']}"),
        ("  window (s)", lambda r: f"{r['window_s']:.1f}"),
        ("records spilled", lambda r: f"{r['spilled']:,.0f}"),
        ("429 answers", lambda r: f"{r['rejected_429']}"),
        ("gateway peak RSS (MB)", lambda r: f"{r['rss_mb']:.0f}"),
    )
    for label, cell in rows:
        print(f"  {label:<34}" + "".join(f"{cell(runs[n]):>40}" for n in names))


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--campaign", type=int, default=27_000, help="requests of the campaign's app")
    p.add_argument("--budget", type=int, default=20_000, help="max_buffered_records")
    p.add_argument(
        "--horizon",
        type=float,
        default=None,
        help="lane_horizon_s with spill-over (default: the setting's)",
    )
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the probes")
    p.add_argument("--window", type=float, default=15.0, help="least seconds measured")
    ns = p.parse_args()
    print(
        f"campaign of {ns.campaign:,} requests of one app in one partition; budget "
        f"{ns.budget:,} records; app 20/s, project 800/s; simulator in strict mode"
    )
    runs: dict[str, dict[str, Any]] = {}
    with EmbeddedBroker() as broker:
        on = {} if ns.horizon is None else {"lane_horizon_s": ns.horizon}
        for name, lanes in (
            ("spill-over" + (f" (lane_horizon_s {ns.horizon:g})" if on else ""), on),
            # a lane may hold the whole budget: how the gateway behaved before read-ahead
            ("spill-over off (lane_min_read_ahead = budget)", {"lane_min_read_ahead": ns.budget}),
        ):
            runs[name] = await scenario(
                broker.bootstrap, ns.campaign, ns.budget, lanes, ns.wait, ns.window
            )
    print_side_by_side(runs, ns.wait)


if __name__ == "__main__":
    asyncio.run(main())
