#!/usr/bin/env python3
"""A bounded headless Locust run against a throwaway stack on 127.0.0.1.

Starts the embedded Kafka broker (Tansu), ``gateway simulate`` and ``gateway run``
as subprocesses (the gateway configured only by ``GATEWAY_*`` variables), waits for
``/readyz``, runs ``loadtests/locustfile.py`` headless for ``--duration`` seconds,
writes Locust's HTML report and CSV stats to ``--reports`` (loadtests/reports/),
prints the figures as a Markdown table and exits 1 unless the run passed: requests
published at the target rate, every result back as sent, zero failures.

    python loadtests/run.py --duration 20 --rate 100
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import report

from gateway.broker import EmbeddedBroker, free_port, stop_process

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
WEBHOOK_SECRET = "demo-webhook-secret"  # noqa: S105 - demo value, shared with the simulator only
PROJECT, KEY_ID, KEY_SECRET = "demo-project", "demo-key", "demo-secret"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds of load (Locust -t)")
    parser.add_argument("--rate", type=float, default=100.0, help="send requests per second")
    parser.add_argument("--apps", type=int, default=10, help="app ids to spread requests over")
    parser.add_argument("--send-users", type=int, default=4)
    parser.add_argument("--webhook-rate", type=float, default=10.0, help="callbacks per second")
    parser.add_argument(
        "--app-rate", type=float, default=20.0, help="per-app cap (gateway and simulator)"
    )
    parser.add_argument("--project-rate", type=float, default=800.0)
    parser.add_argument("--result-timeout", type=float, default=30.0)
    parser.add_argument("--reports", type=Path, default=HERE / "reports")
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    return parser.parse_args(argv)


def _clean_env() -> dict[str, str]:
    """This environment minus GATEWAY_* (an unknown one would stop the gateway)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


