"""Client wire formats, all encoded from the same log entries.

An encoder turns a reader's events into SSE frames for one response.  Every frame carries
the ``id:`` of the entry it comes from, so ``Last-Event-ID`` resumes work in every format.

- :class:`NativeFrames`: tokentee's own events (``event: token`` ...), encoded once per
  process and shared by every client (the frame is cached on the event).
- :class:`OpenAIChunks`: OpenAI's ``chat.completion.chunk`` objects and ``data: [DONE]``, for
  clients written against OpenAI's streaming Chat Completions.

:func:`completion` builds the non-streaming ``chat.completion`` object from a finished
generation's events.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

from broker.events import Event

_EXTRA_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028",
                                    "\u2029": "\\u2029"})


class Encoder(Protocol):
    headers: list[tuple[bytes, bytes]]  # response headers the format needs

    def preamble(self) -> bytes:
        """Frames to send before the first event."""
        ...

    def encode(self, event: Event) -> bytes: ...


def _one_id(out: str, seq: int) -> bytes:
    """Keep the ``id:`` only on the last frame an entry produced: a client cut off between
    two frames of one entry then resumes from the entry before and gets all of them again,
    instead of skipping the rest."""
    marker = f"id: {seq}"
    lines = out.split("\n")
    last = max((i for i, line in enumerate(lines) if line == marker), default=-1)
    return "\n".join(line for i, line in enumerate(lines)
                     if line != marker or i == last).encode()


def openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Usage in OpenAI's names (Anthropic reports ``input_tokens``/``output_tokens``)."""
    if "prompt_tokens" in usage or "input_tokens" not in usage:
        return usage
    prompt = sum(int(usage.get(k) or 0) for k in (
        "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _data_line(payload: str) -> str:
    # JSON escapes every control character below U+0020; these three are line ends for some
    # splitters (Python's str.splitlines, some JS libraries) although not for SSE.
    return "data: " + payload.translate(_EXTRA_LINE_BREAKS) + "\n"


def _frame(seq: int | None, part: dict[str, Any] | str) -> str:
    data = part if isinstance(part, str) else json.dumps(
        part, ensure_ascii=False, separators=(",", ":"))
    return (f"id: {seq}\n" if seq is not None else "") + _data_line(data) + "\n"


def native_frame(event_id: str, event_type: str, data_json: str) -> bytes:
    """A frame of tokentee's own format (also a channel's, whose ids are positions)."""
    return (f"id: {event_id}\nevent: {event_type}\n" + _data_line(data_json) + "\n").encode()


class NativeFrames:
    """``id``, ``event`` (the entry type) and ``data`` (the entry's JSON) per event."""

    headers: list[tuple[bytes, bytes]] = []

    def preamble(self) -> bytes:
        return b""

    def encode(self, event: Event) -> bytes:
        frame = event.sse_frame
        if frame is None:
            frame = native_frame(str(event.seq), event.type, event.json_data())
            object.__setattr__(event, "sse_frame", frame)  # frozen: a cache, not a state
        return frame


NATIVE = NativeFrames()

# tokentee finish reasons that are not OpenAI's.
_ERROR_TYPES = {"cancelled": "cancelled"}


class OpenAIChunks:
    """``chat.completion.chunk`` objects as OpenAI streams them.

    The first entry's chunk carries ``role: assistant``; ``token`` entries are
    ``delta.content``, ``reasoning`` ``delta.reasoning_content``, ``tool_call_delta``
    ``delta.tool_calls``; ``done`` is a chunk with the ``finish_reason``, a usage chunk
    (``choices: []``) when the upstream reported usage, then ``[DONE]``; ``error`` and
    ``cancelled`` are an ``error`` object (what OpenAI sends when a stream fails), then
    ``[DONE]``.  ``gap`` has no OpenAI form: it becomes an SSE comment.  Entries with no
    chunk of their own (``tool_call``, ``reasoning_signature``) send nothing.
    """

    headers: list[tuple[bytes, bytes]] = []

    def __init__(self, gid: str, model: str, created: float, *,
                 include_usage: bool = False) -> None:
        self.base = {"id": f"chatcmpl-{gid}", "object": "chat.completion.chunk",
                     "created": int(created), "model": model}
        self.include_usage = include_usage  # as OpenAI's stream_options.include_usage
        # Tool call indexes as OpenAI numbers them (0, 1, ... in order of appearance);
        # Anthropic's are content block indexes, with holes.
        self.tool_index: dict[int, int] = {}

    def preamble(self) -> bytes:
        return b""

    def _chunk(self, seq: int, delta: dict[str, Any], finish: str | None = None) -> str:
        if seq == 1:
            delta = {"role": "assistant", **delta}
        return _frame(seq, {**self.base, "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    def encode(self, event: Event) -> bytes:
        seq, data = event.seq, event.data
        match event.type:
            case "token":
                out = self._chunk(seq, {"content": event.text})
            case "snapshot":  # the text so far, as the stream's first chunk
                out = _frame(seq, {**self.base, "choices": [{
                    "index": 0, "delta": {"role": "assistant", "content": event.text},
                    "logprobs": None, "finish_reason": None}]})
            case "reasoning":
                out = self._chunk(seq, {"reasoning_content": data.get("text", "")})
            case "tool_call_delta":
                upstream = int(data.get("index", 0))
                index = self.tool_index.setdefault(upstream, len(self.tool_index))
                call: dict[str, Any] = {"index": index}
                if "id" in data:
                    call["id"], call["type"] = data["id"], "function"
                function = {k: data[k] for k in ("name", "arguments") if k in data}
                if function:
                    call["function"] = function
                out = self._chunk(seq, {"tool_calls": [call]})
            case "done":
                out = self._chunk(seq, {}, str(data.get("finish_reason") or "stop"))
                if self.include_usage and isinstance(data.get("usage"), dict):
                    out += _frame(seq, {**self.base, "choices": [],
                                             "usage": openai_usage(data["usage"])})
                out += _frame(seq, "[DONE]")
            case "error" | "cancelled":
                code = str(data.get("code") or _ERROR_TYPES.get(event.type, "error"))
                message = str(data.get("message") or f"the generation was {event.type}")
                out = _frame(seq, {"error": {"message": message, "type": event.type,
                                                  "code": code, "param": None}})
                out += _frame(seq, "[DONE]")
            case "gap":
                # A comment, without an id: an id-only frame is an event with empty data,
                # which OpenAI's client would try to parse as JSON.
                out = (f": entries {data.get('first_missing')}.."
                       f"{data.get('last_missing')} are gone from the log\n\n")
            case _:  # reasoning signatures, complete tool calls: no chunk of their own
                out = ""
        return _one_id(out, seq)


class AISDKParts:
    """The Vercel AI SDK UI message stream (v1): ``start``, ``text-start/delta/end``,
    ``reasoning-start/delta/end``, ``tool-input-start/delta/available``, ``finish``,
    ``error``, ``[DONE]``; header ``x-vercel-ai-ui-message-stream: v1``.

    The AI SDK refuses a delta or an end without its start, so this encoder keeps the open
    parts of its one response.  A text run or a reasoning run is one part, named after the
    entry that began it (``text-<seq>``).  After a resume, a run that began before the resume
    point is a new part (its start is sent again under a new name); a tool call whose
    start came before the resume point appears whole with its ``tool-input-available``.
    A cancelled generation ends with ``finish`` (its ``messageMetadata`` says so).
    """

    headers = [(b"x-vercel-ai-ui-message-stream", b"v1")]

    def __init__(self, gid: str, after: int) -> None:
        self.gid = gid
        self.after = after
        self.text: str | None = None  # open text part
        self.reasoning: str | None = None  # open reasoning part
        self.tools: dict[int, tuple[str, str]] = {}  # index -> (toolCallId, toolName) started

    def preamble(self) -> bytes:
        # The message starts once; a resumed response continues it.
        return _frame(None, {"type": "start", "messageId": self.gid}).encode() \
            if self.after == 0 else b""

    def _close(self, seq: int, keep: str = "") -> str:
        out = ""
        if self.text is not None and keep != "text":
            out += _frame(seq, {"type": "text-end", "id": self.text})
            self.text = None
        if self.reasoning is not None and keep != "reasoning":
            out += _frame(seq, {"type": "reasoning-end", "id": self.reasoning})
            self.reasoning = None
        return out

    def encode(self, event: Event) -> bytes:
        seq, data = event.seq, event.data
        out = ""
        match event.type:
            case "token" | "snapshot":
                out = self._close(seq, keep="text")
                if self.text is None:
                    self.text = f"text-{seq}"
                    out += _frame(seq, {"type": "text-start", "id": self.text})
                out += _frame(seq, {"type": "text-delta", "id": self.text, "delta": event.text})
            case "reasoning":
                out = self._close(seq, keep="reasoning")
                if self.reasoning is None:
                    self.reasoning = f"reasoning-{seq}"
                    out += _frame(seq, {"type": "reasoning-start", "id": self.reasoning})
                out += _frame(seq, {"type": "reasoning-delta", "id": self.reasoning,
                                    "delta": str(data.get("text", ""))})
            case "tool_call_delta":
                out = self._close(seq)  # a tool call ends the text or reasoning run
                index = int(data.get("index", 0))
                if index not in self.tools and "id" in data:
                    self.tools[index] = (str(data["id"]), str(data.get("name", "")))
                    out += _frame(seq, {"type": "tool-input-start", "toolCallId": data["id"],
                                        "toolName": data.get("name", "")})
                if index in self.tools and data.get("arguments"):
                    out += _frame(seq, {"type": "tool-input-delta",
                                        "toolCallId": self.tools[index][0],
                                        "inputTextDelta": data["arguments"]})
            case "tool_call":
                out = self._close(seq)
                index = int(data.get("index", 0))
                call_id, name = str(data.get("id", "")), str(data.get("name", ""))
                if index not in self.tools:
                    out += _frame(seq, {"type": "tool-input-start", "toolCallId": call_id,
                                        "toolName": name})
                self.tools.pop(index, None)
                arguments = str(data.get("arguments", ""))
                try:
                    parsed: Any = json.loads(arguments) if arguments else {}
                except json.JSONDecodeError:
                    parsed = arguments
                out += _frame(seq, {"type": "tool-input-available", "toolCallId": call_id,
                                    "toolName": name, "input": parsed})
            case "done" | "cancelled":
                out = self._close(seq)
                finish: dict[str, Any] = {"type": "finish"}
                if event.type == "cancelled":
                    finish["messageMetadata"] = {"tokentee": {
                        "status": "cancelled", "reason": data.get("reason")}}
                out += _frame(seq, finish) + _frame(seq, "[DONE]")
            case "error":
                out = self._close(seq)
                out += _frame(seq, {"type": "error", "errorText": str(
                    data.get("message") or data.get("code") or "the generation failed")})
                out += _frame(seq, "[DONE]")
            case "gap":
                out = (f": entries {data.get('first_missing')}.."
                       f"{data.get('last_missing')} are gone from the log\n\n")
        return _one_id(out, seq)


def completion(gid: str, model: str, created: float, events: Iterable[Event]
               ) -> dict[str, Any]:
    """The ``chat.completion`` object of a finished generation (its events in order)."""
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    finish: str | None = None
    usage: dict[str, Any] | None = None
    for event in events:
        if event.type == "token":
            text.append(event.text)
        elif event.type == "reasoning":
            reasoning.append(str(event.data.get("text", "")))
        elif event.type == "tool_call":
            calls.append({"id": event.data.get("id", ""), "type": "function", "function": {
                "name": event.data.get("name", ""),
                "arguments": event.data.get("arguments", "")}})
        elif event.type == "done":
            finish = str(event.data.get("finish_reason") or "stop")
            if isinstance(event.data.get("usage"), dict):
                usage = openai_usage(event.data["usage"])
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None,
                               "refusal": None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{gid}", "object": "chat.completion", "created": int(created),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish or "stop"}],
        "usage": usage,
    }
