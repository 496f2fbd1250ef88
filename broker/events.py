"""The event models: what providers yield, and what the log holds.

Providers turn one upstream call into :data:`ProviderEvent` values.  The producer writes them
to the log as :class:`Event` entries, the unit every reader (SSE, Python API, other services)
receives.  The wire encoding of an entry is documented in the README ("Redis wire format").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

# --- provider events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of generated text."""

    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as reported by the upstream (field names as the upstream gives them)."""

    usage: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Finish:
    """The upstream finished normally, with its finish reason (``stop``, ``length``, ...)."""

    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """The upstream reported an error; the generation ends with an ``error`` entry.

    ``retryable``: another attempt may succeed (the request never got through, 429, 5xx);
    ``retry_after``: how long the upstream asked us to wait, in seconds, if it said.
    """

    code: str
    message: str
    # Hints for the retry policy, not part of what the failure is.
    retryable: bool = field(default=False, compare=False)
    retry_after: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning (OpenAI-compatible ``reasoning_content``, Anthropic
    ``thinking_delta``): logged as ``reasoning``, never part of the text."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningSignature:
    """Anthropic's signature of a thinking block (needed to send the block back)."""

    signature: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """Part of tool call ``index``: its ``id`` and ``name`` (when first seen) and a piece of
    its JSON ``arguments``.  The producer accumulates the pieces per index."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """Tool call ``index`` is complete (calls still open at the finish end there)."""

    index: int


ProviderEvent = (
    TextDelta | ReasoningDelta | ReasoningSignature | ToolCallDelta | ToolCallEnd | Usage
    | Finish | UpstreamFailure
)

# --- log entries -------------------------------------------------------------------------

EventType = Literal[
    "token", "reasoning", "reasoning_signature", "tool_call_delta", "tool_call", "snapshot", "done",
    "error", "cancelled", "gap",
]
TERMINAL_TYPES: frozenset[str] = frozenset({"done", "error", "cancelled"})
STATUSES: frozenset[str] = frozenset({"running", "done", "error", "cancelled"})


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a generation's log, as a reader receives it.

    ``seq`` is the entry's 1-based sequence number (entry id ``0-<seq>``), also used as the
    SSE ``id``.  ``type`` is ``token``, one terminal type (``done``, ``error``,
    ``cancelled``), or ``gap``: a synthetic event a reader gets instead of entries that the log
    no longer holds (``data`` has ``first_missing`` and ``last_missing``).
    """

    seq: int
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = 0.0  # producer's wall clock (unix seconds) when it appended the entry
    # The SSE frame, encoded once and shared by every client of this process (broker.sse).
    sse_frame: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    @property
    def text(self) -> str:
        value = self.data.get("text", "")
        return value if isinstance(value, str) else ""

    def json_data(self) -> str:
        return dumps(self.data)


def dumps(data: dict[str, Any]) -> str:
    """Compact JSON.  Never contains a raw CR or LF, so it is safe as one SSE data line, and
    never a lone surrogate, so it is valid UTF-8."""
    return clean_text(json.dumps(data, separators=(",", ":"), ensure_ascii=False))


def encode_fields(etype: str, data: dict[str, Any], ts: float) -> list[str]:
    """Stream entry fields, flattened: ``type``, ``data`` (JSON), ``ts`` (unix ms)."""
    return ["type", etype, "data", dumps(data), "ts", f"{ts * 1000:.3f}"]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` without lone UTF-16 surrogates (``"\\ud83d"`` from a JSON escape, say),
    each replaced by U+FFFD: they cannot be encoded as UTF-8, so Redis could not store them."""
    return _SURROGATES.sub("\ufffd", text) if not text.isascii() else text


def decode_entry(seq: int, fields: dict[bytes, bytes] | dict[str, str]) -> Event:
    """Decode a stream entry's field map (bytes or str) into an :class:`Event`."""
    get: dict[str, str] = {
        _text(k): _text(v) for k, v in fields.items()
    }
    raw = get.get("data", "{}")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        data = {"raw": raw}
    if not isinstance(data, dict):
        data = {"value": data}
    try:
        ts = float(get.get("ts", "0")) / 1000
    except ValueError:
        ts = 0.0
    return Event(seq=seq, type=get.get("type", "unknown"), data=data, ts=ts)
