from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from gateway.errors import ConfigError
from gateway.settings import ConfigProblems, Secret, is_service_link, load


def test_env_overrides_toml_and_apps_come_from_the_file(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        'project_id = "p1"\napp_rate = 25\nregion = "eu"\n'
        '[apps.vip]\nrate = 100\nregion = "br"\n[channel_rates]\nwhatsapp = 80\n'
    )
    s = load(cfg, env={"GATEWAY_APP_RATE": "30", "GATEWAY_PROJECT_RATE": "400"})
    assert s.project_id == "p1"
    assert s.app_rate == 30.0
    assert s.project_rate == 400.0
    assert s.app_rate_for("vip") == 100.0
    assert s.app_rate_for("other") == 30.0
    assert s.app_region("vip") == "br"
    assert s.app_region("other") == "eu"
    assert s.channel_rates == {"WHATSAPP": 80.0}


@pytest.mark.parametrize(
    ("env", "var"),
    [
        ({"GATEWAY_APP_RATE": "fast"}, "GATEWAY_APP_RATE"),
        ({"GATEWAY_APP_RATE": "-1"}, "GATEWAY_APP_RATE"),
        ({"GATEWAY_REGION": "mars"}, "GATEWAY_REGION"),
        ({"GATEWAY_HTTP_PORT": "70000"}, "GATEWAY_HTTP_PORT"),
        ({"GATEWAY_CREATE_TOPICS": "maybe"}, "GATEWAY_CREATE_TOPICS"),
        ({"GATEWAY_AUTH_URL": "ftp://x"}, "GATEWAY_AUTH_URL"),
        ({"GATEWAY_WEBHOOK_NONCE_CACHE_SIZE": "0"}, "GATEWAY_WEBHOOK_NONCE_CACHE_SIZE"),
        ({"GATEWAY_CHANNEL_RATES": "SMS"}, "GATEWAY_CHANNEL_RATES"),
    ],
)
def test_bad_values_name_the_key_and_the_variable(env, var):
    with pytest.raises(ConfigProblems) as info:
        load(env=env)
    (problem,) = info.value.problems
    key = var.removeprefix("GATEWAY_").lower()
    assert problem.key == key
    assert problem.var == var
    assert str(problem).startswith(f"{var} ({key}): expected ")
    assert str(info.value) == str(problem)


def test_one_load_lists_every_problem_with_its_variable(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text("app_raet = 20\nproject_rate = 0\n[apps.a1]\nburst = 0.5\n")
    env = {
        "GATEWAY_CONFIG": str(cfg),
        "GATEWAY_APP_RATE": "fast",
        "GATEWAY_REGION": "mars",
        "GATEWAY_HTTP_PORT": "70000",
        "GATEWAY_KEY_SECRET_FILE": str(tmp_path / "absent"),
    }
    with pytest.raises(ConfigProblems) as info:
        load(env=env, require_credentials=True)
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.problems)
    assert sorted(lines) == sorted(
        [
            f"app_raet, from {cfg}: expected a known setting, got 'app_raet'",
            f"GATEWAY_PROJECT_RATE (project_rate, from {cfg}): "
            "expected a number greater than 0, got 0.0",
            f"GATEWAY_APPS (apps.a1.burst, from {cfg}): expected a number >= 1, got 0.5",
            "GATEWAY_APP_RATE (app_rate): expected a number, got 'fast'",
            "GATEWAY_REGION (region): expected one of us, eu, br, got 'mars'",
            "GATEWAY_HTTP_PORT (http_port): expected a TCP port 0-65535, got 70000",
            "GATEWAY_KEY_SECRET_FILE (key_secret): expected a readable file "
            f"(No such file or directory), got '{tmp_path / 'absent'}'",
            "GATEWAY_PROJECT_ID (project_id): missing (a non-empty value)",
            "GATEWAY_KEY_ID (key_id): missing (a non-empty value)",
            "GATEWAY_KEY_SECRET (key_secret): missing "
            "(a non-empty value, or a file named by GATEWAY_KEY_SECRET_FILE)",
        ]
    )


def test_empty_environment_reports_every_credential_in_one_error():
    with pytest.raises(ConfigProblems) as info:
        load(env={}, require_credentials=True)
    assert [(p.key, p.var) for p in info.value.problems] == [
        ("project_id", "GATEWAY_PROJECT_ID"),
        ("key_id", "GATEWAY_KEY_ID"),
        ("key_secret", "GATEWAY_KEY_SECRET"),
    ]
    # the same from a loaded Settings (what the composition root checks)
    with pytest.raises(ConfigProblems) as again:
        load(env={}).require_credentials()
    assert [str(p) for p in again.value.problems] == [str(p) for p in info.value.problems]
    # the aggregate is still a ConfigError naming its first key
    assert isinstance(info.value, ConfigError)
    assert info.value.key == "project_id"


