"""gateway/logs.py: one JSON object per line, context fields, text format, no secrets."""

from __future__ import annotations

import asyncio
import base64
import logging
import sys
from collections.abc import Iterator

import orjson
import pytest

from gateway import logs
from gateway.settings import load

log = logging.getLogger("gateway.test")


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    return log.makeRecord(log.name, logging.INFO, __file__, 1, msg, args, None, extra=extra)


def fail(msg: str) -> None:
    raise ValueError(msg)


def with_exc(msg: str) -> logging.LogRecord:
    try:
        fail(msg)
    except ValueError:
        return log.makeRecord(log.name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    raise AssertionError("unreachable")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored after the test (setup() replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    kafka_level = logging.getLogger("aiokafka").level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(kafka_level)


def test_json_line_has_the_fields_and_extra_context() -> None:
    line = logs.JsonFormatter().format(
        record("partition %d offset %d rejected", 2, 17, partition=2, offset=17)
    )
    assert "\n" not in line
    doc = orjson.loads(line)
    assert doc["level"] == "info"
    assert doc["logger"] == "gateway.test"
    assert doc["msg"] == "partition 2 offset 17 rejected"
    assert doc["partition"] == 2
    assert doc["offset"] == 17
    assert doc["ts"].endswith("Z")
    assert "request_id" not in doc


def test_context_adds_request_id_inside_the_block_only() -> None:
    fmt = logs.JsonFormatter()
    with logs.context(request_id="r-1", app_id="app-a"):
        inside = orjson.loads(fmt.format(record("sending")))
        with logs.context(request_id="r-2"):
            nested = orjson.loads(fmt.format(record("retry")))
    outside = orjson.loads(fmt.format(record("idle")))
    assert (inside["request_id"], inside["app_id"]) == ("r-1", "app-a")
    assert (nested["request_id"], nested["app_id"]) == ("r-2", "app-a")
    assert "request_id" not in outside
    assert "app_id" not in outside


async def test_context_follows_each_task_separately() -> None:
    fmt = logs.JsonFormatter()
    seen: dict[str, str] = {}
    gate = asyncio.Event()

    async def send(rid: str) -> None:
        with logs.context(request_id=rid):
            await gate.wait()  # both tasks are inside their blocks at once
            seen[rid] = orjson.loads(fmt.format(record("sent")))["request_id"]

    tasks = [asyncio.create_task(send(rid)) for rid in ("a", "b")]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    assert seen == {"a": "a", "b": "b"}


def test_exception_stays_on_the_same_line() -> None:
    line = logs.JsonFormatter().format(with_exc("bad thing"))
    assert "\n" not in line
    doc = orjson.loads(line)
    assert "ValueError: bad thing" in doc["exc"]
    assert doc["level"] == "error"


def test_text_format_is_for_humans_and_shows_the_context() -> None:
    with logs.context(request_id="r-9"):
        line = logs.TextFormatter().format(record("request failed: %s", "http_400"))
    assert not line.startswith("{")
    assert "INFO" in line
    assert "gateway.test: request failed: http_400" in line
    assert line.endswith("request_id=r-9")


def test_protected_secrets_never_appear_in_either_format() -> None:
    settings = load(
        env={},
        kafka_bootstrap="127.0.0.1:1",
        project_id="p",
        key_id="kid",
        key_secret="s3cr3t-value-for-logs",
        webhook_secret="hook-s3cr3t-xyz",
    )
    logs.protect_secrets(settings)
    leaky = record("auth failed with %s / %s", settings.key_secret.reveal(), "hook-s3cr3t-xyz")
    for formatter in (logs.JsonFormatter(), logs.TextFormatter()):
        line = formatter.format(leaky)
        assert "s3cr3t" not in line
        assert logs.MASK in line
    exc_line = logs.JsonFormatter().format(with_exc("token s3cr3t-value-for-logs refused"))
    assert "s3cr3t" not in exc_line


def test_credentials_are_masked_but_ordinary_words_are_not() -> None:
    basic = base64.b64encode(b"key-id:key-secret").decode()
    text = logs.scrub(
        f"Basic auth in use; Authorization: Basic {basic}; Bearer eyJhbGciOiJIUzI1NiJ9.abc.def; "
        '{"access_token": "tok-123", "expires_in": 3600}; password=hunter2'
    )
    assert "Basic auth in use" in text
    assert basic not in text
    assert "eyJhbGciOiJIUzI1NiJ9" not in text
    assert "tok-123" not in text
    assert "hunter2" not in text
    assert '"expires_in": 3600' in text


def test_setup_sets_the_level_and_format_once(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup("WARNING", "json")
    logs.setup("WARNING", "json")  # idempotent: still one handler
    assert len(root_logger.handlers) == 1
    assert root_logger.level == logging.WARNING
    logging.getLogger("gateway.x").info("not shown")
    logging.getLogger("gateway.x").warning("shown %d", 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert [orjson.loads(line)["msg"] for line in err] == ["shown 1"]
    logs.setup("DEBUG", "text")
    assert isinstance(root_logger.handlers[0].formatter, logs.TextFormatter)
    assert logging.getLogger("aiokafka").level == logging.WARNING
