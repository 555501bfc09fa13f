"""The whole path of one message on a real broker and the simulator."""

from __future__ import annotations

import orjson

from tests.conftest import wait_for
from tests.integration.harness import (
    committed_total,
    publish,
    read_records,
    requests_for,
    running,
    settings_for,
)


async def test_300_requests_over_6_apps_sent_once_with_results_and_commits(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(strict=True, app_rate=50)
    settings = settings_for(broker.bootstrap, sim.port, topics, app_rate=50)
    apps = [f"app-{i}" for i in range(6)]
    docs = requests_for(apps, 300)
    request_ids = {orjson.loads(v)["request_id"] for _, v in docs}
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, docs)
        results = await read_records(broker.bootstrap, settings.results_topic, 300, timeout_s=60)

        async def all_committed() -> bool:
            return True

        await wait_for(all_committed, 5)
    accepted = await sim.accepted()
    assert sorted(a["correlation_id"] for a in accepted) == sorted(request_ids)
    stats = await sim.stats()
    assert stats["duplicates"]["total"] == 0
    assert stats["rejected_429"]["total"] == 0
    docs_out = [orjson.loads(r.value) for r in results]
    assert len(docs_out) == 300
    assert {d["status"] for d in docs_out} == {"sent"}
    by_id = {a["correlation_id"]: a["message_id"] for a in accepted}
    assert all(d["message_id"] == by_id[d["request_id"]] for d in docs_out)
    total = await committed_total(broker.bootstrap, settings.requests_topic, settings.group_id, 3)
    assert total == 300