@contextlib.contextmanager
def process(argv: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child process with its output in ``log``; SIGTERM on exit, SIGKILL if it lingers."""
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own commands, built above
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            yield proc
        finally:
            stop_process(proc, 30.0)


def wait_until(
    what: str, check: Callable[[], bool], procs: list[subprocess.Popen[bytes]], timeout_s: float
) -> None:
    """Poll ``check()`` until true; fail at once if a child died, or at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not check():
        for proc in procs:
            if proc.poll() is not None:
                command = " ".join(map(str, proc.args[2:4]))  # type: ignore[index]
                raise SystemExit(f"{what}: {command} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.1)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def gateway_ready(url: str) -> bool:
    """``/readyz`` answers 200 and the consumer has its partitions.

    Waiting for the assignment (not only readiness, which a group still joining also
    has) keeps the group's first rebalance out of the measured latencies.
    """
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - http on loopback
            body = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError):
        return False
    detail = str(body.get("checks", {}).get("partitions", {}).get("detail", ""))
    return detail.startswith("assigned")


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - http on loopback
        return json.load(resp)


def gateway_env(
    ns: argparse.Namespace, bootstrap: str, sim_port: int, http_port: int
) -> dict[str, str]:
    sim = f"http://127.0.0.1:{sim_port}"
    return {
        **_clean_env(),
        "GATEWAY_KAFKA_BOOTSTRAP": bootstrap,
        "GATEWAY_GROUP_ID": f"loadtest-{uuid.uuid4().hex[:8]}",
        "GATEWAY_PROJECT_ID": PROJECT,
        "GATEWAY_KEY_ID": KEY_ID,
        "GATEWAY_KEY_SECRET": KEY_SECRET,
        "GATEWAY_AUTH_URL": f"{sim}/oauth2/token",
        "GATEWAY_CONVERSATION_URL": sim + "/{region}",
        "GATEWAY_PROJECT_RATE": f"{ns.project_rate:g}",
        "GATEWAY_APP_RATE": f"{ns.app_rate:g}",
        "GATEWAY_HTTP_HOST": "127.0.0.1",
        "GATEWAY_HTTP_PORT": str(http_port),
        "GATEWAY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "GATEWAY_SESSION_TIMEOUT_S": "6",
        "GATEWAY_COMMIT_INTERVAL_S": "0.5",
        "GATEWAY_LOG_FORMAT": "text",
        "GATEWAY_LOG_LEVEL": "WARNING",
    }


def flags(values: dict[str, object]) -> list[str]:
    """``{"--port": 9000}`` → ``["--port", "9000"]``."""
    return [str(part) for pair in values.items() for part in pair]


def simulator_argv(ns: argparse.Namespace, port: int, callback_url: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "simulate", "--strict", *flags({
        "--host": "127.0.0.1",
        "--port": port,
        "--project-id": PROJECT,
        "--key-id": KEY_ID,
        "--key-secret": KEY_SECRET,
        "--app-rate": f"{ns.app_rate:g}",
        "--project-rate": f"{ns.project_rate:g}",
        "--callback-url": callback_url,
        "--callback-secret": WEBHOOK_SECRET,
    })]  # fmt: skip


def locust_argv(ns: argparse.Namespace, bootstrap: str, base: str, webhook_users: int) -> list[str]:
    users = ns.send_users + webhook_users
    argv = [sys.executable, "-m", "locust", "--headless", "--only-summary", *flags({
        "-f": LOCUSTFILE,
        "-u": users,
        "-r": users * 10,  # all users at once: the run time is all load
        "-t": f"{ns.duration}s",
        "--stop-timeout": 5,
        "--host": base,
        "--kafka-bootstrap": bootstrap,
        "--send-rate": f"{ns.rate:g}",
        "--send-users": ns.send_users,
        "--apps": ns.apps,
        "--webhook-rate": f"{max(ns.webhook_rate, 0.001):g}",
        "--webhook-users": webhook_users,
        "--webhook-secret": WEBHOOK_SECRET,
        "--result-timeout": f"{ns.result_timeout:g}",
        "--html": ns.reports / "report.html",
        "--csv": ns.reports / "locust",
        "--loglevel": "WARNING",
        "--exit-code-on-error": 1,
    })]  # fmt: skip
    if not webhook_users:
        argv.append("KafkaSendUser")
    return argv


def run(ns: argparse.Namespace) -> int:
    ns.reports.mkdir(parents=True, exist_ok=True)
    sim_port, http_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"
    webhook_users = 1 if ns.webhook_rate > 0 else 0
    sim_argv = simulator_argv(ns, sim_port, f"{base}/webhooks/sinch")
    gateway_argv = [sys.executable, "-m", "gateway", "run"]
    with (
        EmbeddedBroker(log_path=str(ns.reports / "broker.log")) as broker,
        process(sim_argv, ns.reports / "simulator.log", _clean_env()) as simulator,
    ):
        wait_until("simulator", lambda: port_open(sim_port), [simulator], ns.ready_timeout)
        env = gateway_env(ns, broker.bootstrap, sim_port, http_port)
        with process(gateway_argv, ns.reports / "gateway.log", env) as gateway:
            ready = functools.partial(gateway_ready, f"{base}/readyz")
            wait_until("gateway /readyz", ready, [gateway, simulator], ns.ready_timeout)
            print(f"stack up: broker {broker.bootstrap}, simulator :{sim_port}, gateway {base}")
            argv = locust_argv(ns, broker.bootstrap, base, webhook_users)
            locust = subprocess.run(argv, env=_clean_env(), check=False, cwd=HERE)  # noqa: S603
            sim_stats = http_json(f"http://127.0.0.1:{sim_port}/_sim/stats")
    return summarize(ns, locust.returncode, sim_stats)


def summarize(ns: argparse.Namespace, locust_code: int, sim_stats: dict[str, Any]) -> int:
    rows = report.read_stats(ns.reports / "locust_stats.csv")
    found = report.problems(rows, target_rate=ns.rate)
    if locust_code != 0:
        found.append(f"locust exited with code {locust_code}")
    windows = sim_stats.get("max_received_per_s", {})
    rejected = sim_stats.get("rejected_429", {}).get("total", "?")
    lines = [
        f"Locust, {ns.duration} s headless, target {ns.rate:g} send requests/s over {ns.apps} apps "
        f"(app cap {ns.app_rate:g}/s), {ns.webhook_rate:g} webhook callbacks/s; latencies in ms.",
        "",
        report.table(rows),
        "",
        f"simulator: busiest 1 s window {windows.get('project', '?')} sends (project), "
        f"429 answers: {rejected}",
        "result: " + ("PASS" if not found else "FAIL: " + "; ".join(found)),
    ]
    text = "\n".join(lines)
    print(text)
    (ns.reports / "summary.md").write_text(text + "\n")
    return 0 if not found else 1


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so the broker, simulator and gateway are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
