"""``gateway admin ...``: the admin API from a terminal.

``gateway admin lanes`` (a table), ``pause APP [--reason]``, ``resume APP``,
``rate APP RATE [--for SECONDS]``, ``rate APP --clear``, ``drop --app APP |
--campaign NAME [--for SECONDS]``. The token comes from ``--token-file``, else
``GATEWAY_ADMIN_TOKEN`` (or the file ``GATEWAY_ADMIN_TOKEN_FILE`` names); the
gateway from ``--url`` (default ``http://127.0.0.1:$GATEWAY_HTTP_PORT``, 8080).

Exit codes: 0 done; 1 refused (bad input, unknown path, the gateway starting or
its Redis down); 2 no token; 3 wrong token (401); 4 admin API off (no
``admin_token`` on the gateway); 5 gateway unreachable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

EXIT_REFUSED, EXIT_NO_TOKEN, EXIT_UNAUTHORIZED, EXIT_OFF, EXIT_UNREACHABLE = 1, 2, 3, 4, 5


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("admin", help="look at the lanes and act on them (the admin API)")
    port = os.environ.get("GATEWAY_HTTP_PORT", "8080")
    p.add_argument("--url", default=f"http://127.0.0.1:{port}", help="the gateway's HTTP port")
    p.add_argument("--token-file", help="file holding admin_token (else GATEWAY_ADMIN_TOKEN)")
    p.add_argument("--user", default=None, help="who acts, for the gateway's log (default $USER)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    acts = p.add_subparsers(dest="action", required=True)
    lanes = acts.add_parser("lanes", help="every app's lane: rate, queued, paused, campaigns")
    lanes.add_argument("--json", action="store_true", help="the API's JSON answer as it is")
    pause = acts.add_parser("pause", help="stop an app's sends (its queued records stay)")
    pause.add_argument("app")
    pause.add_argument("--reason", default="")
    resume = acts.add_parser("resume", help="let a paused app send again")
    resume.add_argument("app")
    rate = acts.add_parser("rate", help="set an app's rate (requests/s) or --clear it")
    rate.add_argument("app")
    rate.add_argument("rate", nargs="?", type=float)
    rate.add_argument("--for", dest="for_s", type=float, help="seconds (default: until cleared)")
    rate.add_argument("--clear", action="store_true", help="back to the configured/Sinch rate")
    drop = acts.add_parser("drop", help="cancel the queued requests of an app and/or campaign")
    drop.add_argument("--app")
    drop.add_argument("--campaign")
    drop.add_argument(
        "--for", dest="for_s", type=float, help="also cancel matching records read for SECONDS"
    )
    p.set_defaults(handler=run)


def read_token(token_file: str | None, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    path = token_file or env.get("GATEWAY_ADMIN_TOKEN_FILE")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read the token file {path}: {exc.strerror}", 2) from exc
    else:
        token = env.get("GATEWAY_ADMIN_TOKEN", "").strip()
    if not token:
        raise CliError(
            "no admin token: give --token-file, or set GATEWAY_ADMIN_TOKEN", EXIT_NO_TOKEN
        )
    return token


def request_for(ns: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, body) of the call ``ns`` asks for."""
    action = ns.action
    if action == "lanes":
        return "GET", "/admin/lanes", None
    if action in ("pause", "resume", "rate"):
        app = ns.app.replace("/", "%2F")
        if action == "pause":
            return "POST", f"/admin/apps/{app}/pause", {"reason": ns.reason}
        if action == "resume":
            return "POST", f"/admin/apps/{app}/resume", None
        if ns.clear:
            if ns.rate is not None or ns.for_s is not None:
                raise CliError("rate: --clear takes no RATE or --for", EXIT_REFUSED)
            return "DELETE", f"/admin/apps/{app}/rate", None
        if ns.rate is None:
            raise CliError("rate: give RATE (requests per second) or --clear", EXIT_REFUSED)
        body: dict[str, Any] = {"rate": ns.rate}
        if ns.for_s is not None:
            body["for_s"] = ns.for_s
        return "PUT", f"/admin/apps/{app}/rate", body
    if not ns.app and not ns.campaign:
        raise CliError("drop: give --app, --campaign or both", EXIT_REFUSED)
    body = {k: v for k, v in (("app_id", ns.app), ("campaign", ns.campaign)) if v}
    if ns.for_s is not None:
        body["for_s"] = ns.for_s
    return "POST", "/admin/drop", body


