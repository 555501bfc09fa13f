"""Processes for the benchmarks: broker, simulator and gateway, each its own process.

Each runs as a separate OS process so that CPU time and memory are measured for the
gateway alone (from /proc), never mixed with the broker's or the simulator's.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.broker import stop_process
from gateway.producer import ensure_topics
from gateway.settings import load

CLK_TCK = os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_simulator(port: int, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "simulate", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


def start_gateway(env: dict[str, str], log_path: str | None = None) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    # BENCH_SET_<KEY>=value: a setting for every gateway of the run (GATEWAY_<KEY>), to try one
    tried = {
        "GATEWAY_" + k.removeprefix("BENCH_SET_"): v
        for k, v in os.environ.items()
        if k.startswith("BENCH_SET_")
    }
    log_path = log_path or os.environ.get("BENCH_GATEWAY_LOG")  # the gateway's log: append
    out = Path(log_path).open("ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    cmd = [sys.executable, "-m", "gateway", "run", "--log-format", "text"]
    proc = subprocess.Popen(
        cmd,
        env={**base, **env, **tried},
        stdout=out,
        stderr=out,
    )
    if os.environ.get("BENCH_PYSPY"):  # profile the gateway: BENCH_PYSPY=out.txt
        # BENCH_PYSPY_DELAY: seconds to wait first (past start-up); BENCH_PYSPY_SECONDS: length
        delay = float(os.environ.get("BENCH_PYSPY_DELAY", "0"))
        length = os.environ.get("BENCH_PYSPY_SECONDS", "12")
        native = " --native" if os.environ.get("BENCH_PYSPY_NATIVE") else ""
        spy_out = os.environ["BENCH_PYSPY"]
        rate = os.environ.get("BENCH_PYSPY_RATE", "200")  # samples a second
        record = f"py-spy record{native} --format raw -o {spy_out} -d {length} -r {rate}"
        subprocess.Popen(
            ["sh", "-c", f"sleep {delay} && exec {record} -p {proc.pid}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return proc


def gateway_env(
    bootstrap: str, sim_port: int, http_port: int, tag: str, **extra: object
) -> dict[str, str]:
    env = {
        "GATEWAY_KAFKA_BOOTSTRAP": bootstrap,
        "GATEWAY_PROJECT_ID": "demo-project",
        "GATEWAY_KEY_ID": "demo-key",
        "GATEWAY_KEY_SECRET": "demo-secret",
        "GATEWAY_AUTH_URL": f"http://127.0.0.1:{sim_port}/oauth2/token",
        "GATEWAY_CONVERSATION_URL": f"http://127.0.0.1:{sim_port}/{{region}}",
        "GATEWAY_HTTP_HOST": "127.0.0.1",
        "GATEWAY_HTTP_PORT": str(http_port),
        "GATEWAY_REQUESTS_TOPIC": f"req-{tag}",
        "GATEWAY_REQUESTS_HIGH_TOPIC": f"high-{tag}",
        "GATEWAY_SPILL_TOPIC": f"spl-{tag}",
        "GATEWAY_RESULTS_TOPIC": f"res-{tag}",
        "GATEWAY_STATUS_TOPIC": f"sta-{tag}",
        "GATEWAY_DLQ_TOPIC": f"dlq-{tag}",
        "GATEWAY_EVENTS_TOPIC": f"evt-{tag}",
        "GATEWAY_GROUP_ID": f"grp-{tag}",
        "GATEWAY_SESSION_TIMEOUT_S": "6",
        "GATEWAY_LOG_LEVEL": "WARNING",
    }
    env.update({f"GATEWAY_{k.upper()}": str(v) for k, v in extra.items()})
    return env


async def sim_stats(http: aiohttp.ClientSession, port: int) -> dict[str, object]:
    async with http.get(f"http://127.0.0.1:{port}/_sim/stats") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def sim_accepted(http: aiohttp.ClientSession, port: int) -> list[dict[str, Any]]:
    """The simulator's accepted log: message_id, app_id, correlation_id, accepted_time."""
    async with http.get(f"http://127.0.0.1:{port}/_sim/accepted") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def gateway_metric(http: aiohttp.ClientSession, port: int, name: str) -> float:
    """The sum over every label set of one sample name on the gateway's /metrics."""
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def make_topics(
    bootstrap: str, tag: str, partitions: int = 6, spill_partitions: int = 24
) -> None:
    """The gateway's topics for one run, named by ``tag`` as in :func:`gateway_env`."""
    settings = load(
        env={},
        kafka_bootstrap=bootstrap,
        requests_topic=f"req-{tag}",
        requests_high_topic=f"high-{tag}",
        spill_topic=f"spl-{tag}",
        results_topic=f"res-{tag}",
        status_topic=f"sta-{tag}",
        dlq_topic=f"dlq-{tag}",
        events_topic=f"evt-{tag}",
        topic_partitions=partitions,
        spill_partitions=spill_partitions,
    )
    await ensure_topics(settings)


async def sim_post(
    http: aiohttp.ClientSession, port: int, path: str, doc: dict[str, object]
) -> None:
    async with http.post(f"http://127.0.0.1:{port}{path}", json=doc) as resp:
        resp.raise_for_status()


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    return stop_process(proc, timeout)


Sample = tuple[str, dict[str, str], float]
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


async def gateway_samples(http: aiohttp.ClientSession, port: int) -> list[Sample]:
    """Every sample on the gateway's /metrics: (name, labels, value)."""
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    samples: list[Sample] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        samples.append((name, dict(LABEL.findall(rest)), float(value)))
    return samples


async def gateway_ready(http: aiohttp.ClientSession, port: int) -> dict[str, Any]:
    """The gateway's /readyz body (200 or 503 alike)."""
    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return await resp.json()  # type: ignore[no-any-return]
