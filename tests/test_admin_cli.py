"""``gateway admin``: the table, the calls it makes, its errors and exit codes.

The calls go to a real in-process admin API (:class:`AdminApi` on the lanes of a
:class:`Lanes` with real buckets), not to a mock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import admin_cli
from gateway.admin import start_site
from gateway.admin_api import AdminApi, describe_lanes
from gateway.cli import build_parser
from gateway.controls import Controls, LaneTarget, LocalStore
from gateway.envelope import Request
from gateway.lanes import Lane, Lanes
from gateway.limiter import Bucket
from gateway.metrics import Metrics
from gateway.settings import Secret
from tests.test_lanes import request

TOKEN = "cli-test-token"

DOC: dict[str, Any] = {
    "scope": "group",
    "lanes": [
        {
            "app_id": "app-1",
            "project": None,
            "rate": {"in_force": 5.0, "source": "admin", "until": 1540.0, "by": "alice"},
            "queued": {"high": 1, "normal": 20, "low": 0, "retries": 2, "total": 23},
            "spilled": 400,
            "in_flight": 3,
            "paused": True,
            "paused_why": [{"by": "admin", "reason": "throttled", "who": "alice", "at": 1.0}],
            "campaigns": {"spring": 15, "autumn": 3, "a": 1, "b": 1},
        },
        {
            "app_id": "app-2",
            "project": "other",
            "rate": {"in_force": 20.0, "source": "sinch"},
            "queued": {"high": 0, "normal": 0, "low": 0, "retries": 0, "total": 0},
            "in_flight": 0,
            "paused": False,
            "paused_why": [],
            "campaigns": {},
        },
    ],
    "drops": [{"id": "abc", "app_id": None, "campaign": "spring", "until": 1100.0, "by": "bob"}],
}


def test_the_lanes_table() -> None:
    lines = admin_cli.lanes_table(DOC, now=1000.0).splitlines()
    assert lines[0].split() == [
        "APP",
        "PROJECT",
        "RATE/S",
        "SOURCE",
        "QUEUED",
        "H/N/L",
        "RETRIES",
        "SPILLED",
        "IN",
        "FLIGHT",
        "PAUSED",
        "CAMPAIGNS",
    ]
    one, two = lines[1], lines[2]
    assert one.startswith("app-1")
    for cell in ("admin 540s left", "23", "1/20/0", "400", "admin (alice): throttled"):
        assert cell in one
    assert "spring=15 autumn=3 a=1 (+1)" in one
    assert two.split()[:4] == ["app-2", "other", "20", "sinch"]
    assert two.split()[7] == "-"  # spilled: none known
    assert lines[3] == "scope: group"
    assert lines[4] == "drop rule abc: campaign=spring by bob, until 100s from now"
    # columns line up
    assert one.index("5") == lines[0].index("RATE/S")


def test_an_empty_table_says_so() -> None:
    assert "(no lanes)" in admin_cli.lanes_table({"scope": "local", "lanes": []})


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["lanes"], ("GET", "/admin/lanes", None)),
        (["pause", "a1", "--reason", "x"], ("POST", "/admin/apps/a1/pause", {"reason": "x"})),
        (["resume", "a1"], ("POST", "/admin/apps/a1/resume", None)),
        (["rate", "a1", "5"], ("PUT", "/admin/apps/a1/rate", {"rate": 5.0})),
        (
            ["rate", "a1", "5", "--for", "600"],
            ("PUT", "/admin/apps/a1/rate", {"rate": 5.0, "for_s": 600.0}),
        ),
        (["rate", "a1", "--clear"], ("DELETE", "/admin/apps/a1/rate", None)),
        (["drop", "--campaign", "c"], ("POST", "/admin/drop", {"campaign": "c"})),
        (
            ["drop", "--app", "a1", "--campaign", "c", "--for", "60"],
            ("POST", "/admin/drop", {"app_id": "a1", "campaign": "c", "for_s": 60.0}),
        ),
    ],
)
def test_each_command_makes_its_call(argv: list[str], expected: tuple[Any, ...]) -> None:
    ns = build_parser().parse_args(["admin", *argv])
    assert admin_cli.request_for(ns) == expected


@pytest.mark.parametrize(
    "argv", [["rate", "a1"], ["rate", "a1", "5", "--clear"], ["drop"], ["drop", "--for", "5"]]
)
def test_incomplete_commands_are_refused(argv: list[str]) -> None:
    ns = build_parser().parse_args(["admin", *argv])
    with pytest.raises(admin_cli.CliError) as info:
        admin_cli.request_for(ns)
    assert info.value.code == admin_cli.EXIT_REFUSED


def test_the_token_comes_from_the_file_then_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert admin_cli.read_token(str(path), env={"GATEWAY_ADMIN_TOKEN": "other"}) == TOKEN
    assert admin_cli.read_token(None, env={"GATEWAY_ADMIN_TOKEN": "other"}) == "other"
    assert admin_cli.read_token(None, env={"GATEWAY_ADMIN_TOKEN_FILE": str(path)}) == TOKEN
    with pytest.raises(admin_cli.CliError) as info:
        admin_cli.read_token(None, env={})
    assert info.value.code == admin_cli.EXIT_NO_TOKEN
    with pytest.raises(admin_cli.CliError, match="cannot read"):
        admin_cli.read_token(str(tmp_path / "missing"), env={})


class Gateway:
    """An admin API on real lanes (a slow app bucket: what is queued stays queued)."""

    def __init__(self, token: str | None) -> None:
        clock = asyncio.get_running_loop().time
        self.sent: list[Request] = []
        self.cancelled: list[Request] = []
        self.lanes = Lanes(
            project_bucket=Bucket("project", 1000, clock=clock),
            make_app_bucket=lambda app, _p: Bucket(f"app:{app}", 0.01, clock=clock),
            channel_buckets={},
            max_in_flight=10,
            sender=self.send,
            clock=clock,
        )
        self.lanes.on_cancel = lambda req, _why: self.cancelled.append(req)
        self.controls = Controls(LocalStore(), LaneTarget(self.lanes, lambda _app: None))
        self.lanes.screen = self.controls.screen
        self.api = AdminApi(Secret(token) if token else None, Metrics(CollectorRegistry()))
        self.api.attach(self.controls, self.describe)

    async def send(self, req: Request, _lane: Lane) -> None:
        self.sent.append(req)

    def describe(self) -> list[dict[str, Any]]:
        loop_now = asyncio.get_running_loop().time()
        return describe_lanes(
            self.lanes,
            self.controls,
            rate_of=lambda _app, _project: (0.01, "configured"),
            spilled=None,
            now=loop_now,
            wall=0.0,
        )


@pytest.fixture
async def served() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []
    gateways: list[Gateway] = []

    async def serve(token: str | None) -> tuple[Gateway, str]:
        gw = Gateway(token)
        app = web.Application()
        gw.api.add_routes(app)
        runner, port = await start_site(app, "127.0.0.1", 0)
        runners.append(runner)
        gateways.append(gw)
        return gw, f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()
    for gw in gateways:
        await gw.lanes.close()


async def cli(url: str, *argv: str, token: str = TOKEN) -> int:
    ns = build_parser().parse_args(["admin", "--url", url, "--user", "carol", *argv])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GATEWAY_ADMIN_TOKEN", token)
        mp.delenv("GATEWAY_ADMIN_TOKEN_FILE", raising=False)
        return int(await ns.handler(ns))


async def test_commands_act_on_the_lanes(served: Any, capsys: pytest.CaptureFixture[str]) -> None:
    gw, url = await served(TOKEN)
    for i, campaign in enumerate(["spring", "spring", None, "spring"]):
        req = request("app-1", i)
        req.campaign = campaign
        gw.lanes.put(req)
    assert await cli(url, "pause", "app-1", "--reason", "throttled") == 0
    assert gw.lanes.holds == {"app-1": "throttled"}
    assert await cli(url, "rate", "app-1", "5", "--for", "60") == 0
    override = gw.controls.rate_override("app-1")
    assert override is not None
    assert override.by == "carol"
    capsys.readouterr()
    assert await cli(url, "lanes") == 0
    table = capsys.readouterr().out
    assert "admin (carol): throttled" in table
    assert "scope: local" in table
    assert await cli(url, "drop", "--campaign", "spring") == 0
    out = capsys.readouterr().out
    # the first went at once; the second waits for its slot (counted), the fourth is queued
    assert out.startswith("2 waiting requests cancelled")
    assert "not covered" in out
    assert await cli(url, "resume", "app-1") == 0
    assert await cli(url, "rate", "app-1", "--clear") == 0
    assert gw.controls.rate_override("app-1") is None
    assert gw.lanes.holds == {}


async def test_errors_have_their_exit_codes(
    served: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = await served(TOKEN)
    _, off_url = await served(None)
    assert await cli(url, "lanes", token="wrong") == admin_cli.EXIT_UNAUTHORIZED
    assert "401" in capsys.readouterr().err
    assert await cli(off_url, "lanes") == admin_cli.EXIT_OFF
    assert "off" in capsys.readouterr().err
    assert await cli(url, "rate", "a1", "-5") == admin_cli.EXIT_REFUSED
    assert "rate" in capsys.readouterr().err
    dead = url.rsplit(":", 1)[0] + ":9"
    assert await cli(dead, "lanes") == admin_cli.EXIT_UNREACHABLE
    assert "unreachable" in capsys.readouterr().err