async def call(
    url: str, method: str, path: str, body: Any, *, token: str, user: str, timeout: float
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}", "X-Admin-User": user}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
            http.request(method, url.rstrip("/") + path, json=body, headers=headers) as resp,
        ):
            raw = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(
            f"the gateway at {url} is unreachable ({type(exc).__name__})", EXIT_UNREACHABLE
        ) from exc
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = {"error": raw[:200].decode(errors="replace")}
    if not isinstance(doc, dict):
        doc = {"error": str(doc)[:200]}
    if status == 401:
        raise CliError("refused: the admin token is wrong (401)", EXIT_UNAUTHORIZED)
    if status == 404 and "admin API is off" in str(doc.get("error", "")):
        raise CliError("the admin API is off on this gateway (admin_token is not set)", EXIT_OFF)
    if status != 200:
        raise CliError(f"refused ({status}): {doc.get('error', '')}", EXIT_REFUSED)
    return doc


def _rate_cell(rate: dict[str, Any], now: float) -> tuple[str, str]:
    source = str(rate.get("source", "?"))
    if source == "admin" and rate.get("until") is not None:
        source = f"admin {max(0, round(rate['until'] - now))}s left"
    return f"{rate.get('in_force', 0):g}", source


def _paused_cell(why: list[dict[str, Any]]) -> str:
    parts = []
    for w in why:
        if w.get("by") == "admin":
            parts.append(f"admin ({w.get('who')}): {w.get('reason', '')}")
        else:
            parts.append(f"{w.get('by')}: {w.get('reason', '')} {w.get('for_s', '')}s")
    return "; ".join(parts) or "-"


def lanes_table(doc: dict[str, Any], now: float | None = None) -> str:
    """``GET /admin/lanes`` as a text table (and the drop rules in force)."""
    now = time.time() if now is None else now
    head = ["APP", "PROJECT", "RATE/S", "SOURCE", "QUEUED", "H/N/L", "RETRIES"]
    head += ["SPILLED", "IN FLIGHT", "PAUSED", "CAMPAIGNS"]
    rows = [head]
    for lane in doc.get("lanes", []):
        q = lane.get("queued", {})
        rate, source = _rate_cell(lane.get("rate", {}), now)
        campaigns = lane.get("campaigns", {})
        shown = " ".join(f"{k}={v}" for k, v in list(campaigns.items())[:3])
        if len(campaigns) > 3:
            shown += f" (+{len(campaigns) - 3})"
        rows.append(
            [
                str(lane.get("app_id")),
                str(lane.get("project") or "-"),
                rate,
                source,
                str(q.get("total", 0)),
                f"{q.get('high', 0)}/{q.get('normal', 0)}/{q.get('low', 0)}",
                str(q.get("retries", 0)),
                str(lane["spilled"]) if "spilled" in lane else "-",
                str(lane.get("in_flight", 0)),
                _paused_cell(lane.get("paused_why", [])),
                shown or "-",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append("(no lanes)")
    lines.append(f"scope: {doc.get('scope', '?')}")
    for rule in doc.get("drops", []):
        what = " ".join(f"{k}={rule[k]}" for k in ("app_id", "campaign") if rule.get(k))
        until = rule.get("until")
        lasting = f"until {max(0, round(until - now))}s from now" if until else "queued only"
        lines.append(f"drop rule {rule.get('id')}: {what} by {rule.get('by')}, {lasting}")
    return "\n".join(lines)


def summary(action: str, doc: dict[str, Any]) -> str:
    scope = doc.get("scope", "?")
    if action == "drop":
        return (
            f"{doc.get('cancelled', 0)} waiting requests cancelled on this replica "
            f"(scope {scope}); {doc.get('note', '')}"
        )
    return f"{action}: done (scope {scope})"


async def run(ns: argparse.Namespace) -> int:
    try:
        token = read_token(ns.token_file)
        method, path, body = request_for(ns)
        user = ns.user or os.environ.get("USER") or "unknown"
        doc = await call(ns.url, method, path, body, token=token, user=user, timeout=ns.timeout)
    except CliError as exc:
        print(f"gateway admin: {exc}", file=sys.stderr)
        return exc.code
    if ns.action == "lanes":
        print(orjson.dumps(doc).decode() if ns.json else lanes_table(doc))
    else:
        print(summary(ns.action, doc))
    return 0
