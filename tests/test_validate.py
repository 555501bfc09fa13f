"""``gateway validate``: the gateway's own decoder over a file or standard input."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from gateway.cli import main
from gateway.settings import Settings
from gateway.validate import records
from tests.test_envelope import GOOD, MALFORMED

VALID = orjson.dumps(GOOD)


def run(
    args: list[str], capsys: pytest.CaptureFixture[str], stdin: bytes | None = None
) -> tuple[int, list[str]]:
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        code = main(["validate", *args])
    finally:
        sys.stdin = sys.__stdin__
    return code, capsys.readouterr().out.splitlines()


def test_each_line_is_ok_or_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_priority = orjson.dumps({**GOOD, "priority": "urgent"})
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\n".join([VALID, b"", b"not json", bad_priority, VALID + b"\r", b""]))
    code, out = run([str(path)], capsys)
    assert code == 1
    assert out == [
        "line 1: ok",
        "line 3: invalid_json: value is not a JSON document",
        "line 4: bad_field: priority must be one of high, normal, low",
        "line 5: ok",
        "4 records: 2 valid, 2 invalid",
    ]


def test_all_valid_exits_0_and_quiet_prints_only_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\n".join([VALID] * 3) + b"\n")
    assert run([str(path)], capsys) == (
        0,
        ["line 1: ok", "line 2: ok", "line 3: ok", "3 records: 3 valid, 0 invalid"],
    )
    assert run(["--quiet", str(path)], capsys) == (0, ["3 records: 3 valid, 0 invalid"])


def test_quiet_prints_the_bad_ones(capsys: pytest.CaptureFixture[str]) -> None:
    data = b"\n".join([VALID, b"[1, 2]", VALID])
    code, out = run(["--quiet", "-"], capsys, stdin=data)
    assert (code, out) == (
        1,
        ["line 2: bad_field: envelope must be a JSON object", "3 records: 2 valid, 1 invalid"],
    )


def test_one_pretty_printed_document_is_one_record(capsys: pytest.CaptureFixture[str]) -> None:
    pretty = b"\n\n" + orjson.dumps(GOOD, option=orjson.OPT_INDENT_2) + b"\n"
    assert pretty.count(b"\n") > 5
    assert run(["-"], capsys, stdin=pretty) == (0, ["line 3: ok", "1 record: 1 valid, 0 invalid"])
    broken = pretty.replace(b'"payload"', b'"payload" oops')
    code, out = run(["--quiet", "-"], capsys, stdin=broken)
    assert code == 1  # not one document: judged line by line, every line bad
    assert out[-1].endswith("0 valid, " + out[-1].split()[0] + " invalid")


def test_the_size_limit_is_the_gateways_unless_given(capsys: pytest.CaptureFixture[str]) -> None:
    assert Settings().max_message_bytes == 1024 * 1024
    big = orjson.dumps({**GOOD, "filler": "x" * (1024 * 1024)})
    code, out = run(["-"], capsys, stdin=big)
    assert code == 1
    assert out[0] == f"line 1: too_large: {len(big)} bytes > {1024 * 1024}"
    assert run(["--max-bytes", str(len(big)), "-"], capsys, stdin=big)[0] == 0
    assert run(["--max-bytes", str(len(VALID) - 1), "-"], capsys, stdin=VALID)[0] == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [(v, r) for v, r in MALFORMED if v is not None and b"\n" not in v],
)
def test_the_malformed_corpus_is_reported_with_the_decoders_reason(
    value: bytes, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(["--max-bytes", "1000", "-"], capsys, stdin=value)
    assert code == 1
    assert out[0].startswith(f"line 1: {reason}: ")


def test_no_records_and_unreadable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["-"], capsys, stdin=b"\n  \n") == (1, ["no records"])
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["validate", "--max-bytes", "0", "-"])
    assert exited.value.code == 2


def test_records_keep_line_numbers_and_strip_whitespace() -> None:
    assert list(records(b"  {}  \r\n\n[1]\n")) == [(1, b"{}"), (3, b"[1]")]
    assert list(records(b'{\n"a": 1\n}\n')) == [(1, b'{\n"a": 1\n}')]


def test_the_installed_command_reads_standard_input() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "validate", "--quiet", "-"],
        input=VALID + b"\n" + VALID,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (0, b"2 records: 2 valid, 0 invalid\n")
