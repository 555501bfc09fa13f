"""Several Sinch projects on the real broker and simulator.

Each project has its own key (its own token), its own project cap on the simulator
and its own project bucket in the gateway: two projects drain side by side, each
within and near its own cap. A record naming a project the gateway has no key for
is dead-lettered at once and holds nothing behind it.
"""

from __future__ import annotations

from collections import Counter, deque
from datetime import datetime
from typing import Any

import orjson

from gateway.cli import sample_request
from gateway.settings import ProjectSettings, Secret
from tests.integration.harness import publish, read_records, running, settings_for

CAP_A = 100  # the default project (demo-project)
CAP_B = 50  # project B
APP_RATE = 200  # above both caps: the project caps bind
PROJECT_B = "proj-b"


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def max_in_window(times: list[float], width_s: float = 1.0) -> int:
    """The most events inside any window (t - width_s, t]."""
    inside: deque[float] = deque()
    most = 0
    for t in sorted(times):
        inside.append(t)
        while inside[0] <= t - width_s:
            inside.popleft()
        most = max(most, len(inside))
    return most


def request(app_id: str, n: int, project_id: str | None) -> dict[str, Any]:
    doc = sample_request(app_id, n)
    if project_id is not None:
        doc["project_id"] = project_id
    return doc


async def test_two_projects_drain_side_by_side_each_within_and_near_its_cap(
    broker, simulator_factory, topics
):
    sim = await simulator_factory(
        strict=True,
        project_rate=CAP_A,
        app_rate=APP_RATE,
        projects={PROJECT_B: {"key_id": "key-b", "key_secret": "secret-b", "rate": CAP_B}},
    )
    project_b = ProjectSettings(
        project_id=PROJECT_B, key_id="key-b", key_secret=Secret("secret-b"), rate=CAP_B
    )
    settings = settings_for(
        broker.bootstrap,
        sim.port,
        topics,
        project_rate=CAP_A,
        app_rate=APP_RATE,
        projects={"b": project_b},
        # the simulator runs on the test's event loop: a stall of the loop between a
        # send and its arrival counts against the margin (20 ms by default) as well as
        # the network's jitter; at the 100/s cap one such stall on a loaded machine
        # drew a 429
        rate_margin=0.05,
    )
    # 600 for the default project over 4 apps (half of them name it, half leave it out),
    # 300 for project B over 3 apps; interleaved, keyed by app.
    docs_a = [request(f"a-{i % 4}", i, "demo-project" if i % 2 else None) for i in range(600)]
    docs_b = [request(f"b-{i % 3}", i, PROJECT_B) for i in range(300)]
    # An unknown project first in the partition of a-0: were it held, a-0 would stall.
    ghost = request("a-0", 9999, "no-such-project")
    mixed = [ghost]
    for i, doc in enumerate(docs_a):
        mixed.append(doc)
        if i % 2:
            mixed.append(docs_b[i // 2])
    records = [(d["payload"]["app_id"].encode(), orjson.dumps(d)) for d in mixed]
    total = len(records)
    async with running(settings):
        await publish(broker.bootstrap, settings.requests_topic, records)
        dlq = await read_records(broker.bootstrap, settings.dlq_topic, 1, timeout_s=30)
        results = await read_records(broker.bootstrap, settings.results_topic, total, 60)
    accepted = await sim.accepted()
    stats = await sim.stats()

    # The unknown project: dead-lettered, a rejected result, nothing sent.
    assert [r.value for r in dlq] == [orjson.dumps(ghost)]
    assert dict(dlq[0].headers)["gateway.reason"] == b"unknown_project"
    by_id = {d["request_id"]: d for d in (orjson.loads(r.value) for r in results)}
    assert len(by_id) == total, (len(by_id), total, stats["accepted_by_project"])
    assert by_id.pop(ghost["request_id"])["status"] == "rejected"
    assert Counter(d["status"] for d in by_id.values()) == {"sent": total - 1}

    # Every other record sent once, to its own project, with its own key.
    sent = {a["correlation_id"]: a["project_id"] for a in accepted}
    assert len(accepted) == total - 1 == len(sent)
    assert {rid for rid, p in sent.items() if p == "demo-project"} == {
        d["request_id"] for d in docs_a
    }
    assert {rid for rid, p in sent.items() if p == PROJECT_B} == {d["request_id"] for d in docs_b}
    assert stats["accepted_by_project"] == {"demo-project": 600, PROJECT_B: 300}
    assert stats["rejected_429"]["total"] == 0, (
        stats["rejected_429"],
        stats["rejected_429_by_project"],
    )
    assert stats["forbidden_403"] == 0
    assert stats["unauthorized_401"] == 0
    # The rejection did not wait for the drain behind it.
    first_accept = min(ts(a["accepted_time"]) for a in accepted)
    assert dlq[0].timestamp / 1000 <= first_accept + 1.0, (dlq[0].timestamp, first_accept)

    # Each project within its cap (the simulator's exact window, and from its log) ...
    times = {
        p: [ts(a["accepted_time"]) for a in accepted if a["project_id"] == p]
        for p in ("demo-project", PROJECT_B)
    }
    caps = {"demo-project": CAP_A, PROJECT_B: CAP_B}
    for project, cap in caps.items():
        assert stats["max_accepted_per_s"]["by_project"][project] <= cap, stats
        assert max_in_window(times[project]) <= cap, project
    # ... and near it while both are busy: after the later start (and half a second to
    # settle), up to the earlier finish.
    start = max(min(t) for t in times.values()) + 0.5
    end = min(max(t) for t in times.values())
    assert end - start >= 3.0, (start, end)
    rates = {p: sum(start <= x <= end for x in t) / (end - start) for p, t in times.items()}
    for project, cap in caps.items():
        assert rates[project] >= 0.9 * cap, (rates, stats["max_accepted_per_s"])