def test_secret_values_are_never_in_a_problem(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text("key_secret = 12345678\n")
    with pytest.raises(ConfigProblems) as info:
        load(cfg, env={"GATEWAY_WEBHOOK_SECRET": "hunter2-webhook", "GATEWAY_APP_RATE": "x"})
    text = str(info.value)
    assert "12345678" not in text
    assert "hunter2" not in text
    assert "GATEWAY_KEY_SECRET (key_secret, from" in text


# Kubernetes' variables for Service "gateway-sinch-gateway" (what `helm install
# gateway ...` creates) and for a Service named "gateway", ports http 8080 and
# webhook 8443.
SERVICE_LINKS = {
    "GATEWAY_SINCH_GATEWAY_SERVICE_HOST": "10.0.0.1",
    "GATEWAY_SINCH_GATEWAY_SERVICE_PORT": "8080",
    "GATEWAY_SINCH_GATEWAY_SERVICE_PORT_HTTP": "8080",
    "GATEWAY_SINCH_GATEWAY_SERVICE_PORT_WEBHOOK": "8443",
    "GATEWAY_SINCH_GATEWAY_PORT": "tcp://10.0.0.1:8080",
    "GATEWAY_SINCH_GATEWAY_PORT_8080_TCP": "tcp://10.0.0.1:8080",
    "GATEWAY_SINCH_GATEWAY_PORT_8080_TCP_PROTO": "tcp",
    "GATEWAY_SINCH_GATEWAY_PORT_8080_TCP_PORT": "8080",
    "GATEWAY_SINCH_GATEWAY_PORT_8080_TCP_ADDR": "10.0.0.1",
    "GATEWAY_SINCH_GATEWAY_PORT_8443_TCP": "tcp://10.0.0.1:8443",
    "GATEWAY_SINCH_GATEWAY_PORT_8443_TCP_PROTO": "tcp",
    "GATEWAY_SINCH_GATEWAY_PORT_8443_TCP_PORT": "8443",
    "GATEWAY_SINCH_GATEWAY_PORT_8443_TCP_ADDR": "10.0.0.1",
    "GATEWAY_SERVICE_HOST": "10.0.0.2",
    "GATEWAY_SERVICE_PORT": "8080",
    "GATEWAY_PORT": "tcp://10.0.0.2:8080",
    "GATEWAY_PORT_8080_TCP": "tcp://10.0.0.2:8080",
    "GATEWAY_PORT_8080_TCP_PROTO": "tcp",
    "GATEWAY_PORT_8080_TCP_PORT": "8080",
    "GATEWAY_PORT_8080_TCP_ADDR": "10.0.0.2",
    "GATEWAY_PORT_5353_UDP": "udp://10.0.0.2:5353",
}


def test_kubernetes_service_links_are_ignored_silently(caplog):
    caplog.set_level(logging.DEBUG, logger="gateway.settings")
    env = {
        **SERVICE_LINKS,
        "GATEWAY_HTTP_PORT": "9000",
        "GATEWAY_WEBHOOK_PORT": "9443",
        "GATEWAY_PROJECT_ID": "p",
        "GATEWAY_KEY_ID": "k",
        "GATEWAY_KEY_SECRET": "s",
    }
    s = load(env=env, require_credentials=True)
    assert (s.http_port, s.webhook_port) == (9000, 9443)
    assert caplog.records == []


def test_a_service_link_in_a_setting_variable_is_not_taken_for_the_setting(caplog):
    # A Service named gateway-webhook gives GATEWAY_WEBHOOK_PORT=tcp://...
    caplog.set_level(logging.WARNING, logger="gateway.settings")
    s = load(env={"GATEWAY_WEBHOOK_PORT": "tcp://10.0.0.3:8443", "GATEWAY_HTTP_PORT": "8081"})
    assert (s.http_port, s.webhook_port) == (8081, None)
    assert [r.getMessage() for r in caplog.records] == [
        "GATEWAY_WEBHOOK_PORT looks like a Kubernetes service link, not a setting: ignored"
    ]


@pytest.mark.parametrize(
    ("var", "value", "link"),
    [
        ("GATEWAY_PORT", "tcp://1.2.3.4:80", True),
        ("GATEWAY_X_PORT", "sctp://[fd00::1]:80", True),
        ("GATEWAY_PORT", "8080", False),
        ("GATEWAY_HTTP_PORT", "8080", False),
        ("GATEWAY_WEBHOOK_PORT", "", False),
        ("GATEWAY_FOO", "tcp://1.2.3.4:80", False),
        ("GATEWAY_PORT_80_TCP_ADDR", "1.2.3.4", True),
        ("GATEWAY_PORT_80_HTTP", "1.2.3.4", False),
        ("GATEWAY_A_SERVICE_PORT_METRICS", "9", True),
    ],
)
def test_service_link_shapes(var, value, link):
    assert is_service_link(var, value) is link


def test_unknown_variable_warns_once_by_name_and_loads(caplog):
    caplog.set_level(logging.DEBUG, logger="gateway.settings")
    s = load(env={"GATEWAY_FOO": "value-not-shown", "GATEWAY_APP_RATE": "25"})
    assert s.app_rate == 25.0
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["GATEWAY_FOO is not a setting of this gateway version: ignored"]
    assert caplog.records[0].levelno == logging.WARNING
    assert "value-not-shown" not in caplog.text


def test_unknown_toml_key_is_still_an_error(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text("app_raet = 20\n")
    with pytest.raises(ConfigProblems, match="app_raet"):
        load(cfg, env={})


@pytest.mark.parametrize(
    "content", ["SMS=10, whatsapp=80.5", "SMS=10\nWHATSAPP=80.5\n", "SMS=10,\nWHATSAPP = 80.5"]
)
def test_channel_rates_from_a_file(tmp_path, content):
    rates = tmp_path / "rates"
    rates.write_text(content)
    s = load(env={"GATEWAY_CHANNEL_RATES_FILE": str(rates)})
    assert s.channel_rates == {"SMS": 10.0, "WHATSAPP": 80.5}
    assert load(env={"GATEWAY_CHANNEL_RATES": "SMS=10,WHATSAPP=80.5"}).channel_rates == {
        "SMS": 10.0,
        "WHATSAPP": 80.5,
    }


def test_bad_channel_rates_file_names_the_file_variable(tmp_path):
    rates = tmp_path / "rates"
    rates.write_text("SMS=0\n")
    with pytest.raises(ConfigProblems) as info:
        load(env={"GATEWAY_CHANNEL_RATES_FILE": str(rates)})
    assert str(info.value) == (
        "GATEWAY_CHANNEL_RATES (channel_rates.SMS, from GATEWAY_CHANNEL_RATES_FILE): "
        "expected a number greater than 0, got 0.0"
    )


@pytest.mark.parametrize("var", ["GATEWAY_APPS", "GATEWAY_APPS_FILE"])
def test_apps_from_the_environment_are_refused_not_dropped(tmp_path, var):
    apps = tmp_path / "apps"
    apps.write_text("a1=5")
    value = str(apps) if var.endswith("_FILE") else "a1=5"
    with pytest.raises(ConfigProblems, match=r"\(apps"):
        load(env={var: value})


def test_bad_toml_app_override_names_the_key(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text("[apps.a1]\nrate = 0\n")
    with pytest.raises(ConfigError, match=r"apps\.a1\.rate"):
        load(cfg, env={})


def test_secret_from_file_is_masked(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("hunter2-very-secret\n")
    s = load(
        env={
            "GATEWAY_KEY_SECRET_FILE": str(secret_file),
            "GATEWAY_PROJECT_ID": "p",
            "GATEWAY_KEY_ID": "k",
        }
    )
    assert s.key_secret.reveal() == "hunter2-very-secret"
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.key_secret)
    assert isinstance(s.key_secret, Secret)


def test_missing_credentials_name_the_key():
    with pytest.raises(ConfigError, match="key_secret"):
        load(env={"GATEWAY_PROJECT_ID": "p", "GATEWAY_KEY_ID": "k"}).require_credentials()


def test_cli_exits_non_zero_with_one_line_per_problem():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {
            "GATEWAY_APP_RATE": "twenty",
            "GATEWAY_KEY_SECRET": "do-not-print-me",
            "GATEWAY_SOMETHING_ELSE": "value-not-shown",
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--log-format", "text"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "do-not-print-me" not in proc.stderr + proc.stdout
    assert "value-not-shown" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4, lines
    assert "GATEWAY_SOMETHING_ELSE is not a setting" in lines[0]
    assert lines[1:] == [
        "gateway: GATEWAY_APP_RATE (app_rate): expected a number, got 'twenty'",
        "gateway: GATEWAY_PROJECT_ID (project_id): missing (a non-empty value)",
        "gateway: GATEWAY_KEY_ID (key_id): missing (a non-empty value)",
    ]
