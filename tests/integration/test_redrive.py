"""A DLQ filled by a Sinch fault, re-driven once the fault is gone: each request sent once."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections import Counter

import orjson
import pytest

from gateway.redrive import REDRIVES_HEADER, Selection, redrive
from tests.conftest import wait_for
from tests.integration.harness import (
    committed_and_end,
    publish,
    read_records,
    requests_for,
    running,
    settings_for,
    to_env,
)

DOCS, APPS, RATE = 500, 10, 100.0


async def cli_redrive(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """``gateway redrive`` as a process of its own (off the loop the gateway runs on)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "redrive",
        *argv,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.timeout(120)
async def test_a_redrive_after_the_fault_sends_each_request_once_and_a_second_sends_none(
    broker, simulator_factory, topics
):
    # every send answers 500/503 and one attempt is all a request gets: all go to the DLQ
    sim = await simulator_factory(app_rate=RATE, error_rate=1.0)
    settings = settings_for(
        broker.bootstrap,
        sim.port,
        topics,
        app_rate=RATE,
        max_attempts=1,
        app_rates_from_sinch=False,
        redrive_ledger_topic=f"led-{uuid.uuid4().hex[:8]}",
    )
    docs = requests_for([f"rd{i}" for i in range(APPS)], DOCS)
    wanted = {orjson.loads(v)["request_id"] for _, v in docs}
    await publish(broker.bootstrap, settings.requests_topic, docs)
    async with running(settings):
        dlq = await read_records(broker.bootstrap, settings.dlq_topic, DOCS, timeout_s=60)
        assert len(dlq) == DOCS
        assert {dict(r.headers)["gateway.reason"] for r in dlq} == {b"retries_exhausted"}
        assert (await sim.stats())["accepted_total"] == 0

        await sim.post("/_sim/config", {"error_rate": 0.0})
        first = await redrive(settings, Selection(reasons=frozenset({"retries_exhausted"})))
        assert (first.scanned, first.matched, first.redriven) == (DOCS, DOCS, DOCS)
        assert (first.already, first.too_many, first.refused) == (0, 0, 0)

        async def all_accepted() -> bool:
            return (await sim.stats())["accepted_total"] >= DOCS

        await wait_for(all_accepted, 30, interval=0.2, what=f"{DOCS} accepted sends")

        # the second run, as an operator types it
        code, out, err = await cli_redrive(to_env(settings), "--reason", "retries_exhausted")
        assert code == 0, err
        assert f"re-driven 0, skipped {DOCS} already re-driven" in out

        async def all_committed() -> bool:
            ends = await committed_and_end(
                broker.bootstrap, settings.requests_topic, settings.group_id
            )
            return all((committed or 0) == end for committed, end in ends.values())

        await wait_for(all_committed, 30, interval=0.2, what="every request read and committed")
        accepted = Counter(a["correlation_id"] for a in await sim.accepted())
        stats = await sim.stats()
    assert set(accepted) == wanted
    assert set(accepted.values()) == {1}  # each exactly once
    assert stats["accepted_total"] == DOCS
    assert stats["duplicates"]["total"] == 0

    requests = await read_records(broker.bootstrap, settings.requests_topic, 2 * DOCS, 30)
    assert len(requests) == 2 * DOCS  # the originals and one re-drive each, nothing more
    redriven = [r for r in requests if REDRIVES_HEADER in dict(r.headers)]
    assert len(redriven) == DOCS
    assert {dict(r.headers)[REDRIVES_HEADER] for r in redriven} == {b"1"}
    assert {r.value for r in redriven} == {v for _, v in docs}  # the bytes, unchanged

    results = await read_records(broker.bootstrap, settings.results_topic, 2 * DOCS, 30)
    by_status: dict[str, set[str]] = {}
    for r in results:
        doc = orjson.loads(r.value)
        by_status.setdefault(doc["status"], set()).add(doc["request_id"])
    assert by_status == {"failed": wanted, "sent": wanted}
