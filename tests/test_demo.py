"""broker.demo: the showcase runs end to end, in-process and through the real CLI."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from broker.demo import Reader, _check, run_demo
from broker.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _flat(text: str) -> str:
    """Rich wraps long lines at the console width; compare with whitespace collapsed."""
    return " ".join(text.split())


async def test_demo_three_readers_agree(settings: Settings) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    code = await run_demo(settings, tokens=40, rate=400, console=console)
    output = out.getvalue()
    text = _flat(output)
    assert code == 0, output
    assert "All three readers received identical event sequences" in text, output
    assert "(41 events, ids 1..41," in text, output  # 40 tokens + done
    # The final frame of the live view shows that the late join and the resume happened.
    joined = re.search(r"joined late, replayed (\d+)", text)
    assert joined, output
    assert int(joined.group(1)) >= 13, output  # B waited for A to have a third of the tokens
    assert "resumed after id 20" in text, output  # C dropped after half
    # The durable consumers' view of the same generation.
    assert "The sentence logger's sentences add up to that text" in text, output
    assert "the analytics counter counted all 40 tokens" in text, output
    assert "Analytics counter: 40 tokens" in text, output


def test_check_reports_differences() -> None:
    def reader(name: str, events: list[tuple[int, str, dict[str, object]]]) -> Reader:
        r = Reader(name, "")
        r.events = list(events)
        r.state = events[-1][1]
        return r

    good = [(1, "token", {"text": "Hi"}), (2, "token", {"text": " there"}), (3, "done", {})]
    assert _check([reader("A", good), reader("B", good)], "Hi there") == []

    lost = [good[0], good[2]]
    problems = _check([reader("A", good), reader("B", lost)], "Hi there")
    assert any("B's events differ" in p for p in problems)
    assert any("B's text differs" in p for p in problems)

    failed = [*good[:2], (3, "error", {"code": "upstream_error"})]
    problems = _check([reader("A", failed), reader("B", failed)], "Hi there")
    assert problems == ["the stream ended with 'error', not 'done'"]

    repeated = [good[0], good[0], good[1], (4, "done", {})]
    problems = _check([reader("A", repeated)], "HiHi there")
    assert any("without gaps or repeats" in p for p in problems)


def _env() -> dict[str, str]:
    """No Redis URL: the CLI starts its own embedded redis-server."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TOKENTEE_REDIS_URL")}
    env["COLUMNS"] = "120"
    return env


def test_cli_demo_with_embedded_redis() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "demo", "--tokens", "30", "--rate", "300"],
        cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=45, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All three readers received identical event sequences" in _flat(result.stdout)


async def test_demo_reports_a_refused_request(settings: Settings) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    code = await run_demo(settings, tokens=-1, rate=400, console=console)
    assert code == 1, out.getvalue()
    assert "FAIL HTTPStatusError" in out.getvalue()
    assert "422" in out.getvalue()


def test_cli_demo_interrupted_exits_cleanly() -> None:
    """Ctrl-C mid-demo: no traceback, the usual exit status for SIGINT, nothing left behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "demo", "--tokens", "1000", "--rate", "20"],
        cwd=PROJECT_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("tokentee demo:")  # the broker is up
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
