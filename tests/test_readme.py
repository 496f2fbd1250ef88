"""The README is the manual: its Python examples run, and its settings table is complete."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from broker.settings import Settings
from tests.conftest import RUN_PREFIX

README = (Path(__file__).parent.parent / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("index", [0, 1])
def test_python_api_examples_run(redis_url: str, index: int) -> None:
    code = python_blocks(section("Python API for subscribing services"))[index]
    env = {**os.environ, "REDIS_URL": redis_url,
           "TOKENTEE_KEY_PREFIX": f"{RUN_PREFIX}-readme-{secrets.token_hex(4)}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    if index == 0:
        assert "ended with done" in done.stdout
        assert "ids [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]" in done.stdout
    else:
        assert "8 tokens" in done.stdout


def test_quickstart_has_exactly_the_two_commands() -> None:
    block = re.search(r"## Quickstart.*?```sh\n(.*?)```", README, flags=re.S)
    assert block is not None
    assert block.group(1).splitlines() == [
        "pip install . && tokentee demo",
        "pip install '.[test]' && pytest",
    ]
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "pip install '.[test]' && pytest" in ci


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"| `{name}` |" in README, f"setting {name} is missing from the README"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("index", [0, 1])
def test_consumer_type_examples_run(redis_url: str, index: int) -> None:
    code = python_blocks(section("Durable consumers"))[index]
    env = {**os.environ, "REDIS_URL": redis_url,
           "TOKENTEE_KEY_PREFIX": f"{RUN_PREFIX}-readme-{secrets.token_hex(4)}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    if index == 1:
        assert "{'words': 4, 'ended': 'done', 'generation': 'g" in done.stdout
        assert "'index': 1}" in done.stdout
