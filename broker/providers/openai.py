"""OpenAI Chat Completions streaming over httpx (also fits OpenAI-compatible servers).

One ``POST {base_url}/chat/completions`` with ``stream: true`` and
``stream_options.include_usage``; the body is decoded with our own bounded SSE decoder
(:mod:`broker.providers.sse`) and each ``chat.completion.chunk`` is mapped to provider events.
Every way the upstream can fail ends the stream with one :class:`UpstreamFailure`, never an
exception, so the producer can log a precise error code.  The API key only ever goes into
the ``Authorization`` header; every text we produce from upstream data passes through
:meth:`OpenAIProvider._redact` in case the upstream echoes the key back.
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
    TextDelta,
    ToolCallDelta,
    UpstreamFailure,
    Usage,
)
from broker.providers.base import GenerationRequest
from broker.providers.http import CODE_LIMIT, MESSAGE_LIMIT, EventMapper, HttpSseProvider
from broker.settings import Settings

__all__ = ["ALLOWED_PARAMS", "OpenAIProvider"]

logger = logging.getLogger(__name__)

#: Request parameters passed through to the upstream unchanged.  ``n`` is accepted only as
#: 1 (one generation id is one choice).  Tool calls and reasoning come back as their own
#: log entries (``tool_call_delta``/``tool_call``, ``reasoning``).
ALLOWED_PARAMS: frozenset[str] = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "user",
        "response_format",
        "n",
    }
)
# Set by the provider itself; a client may not override them.
_RESERVED_PARAMS = frozenset({"model", "messages", "stream", "stream_options"})
_NOT_RELAYED_PARAMS = frozenset({"functions", "function_call"})



class OpenAIProvider(HttpSseProvider):
    """The ``openai`` provider: Chat Completions with ``stream: true`` (see
    :class:`HttpSseProvider` for the call itself)."""

    name = "openai"

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        key = settings.openai_api_key
        super().__init__(settings, client, key.get_secret_value() if key is not None else None)
        self._url = settings.openai_base_url.rstrip("/") + "/chat/completions"

    def model_for(self, request: GenerationRequest) -> str:
        """``request.model``, else the configured ``openai_model``."""
        return request.model or self._settings.openai_model

    def validate(self, request: GenerationRequest) -> None:
        """Check settings and request before anything starts.

        Raises :class:`ProviderConfigError` for an unusable base URL or API key (the key is
        never quoted), a parameter outside :data:`ALLOWED_PARAMS`, or ``n`` other than 1.
        """
        self._check_url_and_key(self._url, "openai_api_key")
        not_relayed = sorted(_NOT_RELAYED_PARAMS.intersection(request.params))
        if not_relayed:
            raise ProviderConfigError(
                f"parameters {not_relayed} are the deprecated function-calling API: use"
                " 'tools' and 'tool_choice'"
            )
        self._check_params(request, ALLOWED_PARAMS, _RESERVED_PARAMS)
        n = request.params.get("n")
        # bool is an int subclass; ``"n": true`` is not a count.
        if n is not None and (isinstance(n, bool) or n != 1):
            raise ProviderConfigError("parameter 'n' must be 1: one generation is one choice")

    def _build(self, request: GenerationRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
        """Yields (through the mapper) a :class:`TextDelta` per non-empty
        ``delta.content``, reasoning and tool-call deltas, at most one :class:`Usage` (the
        last one the upstream sent) and then exactly one :class:`Finish` or
        :class:`UpstreamFailure`.  ``Finish`` comes only after ``[DONE]`` or the end of the
        body, so the usage chunk that OpenAI sends after the finish chunk is not lost."""
        payload: dict[str, Any] = {
            "model": self.model_for(request),
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **request.params,
        }
        headers = {"Authorization": f"Bearer {self._key}"} if self._key is not None else {}
        return self._url, payload, headers

    def _mapper(self) -> EventMapper:
        return _ChunkMapper(self._redact)


class _ChunkMapper:
    """Turns the ``data`` of one SSE event after another into provider events.

    Keeps the finish reason and the latest usage until the end of the stream, because
    OpenAI sends the finish chunk, then the usage chunk, then ``[DONE]``, and some
    compatible servers repeat a running usage total on every chunk.
    """

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.ended = False

    def feed(self, event_type: str, data: str) -> list[ProviderEvent]:
        if data.startswith("[DONE]"):
            self.ended = True
            return self._end(Finish(self.finish_reason or "stop"))
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError as exc:
            self.ended = True
            return self._end(
                UpstreamFailure("upstream_protocol", f"upstream sent invalid JSON: {exc.msg}")
            )
        if not isinstance(chunk, dict):
            self.ended = True
            return self._end(
                UpstreamFailure("upstream_protocol", "upstream chunk is not a JSON object")
            )
        error = chunk.get("error")
        if error or event_type == "error":
            self.ended = True
            return self._end(self._error_failure(error, data))
        out: list[ProviderEvent] = []
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                # Reasoning deltas: ``reasoning_content`` (DeepSeek, vLLM, llama.cpp) or
                # ``reasoning`` (OpenRouter, Ollama).
                for key in ("reasoning_content", "reasoning"):
                    reasoning = delta.get(key)
                    if isinstance(reasoning, str) and reasoning:
                        out.append(ReasoningDelta(reasoning))
                        break
                content = delta.get("content")
                if isinstance(content, str) and content:
                    out.append(TextDelta(content))
                out += _tool_call_deltas(delta.get("tool_calls"))
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self.finish_reason = reason
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        return out

    def at_eof(self) -> list[ProviderEvent]:
        """The end of a body: nothing more if a terminal event was produced, else ``Finish``
        if a finish reason was seen (only ``[DONE]`` and maybe usage are missing), else
        ``upstream_incomplete``."""
        if self.ended:
            return []
        return self.broken(
            UpstreamFailure("upstream_incomplete", "upstream stream ended before [DONE]")
        )

    def broken(self, failure: UpstreamFailure) -> list[ProviderEvent]:
        """The end after the transport or framing broke with ``failure``.  If the upstream
        had already sent a finish reason the text is complete, so this is still a
        ``Finish``.  (An explicit error object in the stream is always a failure.)"""
        self.ended = True
        if self.finish_reason is not None:
            logger.info("upstream broke after its finish chunk (%s): finished", failure.code)
            return self._end(Finish(self.finish_reason))
        logger.warning("upstream failed: %s", failure.code)
        return self._end(failure)

    def _end(self, terminal: ProviderEvent) -> list[ProviderEvent]:
        out: list[ProviderEvent] = []
        if self.usage is not None:
            out.append(Usage(self.usage))
            self.usage = None
        out.append(terminal)
        return out

    def _error_failure(self, error: Any, data: str) -> UpstreamFailure:
        code: Any = None
        message: Any = None
        if isinstance(error, Mapping):
            code = error.get("code") or error.get("type")
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        code_text = str(code) if code else "upstream_error"
        if not isinstance(message, str) or not message:
            message = data
        return UpstreamFailure(
            self._redact(code_text)[:CODE_LIMIT], self._redact(message)[:MESSAGE_LIMIT]
        )


def _tool_call_deltas(calls: Any) -> list[ProviderEvent]:
    """``delta.tool_calls``: pieces of calls, keyed by ``index`` (the first piece of a call
    has its ``id`` and ``function.name``, later ones only ``function.arguments``)."""
    out: list[ProviderEvent] = []
    if not isinstance(calls, list):
        return out
    for position, call in enumerate(calls):
        if not isinstance(call, Mapping):
            continue
        index = call.get("index", position)
        if not isinstance(index, int) or isinstance(index, bool):
            continue
        function = call.get("function")
        function = function if isinstance(function, Mapping) else {}
        name, arguments, call_id = function.get("name"), function.get("arguments"), call.get("id")
        out.append(ToolCallDelta(
            index,
            id=call_id if isinstance(call_id, str) and call_id else None,
            name=name if isinstance(name, str) and name else None,
            arguments=arguments if isinstance(arguments, str) else "",
        ))
    return out
