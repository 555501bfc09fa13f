"""``gateway <command> --help``: every option shows its default; ``run`` names its configuration."""

from __future__ import annotations

import argparse
import re
import sys

import pytest

from gateway.cli import build_parser, main
from gateway.settings import Settings

COMMANDS = ("run", "send", "demo", "simulate")


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """argparse wraps at $COLUMNS: wide enough that no default is cut in two."""
    monkeypatch.setenv("COLUMNS", "240")


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = sub.choices[name]
    return found


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def option_help(text: str, flag: str) -> str:
    """The help of one option, its wrapped lines joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\s+{flag}\b", line))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 10) or line.strip().startswith("-"):
            break
        block.append(line)
    return " ".join(part.strip() for part in block)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_with_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(command, capsys)
    options = [
        a
        for a in subparser(command)._actions
        if a.option_strings and a.help != argparse.SUPPRESS and "-h" not in a.option_strings
    ]
    assert options
    for action in options:
        flag = action.option_strings[-1]
        shown = option_help(text, flag)
        assert re.search(r"\(default: [^)]+\)", shown), f"{command} {flag}: {shown!r}"
        # more than the default: what the option is
        assert re.sub(r"\(default: [^)]*\)", "", action.help or "").strip(), f"{command} {flag}"


@pytest.mark.parametrize(
    ("command", "flag", "default"),
    [
        ("send", "--count", "10"),
        ("send", "--priority", "normal"),
        ("send", "--apps", "demo-app-1"),
        ("demo", "--messages", "600"),
        ("demo", "--project-rate", "800.0"),
        ("simulate", "--default-region", "us"),
        ("simulate", "--app-rate", "20.0"),
    ],
)
def test_defaults_shown_are_the_real_ones(
    command: str, flag: str, default: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = option_help(help_text(command, capsys), flag)
    assert f"(default: {default})" in shown


def test_run_help_names_the_environment_and_the_config_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = help_text("run", capsys)
    assert "GATEWAY_CONFIG" in text
    assert "TOML file" in text
    assert "GATEWAY_*" in text
    assert "_FILE" in text
    # every setting's variable, with its default
    assert "GATEWAY_APP_RATE (20.0)" in text
    assert "GATEWAY_WEBHOOK_NONCE_CACHE_SIZE (100000)" in text
    assert "GATEWAY_KEY_SECRET (unset)" in text
    for name in Settings.__dataclass_fields__:
        assert f"GATEWAY_{name.upper()} (" in text, name
    assert "(default: the file named by $GATEWAY_CONFIG, else none)" in option_help(
        text, "--config"
    )


def test_event_loop_auto_takes_uvloop_when_installed_and_asyncio_when_asked() -> None:
    import uvloop

    from gateway.cli import loop_factory

    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None


def test_event_loop_uvloop_without_uvloop_stops_startup_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.cli import loop_factory
    from gateway.errors import ConfigError

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match="event_loop"):
        loop_factory("uvloop")
