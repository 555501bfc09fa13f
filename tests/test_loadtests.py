"""The Locust load tests: their payloads, their report reading, and a short smoke run.

The smoke run starts the real stack on 127.0.0.1 (embedded broker, ``gateway
simulate``, ``gateway run``) and a 3-second headless Locust run through
``loadtests/run.py``; the 20-second run whose figures are in loadtests/README.md
is the same command with the defaults, kept out of CI for time.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import orjson
import pytest

from gateway import webhooks
from gateway.envelope import decode

ROOT = Path(__file__).resolve().parent.parent
LOADTESTS = ROOT / "loadtests"


def load(name: str) -> ModuleType:
    """A loadtests/ module by path (it is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"loadtests_{name}", LOADTESTS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


payloads = load("payloads")
report = load("report")

HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
    "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
    "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)


def stats_csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "locust_stats.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def row(kind: str, name: str, count: int, failures: int, rps: float) -> str:
    pct = ",".join(["10"] * 11)
    return f"{kind},{name},{count},{failures},10,11.5,1,40,300,{rps},0.0,{pct}"


def test_signature_is_the_one_the_gateway_checks() -> None:
    body = payloads.delivery_report("app-1")
    headers = payloads.signed_headers("s3cret", body, now=1_700_000_000)
    assert headers[webhooks.TIMESTAMP] == "1700000000"
    expected = webhooks.sign("s3cret", body, headers[webhooks.NONCE], "1700000000")
    assert headers[webhooks.SIGNATURE] == expected
    assert payloads.sign("other", body, "n", "1") != webhooks.sign("s3cret", body, "n", "1")


def test_callbacks_carry_the_fields_that_name_their_trigger() -> None:
    report_doc = orjson.loads(payloads.delivery_report("app-1"))
    inbound_doc = orjson.loads(payloads.inbound_message("app-2"))
    assert webhooks.TRIGGERS["message_delivery_report"] == "MESSAGE_DELIVERY"
    assert report_doc["message_delivery_report"]["status"] in webhooks.DELIVERY_STATUSES
    assert "message" in inbound_doc
    assert (report_doc["app_id"], inbound_doc["app_id"]) == ("app-1", "app-2")


def test_send_requests_are_valid_envelopes_for_their_app() -> None:
    request_id, key, value = payloads.send_request("loadtest-app-3")
    req = decode(value, max_bytes=1 << 20)
    assert req.request_id == request_id
    assert req.app_id == "loadtest-app-3"
    assert key == b"loadtest-app-3"
    assert payloads.send_request("a")[0] != payloads.send_request("a")[0]


def test_report_passes_a_clean_run(tmp_path: Path) -> None:
    rows = report.read_stats(
        stats_csv(
            tmp_path,
            [
                row("kafka", "produce", 2000, 0, 99.1),
                row("e2e", "result", 2000, 0, 98.0),
                row("POST", "/webhooks/sinch delivery report", 200, 0, 10.0),
                row("", "Aggregated", 4200, 0, 207.1),
            ],
        )
    )
    assert report.problems(rows, target_rate=100) == []
    assert rows[("e2e", "result")].percentiles_ms["99%"] == 10.0
    table = report.table(rows)
    assert "| e2e | result | 2000 | 98.0 | 0 |" in table
    assert "Aggregated" not in table


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        (
            [row("kafka", "produce", 1500, 0, 75.0), row("e2e", "result", 1500, 0, 75.0)],
            "target 100/s",
        ),
        (
            [row("kafka", "produce", 2000, 0, 100.0), row("e2e", "result", 1990, 0, 99.0)],
            "2000 published but 1990 results",
        ),
        (
            [row("kafka", "produce", 2000, 0, 100.0), row("e2e", "result", 2000, 3, 100.0)],
            "3 failures in e2e result",
        ),
        (
            [
                row("kafka", "produce", 2000, 0, 100.0),
                row("e2e", "result", 2000, 0, 100.0),
                row("POST", "/webhooks/sinch delivery report", 100, 1, 5.0),
            ],
            "1 failures in POST /webhooks/sinch delivery report",
        ),
        ([row("kafka", "produce", 2000, 0, 100.0)], "missing rows"),
    ],
)
def test_report_fails_a_bad_run(tmp_path: Path, rows: list[str], needle: str) -> None:
    found = report.problems(report.read_stats(stats_csv(tmp_path, rows)), target_rate=100)
    assert any(needle in problem for problem in found), found


def run_flags(values: dict[str, object]) -> list[str]:
    return [str(part) for pair in values.items() for part in pair]


def require_locust() -> None:
    for module in ("locust", "confluent_kafka"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: pip install -e '.[dev]'")
    if shutil.which("locust", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("the locust command is missing: pip install -e '.[dev]'")


@pytest.mark.timeout(60)
def test_smoke_run_against_the_demo_stack(tmp_path: Path) -> None:
    """3 s at 20 requests/s over 2 apps and 4 callbacks/s: rate reached, zero failures."""
    require_locust()
    reports = tmp_path / "reports"
    argv = [sys.executable, str(LOADTESTS / "run.py"), *run_flags({
        "--duration": 3, "--rate": 20, "--apps": 2, "--send-users": 2, "--webhook-rate": 4,
        "--result-timeout": 15, "--reports": reports,
    })]  # fmt: skip
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=50)
        except subprocess.TimeoutExpired:
            proc.terminate()  # run.py stops its broker, simulator and gateway on SIGTERM
            stdout, stderr = proc.communicate(timeout=40)
            pytest.fail("no result in 50 s:\n" + stdout[-3000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "result: PASS" in stdout
    for name in ("report.html", "locust_stats.csv", "locust_failures.csv", "summary.md"):
        assert (reports / name).is_file(), name
    rows = report.read_stats(reports / "locust_stats.csv")
    produce, e2e = rows[("kafka", "produce")], rows[("e2e", "result")]
    assert produce.count >= 40
    assert e2e.count == produce.count
    assert e2e.failures == 0
    assert e2e.percentiles_ms["99%"] > 0
    webhook = [r for (kind, _), r in rows.items() if kind == "POST"]
    assert sum(r.count for r in webhook) >= 6
    assert sum(r.failures for r in webhook) == 0
    assert "Locust" in (reports / "report.html").read_text()[:20000]
