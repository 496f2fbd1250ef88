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
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import Any

import httpx

from broker.errors import ProviderConfigError, UpstreamProtocolError
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
from broker.providers.retry import retry_after, with_retries
from broker.providers.sse import aiter_sse
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

_ERROR_BODY_LIMIT = 4096  # bytes of a non-2xx body read to find the error message
_MESSAGE_LIMIT = 500  # characters of upstream-provided text kept in an UpstreamFailure
_CODE_LIMIT = 64
_REDACTED = "[redacted]"
# What h11 accepts in a header value without echoing the value in its error (which would
# leak the key): visible ASCII, no spaces.
_KEY_RE = re.compile(r"[\x21-\x7e]+")


class OpenAIProvider:
    """The ``openai`` provider: Chat Completions with ``stream: true``.

    ``client`` may be injected (the caller then owns and closes it); otherwise one is created
    on first use and closed by :meth:`aclose`.  Either way every request carries an explicit
    :class:`httpx.Timeout` from the settings: ``connect`` for connecting and writing the
    request, ``read`` as the longest silence allowed between two chunks.  httpx has no total
    timeout; the caller bounds the whole generation.
    """

    name = "openai"

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._client = client
        self._owns_client = client is None
        self._url = settings.openai_base_url.rstrip("/") + "/chat/completions"
        key = settings.openai_api_key
        self._key = key.get_secret_value() if key is not None else None
        self._timeout = httpx.Timeout(
            connect=settings.upstream_connect_timeout,
            read=settings.upstream_read_timeout,
            write=settings.upstream_connect_timeout,
            pool=settings.upstream_connect_timeout,
        )

    # --- Provider protocol -----------------------------------------------------------------

    def model_for(self, request: GenerationRequest) -> str:
        """``request.model``, else the configured ``openai_model``."""
        return request.model or self._settings.openai_model

    def validate(self, request: GenerationRequest) -> None:
        """Check settings and request before anything starts.

        Raises :class:`ProviderConfigError` for an unusable base URL or API key (the key is
        never quoted), a parameter outside :data:`ALLOWED_PARAMS`, or ``n`` other than 1.
        """
        if not self._url.startswith(("http://", "https://")):
            raise ProviderConfigError("openai_base_url must start with http:// or https://")
        if self._key is not None and not _KEY_RE.fullmatch(self._key):
            raise ProviderConfigError(
                "openai_api_key contains characters not allowed in an HTTP header"
            )
        reserved = sorted(_RESERVED_PARAMS.intersection(request.params))
        if reserved:
            raise ProviderConfigError(
                f"parameters {reserved} are set by the broker and cannot be overridden"
            )
        not_relayed = sorted(_NOT_RELAYED_PARAMS.intersection(request.params))
        if not_relayed:
            raise ProviderConfigError(
                f"parameters {not_relayed} are the deprecated function-calling API: use"
                " 'tools' and 'tool_choice'"
            )
        unknown = sorted(set(request.params) - ALLOWED_PARAMS)
        if unknown:
            raise ProviderConfigError(
                f"unknown parameters for provider 'openai': {unknown}; "
                f"allowed: {sorted(ALLOWED_PARAMS)}"
            )
        n = request.params.get("n")
        # bool is an int subclass; ``"n": true`` is not a count.
        if n is not None and (isinstance(n, bool) or n != 1):
            raise ProviderConfigError("parameter 'n' must be 1: one generation is one choice")

    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        """One streaming completion, retried (see :func:`with_retries`) while it fails
        before its first token; the events of the attempt that counts."""
        return with_retries(lambda: self._attempt(request), self._settings, self.name)

    async def _attempt(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        """Run one streaming completion; yield text deltas, then usage, then the end.

        Yields :class:`TextDelta` per non-empty ``delta.content``, at most one
        :class:`Usage` (the last one the upstream sent) and then exactly one
        :class:`Finish` or :class:`UpstreamFailure`.  ``Finish`` comes only after
        ``[DONE]`` or the end of the body, so the usage chunk that OpenAI sends after the
        finish chunk is not lost.

        Failures are yielded, not raised: HTTP status (``upstream_http_<status>``), connect
        failure (``upstream_unreachable``), timeout (``upstream_timeout``), a dropped
        connection (``upstream_disconnected``), bad SSE or JSON (``upstream_protocol``), an
        error object in the stream (its ``code``/``type``, else ``upstream_error``), or a body
        that ends with neither ``[DONE]`` nor a finish reason (``upstream_incomplete``).
        :class:`ProviderConfigError` from :meth:`validate` is raised on the first
        iteration.  If the consumer stops early (``aclose``, cancellation), the upstream
        response is closed before the generator finishes, which drops the connection.
        """
        self.validate(request)
        payload: dict[str, Any] = {
            "model": self.model_for(request),
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **request.params,
        }
        headers = {
            "Accept": "text/event-stream",
            # We read decoded bytes, but a compressed body would be inflated a whole network
            # chunk at a time, with no cap (a zip bomb outruns max_line_bytes), so ask for
            # none.  A server that compresses anyway is still decoded.
            "Accept-Encoding": "identity",
        }
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        client = self._get_client()
        mapper = _ChunkMapper(self._redact)
        try:
            async with client.stream(
                "POST", self._url, json=payload, headers=headers, timeout=self._timeout
            ) as response:
                if not response.is_success:
                    yield await self._http_failure(response)
                    return
                content_type = response.headers.get("content-type", "")
                if "text/event-stream" not in content_type.lower():
                    yield UpstreamFailure(
                        "upstream_protocol",
                        "expected a text/event-stream response, got "
                        + self._redact(repr(content_type))[:_CODE_LIMIT],
                    )
                    return
                # aclosing: leaving early must close the decoder (and with it aiter_bytes)
                # now, not whenever the garbage collector finalizes the generators.
                async with aclosing(
                    aiter_sse(response.aiter_bytes(), self._settings.upstream_max_line_bytes)
                ) as messages:
                    async for message in messages:
                        for event in mapper.feed(message.event, message.data):
                            yield event
                        if mapper.ended:
                            return
        except UpstreamProtocolError as exc:
            failure = UpstreamFailure("upstream_protocol", str(exc))
        except httpx.TransportError as exc:
            failure = _transport_failure(exc)
        except httpx.DecodingError:
            failure = UpstreamFailure("upstream_protocol", "undecodable content-encoding")
        else:
            for event in mapper.at_eof():
                yield event
            return
        for event in mapper.broken(failure):
            yield event

    # --- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the HTTP client if this provider created it.  Idempotent."""
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # --- internals ---------------------------------------------------------------------------

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            # No pool limit: how many generations run at once is the broker's admission
            # decision, not a hidden queue inside httpx that would surface as PoolTimeout.
            self._client = httpx.AsyncClient(
                timeout=self._timeout,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
                trust_env=self._settings.upstream_trust_env,
            )
        return self._client

    def _redact(self, text: str) -> str:
        """``text`` with the API key replaced, for anything derived from upstream data."""
        if self._key:
            text = text.replace(self._key, _REDACTED)
        return text

    async def _http_failure(self, response: httpx.Response) -> UpstreamFailure:
        body = bytearray()
        chunks = response.aiter_bytes()
        try:
            async for chunk in chunks:
                body += chunk
                if len(body) >= _ERROR_BODY_LIMIT:
                    break
        except (httpx.TransportError, httpx.DecodingError) as exc:
            # The status is the failure worth reporting; the body only adds detail.
            logger.debug("error body unreadable: %s", type(exc).__name__)
        finally:
            # ``break`` leaves the generator suspended; close it now, not at GC time.
            if isinstance(chunks, AsyncGenerator):
                await chunks.aclose()
        text = bytes(body[:_ERROR_BODY_LIMIT]).decode("utf-8", "replace")
        message = _error_message(text) or text.strip() or response.reason_phrase
        logger.warning("upstream returned HTTP %d", response.status_code)
        status = response.status_code
        return UpstreamFailure(
            f"upstream_http_{status}",
            # Redact before truncating, so a cut cannot leave a prefix of the key behind.
            self._redact(message)[:_MESSAGE_LIMIT],
            retryable=status == 429 or status >= 500,
            retry_after=retry_after(response.headers),
        )


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
            self._redact(code_text)[:_CODE_LIMIT], self._redact(message)[:_MESSAGE_LIMIT]
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


def _error_message(text: str) -> str | None:
    """``error.message`` (or a string ``error``) from an OpenAI-style JSON error body."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, Mapping):
        message = error.get("message")
        return message if isinstance(message, str) and message else None
    if isinstance(error, str) and error:
        return error
    message = body.get("message")
    return message if isinstance(message, str) and message else None


def _transport_failure(exc: httpx.TransportError) -> UpstreamFailure:
    # Only the exception's class goes into the message: its text may hold the URL, and the
    # base URL may carry credentials.
    kind = type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError | httpx.ProxyError):
        # The request never reached the upstream: safe to try again.
        return UpstreamFailure("upstream_unreachable", f"could not connect to upstream ({kind})",
                               retryable=True)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamFailure("upstream_timeout", f"upstream timed out ({kind})")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return UpstreamFailure("upstream_disconnected", f"upstream connection broke ({kind})")
    return UpstreamFailure("upstream_unreachable", f"upstream request failed ({kind})")
