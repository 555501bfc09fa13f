"""``gateway demo``: its own Redis for several replicas, the fall-back without one, and
one short run of two replicas end to end (embedded broker, simulator, redis-server)."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.demo import LocalRedis, run_demo, shared_cap


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        pytest.fail("redis-server not found: apt-get install redis-server")
    return found


def test_replicas_option() -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).replicas == 1
    assert parser.parse_args(["demo", "--replicas", "3"]).replicas == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--replicas", "0"])


async def test_one_replica_needs_no_redis(capsys: pytest.CaptureFixture[str]) -> None:
    async with shared_cap(1) as url:
        assert url is None
    assert capsys.readouterr().out == ""


async def test_several_replicas_get_a_redis_of_their_own_stopped_by_pid(
    capsys: pytest.CaptureFixture[str],
) -> None:
    redis_binary()
    async with shared_cap(2) as url:
        assert url is not None
        port = int(re.fullmatch(r"redis://127\.0\.0\.1:(\d+)/0", url).group(1))  # type: ignore[union-attr]
        assert answers_ping(port)
        out = capsys.readouterr().out
        pid = int(re.search(r"\(pid (\d+), no persistence\)", out).group(1))  # type: ignore[union-attr]
        assert f"one project cap for 2 replicas in redis-server {url}" in out
        os.kill(pid, 0)  # running
    assert not answers_ping(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped


async def test_without_redis_server_several_replicas_take_the_partition_share(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    async with shared_cap(2) as url:
        assert url is None
    out = capsys.readouterr().out
    assert "redis-server not found on the PATH" in out
    assert "partition share" in out


def test_local_redis_says_why_it_did_not_start() -> None:
    """A port already taken: redis-server exits, and start() says so instead of waiting."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        redis = LocalRedis(redis_binary(), port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="redis-server exited"):
            redis.start(timeout_s=10)
        redis.stop()  # nothing left to stop


@pytest.mark.timeout(180)
async def test_two_replicas_drain_through_one_cap(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's replica path end to end: both replicas join, the partitions split,
    every message is sent, and the summary names each replica's share and the cap."""
    redis_binary()
    code = await run_demo(messages=60, apps=6, project_rate=800.0, replicas=2)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "results after" in out
    assert "60 sent" in out
    rows = re.findall(
        r"^([12]) +([\d,]+) +(\d+)  (\d+) slots in (\d+) Redis round trips$", out, re.M
    )
    assert [r[0] for r in rows] == ["1", "2"], out
    partitions = [p for r in rows for p in r[1].split(",")]
    assert sorted(partitions, key=int) == [str(p) for p in range(6)]
    assert sum(int(r[2]) for r in rows) == 60
    assert all(int(r[3]) >= int(r[2]) for r in rows)  # a send takes a slot at least
    summary = re.search(r"2 replicas \(one cap in Redis\): 60 sent, project max (\d+) ", out)
    assert summary is not None, out
    assert 0 < int(summary.group(1)) <= 800
