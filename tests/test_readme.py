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


# (section, block index, what its output must contain)
EXAMPLES = [
    ("Python API for subscribing services", 0,
     ["ended with done", "ids [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]"]),
    ("Python API for subscribing services", 1, ["8 tokens"]),
    ("Durable consumers", 0, []),
    ("Durable consumers", 1, ["{'words': 4, 'ended': 'done', 'generation': 'g", "'index': 1}"]),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("title", "index", "expected"), EXAMPLES)
def test_python_examples_run(redis_url: str, title: str, index: int,
                             expected: list[str]) -> None:
    code = python_blocks(section(title))[index]
    env = {**os.environ, "REDIS_URL": redis_url,
           "TOKENTEE_KEY_PREFIX": f"{RUN_PREFIX}-readme-{secrets.token_hex(4)}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    for text in expected:
        assert text in done.stdout


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

