"""The command line refuses invalid settings with one line each and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("command", "env", "expected"), [
    (["serve"], {"TOKENTEE_CORS_ORIGINS": "*"}, "error: invalid setting TOKENTEE_CORS_ORIGINS:"),
    (["serve"], {"TOKENTEE_PORT": "abc"}, "error: invalid setting TOKENTEE_PORT:"),
    (["serve"], {"REDIS_URL": "localhost:6379"},
     "error: invalid setting TOKENTEE_REDIS_URL or REDIS_URL:"),
    (["consume", "sentences"], {"REDIS_URL": "redis://127.0.0.1:1", "TOKENTEE_KEY_PREFIX": "a b"},
     "error: invalid setting TOKENTEE_KEY_PREFIX:"),
])
def test_invalid_setting_exits_2_with_one_line(
    command: list[str], env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    done = subprocess.run([sys.executable, "-m", "broker", *command], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(expected), done.stderr
    assert "Traceback" not in done.stderr
