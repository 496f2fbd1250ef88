"""Anthropic Messages streaming over httpx.

One ``POST {anthropic_base_url}/v1/messages`` with ``stream: true``.  The body's events map
to the normalized provider events:

- ``content_block_delta``: ``text_delta`` -> :class:`TextDelta`, ``thinking_delta`` ->
  :class:`ReasoningDelta`, ``signature_delta`` -> :class:`ReasoningSignature`,
  ``input_json_delta`` -> :class:`ToolCallDelta` (keyed by the content block's index);
- ``content_block_start`` of a ``tool_use`` block -> :class:`ToolCallDelta` with its id and
  name; its ``content_block_stop`` -> :class:`ToolCallEnd`;
- ``message_start`` and ``message_delta`` usage (cumulative) -> one :class:`Usage` at the
  end; ``message_delta.stop_reason`` -> the finish reason, in OpenAI's words (``end_turn``
  and ``stop_sequence`` -> ``stop``, ``max_tokens`` -> ``length``, ``tool_use`` ->
  ``tool_calls``, ``refusal`` -> ``content_filter``; others as sent);
- ``message_stop`` -> :class:`Finish`; ``error`` -> :class:`UpstreamFailure` with the error's
  type as its code (``overloaded_error``, ...); ``ping`` and unknown event types are skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from broker.errors import ProviderConfigError
from broker.events import (
    Finish,
    ProviderEvent,
    ReasoningDelta,
    ReasoningSignature,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    UpstreamFailure,
    Usage,
)
from broker.providers.base import GenerationRequest
from broker.providers.http import CODE_LIMIT, MESSAGE_LIMIT, EventMapper, HttpSseProvider
from broker.settings import Settings

__all__ = ["ALLOWED_PARAMS", "AnthropicProvider"]

logger = logging.getLogger(__name__)

API_VERSION = "2023-06-01"
#: Request parameters passed through unchanged.
ALLOWED_PARAMS: frozenset[str] = frozenset({
    "max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "metadata", "tools",
    "tool_choice", "thinking", "service_tier",
})
_RESERVED_PARAMS = frozenset({"model", "messages", "stream", "system"})
_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                 "tool_use": "tool_calls", "refusal": "content_filter"}
# Error types worth another attempt when they come before the first event.
_RETRYABLE_ERRORS = frozenset({"overloaded_error", "api_error", "rate_limit_error"})


class AnthropicProvider(HttpSseProvider):
    """The ``anthropic`` provider: Messages with ``stream: true``."""

    name = "anthropic"

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        key = settings.anthropic_api_key
        super().__init__(settings, client, key.get_secret_value() if key is not None else None)
        self._url = settings.anthropic_base_url.rstrip("/") + "/v1/messages"

    def model_for(self, request: GenerationRequest) -> str:
        """``request.model``, else the configured ``anthropic_model``."""
        return request.model or self._settings.anthropic_model

    def validate(self, request: GenerationRequest) -> None:
        """Raises :class:`ProviderConfigError` for an unusable base URL or key, a parameter
        outside :data:`ALLOWED_PARAMS`, or a message role Messages has no place for."""
        self._check_url_and_key(self._url, "anthropic_api_key")
        self._check_params(request, ALLOWED_PARAMS, _RESERVED_PARAMS,
                           " (system prompts go in 'system' messages)")
        for message in request.messages:
            if message.get("role") not in ("system", "developer", "user", "assistant"):
                raise ProviderConfigError(
                    f"message role {message.get('role')!r} is not supported by 'anthropic':"
                    " send tool results as 'user' content blocks"
                )
            if message.get("role") in ("system", "developer") and not isinstance(
                message.get("content"), str
            ):
                raise ProviderConfigError("a system message's content must be a string")

    def _build(self, request: GenerationRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
        system = "\n\n".join(
            str(m["content"]) for m in request.messages
            if m.get("role") in ("system", "developer")
        )
        payload: dict[str, Any] = {
            "model": self.model_for(request),
            "messages": [{"role": m["role"], "content": m.get("content", "")}
                         for m in request.messages if m.get("role") in ("user", "assistant")],
            "max_tokens": self._settings.anthropic_max_tokens,
            "stream": True,
            **request.params,
        }
        if system:
            payload["system"] = system
        headers = {"anthropic-version": API_VERSION}
        if self._key is not None:
            headers["x-api-key"] = self._key
        return self._url, payload, headers

    def _mapper(self) -> EventMapper:
        return _MessageMapper(self._redact)


class _MessageMapper:
    """Maps Messages stream events (see the module docstring)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        self.ended = False
        self.stop_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self._tool_blocks: set[int] = set()

    def feed(self, event_type: str, data: str) -> list[ProviderEvent]:
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            return self._end(UpstreamFailure("upstream_protocol",
                                             f"upstream sent invalid JSON: {exc.msg}"))
        if not isinstance(event, dict):
            return self._end(UpstreamFailure("upstream_protocol",
                                             "upstream event is not a JSON object"))
        kind = event.get("type") or event_type
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, Mapping):
                self._add_usage(message.get("usage"))
        elif kind == "content_block_start":
            return self._block_start(event)
        elif kind == "content_block_delta":
            return self._block_delta(event)
        elif kind == "content_block_stop":
            index = event.get("index")
            if isinstance(index, int) and index in self._tool_blocks:
                self._tool_blocks.discard(index)
                return [ToolCallEnd(index)]
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, Mapping) and isinstance(delta.get("stop_reason"), str):
                self.stop_reason = delta["stop_reason"]
            self._add_usage(event.get("usage"))
        elif kind == "message_stop":
            return self._end(Finish(self._finish_reason()))
        elif kind == "error":
            return self._end(self._error(event.get("error"), data))
        # ping, and event types added later: skipped, as the API asks
        return []

    def _block_start(self, event: Mapping[str, Any]) -> list[ProviderEvent]:
        index, block = event.get("index"), event.get("content_block")
        if not isinstance(index, int) or not isinstance(block, Mapping):
            return []
        kind = block.get("type")
        if kind == "tool_use":
            self._tool_blocks.add(index)
            call_id, name = block.get("id"), block.get("name")
            return [ToolCallDelta(index, id=call_id if isinstance(call_id, str) else None,
                                  name=name if isinstance(name, str) else None)]
        if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            return [TextDelta(block["text"])]
        if kind == "thinking" and isinstance(block.get("thinking"), str) and block["thinking"]:
            return [ReasoningDelta(block["thinking"])]
        return []

    def _block_delta(self, event: Mapping[str, Any]) -> list[ProviderEvent]:
        index, delta = event.get("index"), event.get("delta")
        if not isinstance(delta, Mapping):
            return []
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(delta.get("text"), str):
            return [TextDelta(delta["text"])] if delta["text"] else []
        if kind == "thinking_delta" and isinstance(delta.get("thinking"), str):
            return [ReasoningDelta(delta["thinking"])] if delta["thinking"] else []
        if kind == "signature_delta" and isinstance(delta.get("signature"), str):
            return [ReasoningSignature(delta["signature"])]
        # Only for the blocks we relay as tool calls: server-side tools (web search, MCP)
        # stream their input too, but the client has nothing to call.
        if kind == "input_json_delta" and index in self._tool_blocks:
            partial = delta.get("partial_json")
            if isinstance(partial, str) and partial:
                return [ToolCallDelta(index, arguments=partial)]
        return []  # citations_delta and later kinds

    def _add_usage(self, usage: Any) -> None:
        # message_delta usage is cumulative: a later value replaces an earlier one.
        if isinstance(usage, Mapping):
            self.usage.update({k: v for k, v in usage.items() if v is not None})

    def _finish_reason(self) -> str:
        reason = self.stop_reason or "stop"
        return _STOP_REASONS.get(reason, reason)

    def _error(self, error: Any, data: str) -> UpstreamFailure:
        kind = error.get("type") if isinstance(error, Mapping) else None
        message = error.get("message") if isinstance(error, Mapping) else None
        code = str(kind) if kind else "upstream_error"
        text = message if isinstance(message, str) and message else data
        return UpstreamFailure(self._redact(code)[:CODE_LIMIT],
                               self._redact(text)[:MESSAGE_LIMIT],
                               retryable=code in _RETRYABLE_ERRORS)

    def _end(self, terminal: ProviderEvent) -> list[ProviderEvent]:
        self.ended = True
        out: list[ProviderEvent] = []
        if self.usage:
            out.append(Usage(dict(self.usage)))
            self.usage = {}
        out.append(terminal)
        return out

    def at_eof(self) -> list[ProviderEvent]:
        if self.ended:
            return []
        return self.broken(UpstreamFailure("upstream_incomplete",
                                           "upstream stream ended before message_stop"))

    def broken(self, failure: UpstreamFailure) -> list[ProviderEvent]:
        """After ``message_delta`` brought the stop reason, only ``message_stop`` is missing:
        the content is complete, so this is still a ``Finish``."""
        if self.stop_reason is not None:
            logger.info("upstream broke after its stop reason (%s): finished", failure.code)
            return self._end(Finish(self._finish_reason()))
        logger.warning("upstream failed: %s", failure.code)
        return self._end(failure)
