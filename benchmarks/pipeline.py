"""The gateway's own Python per message, without HTTP or Kafka: a low-noise check of a change.

    python -m benchmarks.pipeline [--messages 20000] [--apps 40] [--repeat 5] [--loop uvloop]

The drain benchmark's CPU ratio moves by tens of percent from one run to the next on a
shared machine, so a change of a few percent in the hot path cannot be seen there. This runs
the real lanes, buckets, window guard, delivery and outcome writer in one process, with a
Sinch client that answers at once and a publisher that acknowledges at once: what is left is
the per-message work those parts add to an HTTP exchange and a Kafka read. Each message is
decoded from its record as intake does. Buckets are wide open (no pacing sleeps), so the
pacing path is the one taken when a slot is free. Prints the CPU per message of each run and
the lowest: the lowest is the one least disturbed by the rest of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from gateway.cli import loop_factory, sample_request
from gateway.dedupe import RecentIds
from gateway.delivery import Delivery
from gateway.envelope import decode
from gateway.lanes import Lanes
from gateway.limiter import Bucket
from gateway.metrics import Metrics
from gateway.offsets import Origin, PartitionTracker
from gateway.outcomes import Ending, Outcomes
from gateway.producer import Output
from gateway.settings import load
from gateway.sinch import Accepted
from gateway.tokens import BasicAuth


class InstantSinch:
    """``SinchClient.send`` answered at once with an accepted message."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, *, region: str, project_id: str, body: bytes, authorization: str) -> Any:
        self.sent += 1
        return Accepted(f"msg-{self.sent}", "2026-12-04T00:00:00.000Z")


class InstantPublisher:
    """``Publisher.send_many`` whose batches are acknowledged at once."""

    async def send_many(self, outputs: Sequence[Output]) -> list[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return [(fut, list(range(len(outputs))))]


async def run(messages: int, apps: int, paced: bool = False) -> float:
    """CPU seconds per message for ``messages`` requests over ``apps`` apps.

    ``paced``: the buckets at the settings' rates (project 800/s, apps 20/s), as in a drain.
    """
    loop = asyncio.get_running_loop()
    settings = load(env={}, project_id="demo-project", key_id="demo-key", key_secret="demo-secret")  # noqa: S106
    metrics = Metrics(CollectorRegistry())
    tracker = PartitionTracker(0, topic=settings.requests_topic)
    done = asyncio.Event()
    finished = 0

    def release(ending: Ending, ok: bool) -> None:
        nonlocal finished
        tracker.done(ending.origin.offset)
        finished += 1
        if finished == messages:
            done.set()

    outcomes = Outcomes(
        settings=settings,
        publisher=InstantPublisher(),
        metrics=metrics,
        sent_ids=RecentIds(settings.dedupe_size, settings.dedupe_ttl_s, loop.time),
        clock=loop.time,
        release=release,
    )
    delivery = Delivery(
        settings=settings,
        sinch=InstantSinch(),  # type: ignore[arg-type]
        tokens=BasicAuth(settings.key_id, settings.key_secret),
        outcomes=outcomes,
        metrics=metrics,
        clock=loop.time,
    )
    wiring: dict[str, Any] = {"gate": delivery.gate}
    if "ready" in inspect.signature(Lanes).parameters:  # the code of the day before has none
        wiring["ready"] = delivery.ready
    wide = 1e9
    margin = settings.rate_margin
    app_rate, project_rate = (settings.app_rate, settings.project_rate) if paced else (wide, wide)
    make: Callable[[str, str | None], Bucket] = lambda app, _p: Bucket(  # noqa: E731
        f"app:{app}", app_rate, burst=settings.app_burst, margin=margin, clock=loop.time
    )
    project = Bucket(
        "project", project_rate, burst=settings.project_burst, margin=margin, clock=loop.time
    )
    lanes = Lanes(
        project_bucket=project,
        make_app_bucket=make,
        channel_buckets={},
        max_in_flight=settings.max_in_flight,
        sender=delivery.attempt,
        clock=loop.time,
        on_wait=metrics.limiter_wait.observe,
        on_expired=delivery.expire,
        **wiring,
    )
    values = [orjson.dumps(sample_request(f"app-{i % apps:03d}", i)) for i in range(messages)]
    cpu0 = time.process_time()
    for offset, value in enumerate(values):
        tracker.add(offset)
        req = decode(value, max_bytes=settings.max_message_bytes)
        req.origin = Origin(tracker, offset, key=req.app_id.encode(), value=value)
        req.received_at = loop.time()
        lanes.put(req)
        if offset % 256 == 255:
            await asyncio.sleep(0)  # as intake yields between slices of a fetch
    await done.wait()
    cpu = time.process_time() - cpu0
    await lanes.close()
    await outcomes.close()
    return cpu / messages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--apps", type=int, default=40)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument(
        "--paced",
        action="store_true",
        help="buckets at the settings' rates (800/s, 20/s per app): pacing and window guard",
    )
    ns = p.parse_args()
    runs: list[float] = []
    for _ in range(ns.repeat):
        with asyncio.Runner(loop_factory=loop_factory(ns.loop)) as runner:
            runs.append(runner.run(run(ns.messages, ns.apps, ns.paced)))
    shown = ", ".join(f"{r * 1e6:.1f}" for r in runs)
    print(
        f"{ns.messages:,} messages over {ns.apps} apps ({ns.loop}{', paced' if ns.paced else ''}): "
        f"{shown} us of CPU per "
        f"message; lowest {min(runs) * 1e6:.1f} us"
    )


if __name__ == "__main__":
    main()
