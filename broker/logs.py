"""Log lines: plain text or JSON, and the generation each line is about.

Whatever works on one generation (its producer, an SSE response, a consumer's task) runs
inside :func:`generation_context`; a filter on the root handler copies the id from that
context variable onto every record, so every line logged meanwhile carries
``generation_id``, from any module and without passing the id around.  asyncio copies the
context into each task a task creates, so the producer's writer task inherits its id.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Literal

from pythonjsonlogger.json import JsonFormatter

__all__ = ["configure_logging", "current_generation", "generation_context", "set_generation"]

_generation: ContextVar[str | None] = ContextVar("tokentee_generation_id", default=None)

TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
LogFormat = Literal["text", "json"]


def current_generation() -> str | None:
    """The generation the running task works on, if any."""
    return _generation.get()


def set_generation(gid: str) -> None:
    """Mark the rest of the running task (and the tasks it creates) as working on ``gid``.
    For a task that is about one generation from start to end; elsewhere use
    :func:`generation_context`."""
    _generation.set(gid)


@contextlib.contextmanager
def generation_context(gid: str) -> Iterator[None]:
    """Log lines emitted inside carry ``generation_id=gid``."""
    token = _generation.set(gid)
    try:
        yield
    finally:
        _generation.reset(token)


class GenerationFilter(logging.Filter):
    """Adds ``generation_id`` (``None`` outside any generation) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "generation_id"):
            record.generation_id = _generation.get()
        return True


class _JsonFormatter(JsonFormatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, then
    ``generation_id`` when there is one, and any ``extra`` fields."""

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        if log_data.get("generation_id") is None:
            log_data.pop("generation_id", None)


def json_formatter() -> logging.Formatter:
    return _JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(generation_id)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def configure_logging(level: str = "info", fmt: LogFormat = "text") -> None:
    """Set up the root logger for a tokentee process: one handler on stderr, in ``fmt``.

    Replaces handlers an earlier call (or ``logging.basicConfig``) installed on the root
    logger, so calling it again switches the format.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(GenerationFilter())
    handler.setFormatter(json_formatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
