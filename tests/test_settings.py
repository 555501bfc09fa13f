from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.errors import ConfigError
from gateway.settings import Secret, load


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
    ("env", "key"),
    [
        ({"GATEWAY_APP_RATE": "fast"}, "GATEWAY_APP_RATE"),
        ({"GATEWAY_APP_RATE": "-1"}, "GATEWAY_APP_RATE"),
        ({"GATEWAY_REGION": "mars"}, "GATEWAY_REGION"),
        ({"GATEWAY_HTTP_PORT": "70000"}, "GATEWAY_HTTP_PORT"),
        ({"GATEWAY_CREATE_TOPICS": "maybe"}, "GATEWAY_CREATE_TOPICS"),
        ({"GATEWAY_APP_RAET": "20"}, "GATEWAY_APP_RAET"),
        ({"GATEWAY_AUTH_URL": "ftp://x"}, "GATEWAY_AUTH_URL"),
    ],
)
def test_bad_values_name_the_key(env, key):
    with pytest.raises(ConfigError) as info:
        load(env=env)
    assert info.value.key == key
    assert key in str(info.value)


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


def test_cli_exits_non_zero_with_one_line_naming_the_key():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_APP_RATE": "twenty", "GATEWAY_KEY_SECRET": "do-not-print-me"})
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "GATEWAY_APP_RATE" in proc.stderr
    assert "do-not-print-me" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1
