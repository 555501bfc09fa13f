"""The producer examples: their sample records pass the schema and the gateway's decoder."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator

from gateway import client
from gateway.envelope import decode

KCAT = Path(__file__).resolve().parent.parent / "examples" / "kcat"
LINES = [line for line in (KCAT / "requests.jsonl").read_bytes().splitlines() if line.strip()]


@pytest.mark.parametrize("line", LINES, ids=[f"line-{n}" for n in range(1, len(LINES) + 1)])
def test_each_sample_record_passes_the_schema_and_the_decoder(line: bytes) -> None:
    doc = orjson.loads(line)
    validator = Draft202012Validator(client.schema("send-request"))
    assert validator.is_valid(doc), list(validator.iter_errors(doc))
    assert decode(line, max_bytes=client.MAX_MESSAGE_BYTES).app_id == doc["payload"]["app_id"]


def test_the_samples_cover_the_optional_members() -> None:
    docs = [orjson.loads(line) for line in LINES]
    assert len(docs) >= 3
    members = set().union(*docs)
    assert {"campaign", "priority", "expire_at", "region", "envelope_version"} <= members
    recipients = {next(iter(d["payload"]["recipient"])) for d in docs}
    assert recipients == {"identified_by", "contact_id"}


def test_the_script_is_valid_bash_and_finds_the_schema() -> None:
    script = KCAT / "publish.sh"
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run([bash, "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    assert "$here/../../schemas/send-request.schema.json" in text
    assert (KCAT / ".." / ".." / "schemas" / "send-request.schema.json").resolve().is_file()
    assert "gateway validate --quiet" in text
