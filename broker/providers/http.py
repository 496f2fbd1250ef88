"""What the HTTP streaming providers share: one POST whose body is Server-Sent Events.

A subclass says how to build the request (:meth:`HttpSseProvider._build`) and how to map the
events of the body (a :class:`EventMapper`); this class runs the call with explicit timeouts,
retries it while it fails before its first token (:mod:`broker.providers.retry`), turns every
way it can fail into one :class:`UpstreamFailure` (never an exception), and keeps the API key
out of everything it reports (:meth:`HttpSseProvider._redact`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any, Protocol

import httpx

from broker.errors import ProviderConfigError, UpstreamProtocolError
from broker.events import ProviderEvent, UpstreamFailure
from broker.providers.base import GenerationRequest
from broker.providers.retry import retry_after, with_retries
from broker.providers.sse import aiter_sse
from broker.settings import Settings

logger = logging.getLogger(__name__)

_ERROR_BODY_LIMIT = 4096  # bytes of a non-2xx body read to find the error message
MESSAGE_LIMIT = 500  # characters of upstream-provided text kept in an UpstreamFailure
CODE_LIMIT = 64
_REDACTED = "[redacted]"
# What h11 accepts in a header value without echoing the value in its error (which would
# leak the key): visible ASCII, no spaces.
_KEY_RE = re.compile(r"[\x21-\x7e]+")


class EventMapper(Protocol):
    """Maps one response body's SSE events to provider events, then its end."""

    ended: bool  # a terminal event (Finish or UpstreamFailure) was produced

    def feed(self, event_type: str, data: str) -> list[ProviderEvent]: ...

    def at_eof(self) -> list[ProviderEvent]:
        """The body ended normally (without a terminal event so far)."""
        ...

    def broken(self, failure: UpstreamFailure) -> list[ProviderEvent]:
        """The transport or the framing broke with ``failure``."""
        ...


class HttpSseProvider:
    """Base of the HTTP providers.

    ``client`` may be injected (the caller then owns and closes it); otherwise one is created
    on first use and closed by :meth:`aclose`.  Either way every request carries an explicit
    :class:`httpx.Timeout` from the settings: ``connect`` for connecting and writing the
    request, ``read`` as the longest silence allowed between two chunks.  httpx has no total
    timeout; the producer bounds the whole generation (``max_generation_seconds``).
    """

    name = ""

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None,
                 key: str | None) -> None:
        self._settings = settings
        self._client = client
        self._owns_client = client is None
        self._key = key
        self._timeout = httpx.Timeout(
            connect=settings.upstream_connect_timeout,
            read=settings.upstream_read_timeout,
            write=settings.upstream_connect_timeout,
            pool=settings.upstream_connect_timeout,
        )

    # --- what a provider says ---------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        raise NotImplementedError

    def _build(self, request: GenerationRequest) -> tuple[str, dict[str, Any], dict[str, str]]:
        """URL, JSON payload and extra headers of the streaming request."""
        raise NotImplementedError

    def _mapper(self) -> EventMapper:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------

    def _check_url_and_key(self, url: str, key_setting: str) -> None:
        if not url.startswith(("http://", "https://")):
            raise ProviderConfigError(f"{self.name}_base_url must start with http:// or https://")
        if self._key is not None and not _KEY_RE.fullmatch(self._key):
            raise ProviderConfigError(
                f"{key_setting} contains characters not allowed in an HTTP header"
            )

    def _check_params(self, request: GenerationRequest, allowed: frozenset[str],
                      reserved: frozenset[str], reserved_hint: str = "") -> None:
        """Refuse parameters the broker sets itself and parameters outside ``allowed``."""
        taken = sorted(reserved.intersection(request.params))
        if taken:
            raise ProviderConfigError(
                f"parameters {taken} are set by the broker and cannot be overridden"
                + reserved_hint
            )
        unknown = sorted(set(request.params) - allowed - reserved)
        if unknown:
            raise ProviderConfigError(
                f"unknown parameters for provider {self.name!r}: {unknown}; "
                f"allowed: {sorted(allowed)}"
            )

    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        """One streaming call, retried (see :func:`with_retries`) while it fails before its
        first event; the events of the attempt that counts.

        Failures are yielded, not raised: HTTP status (``upstream_http_<status>``), connect
        failure (``upstream_unreachable``), timeout (``upstream_timeout``), a dropped
        connection (``upstream_disconnected``), bad SSE or JSON (``upstream_protocol``), an
        error event in the stream (its code), or a body that ends before its end
        (``upstream_incomplete``).  :class:`ProviderConfigError` from :meth:`validate` is
        raised on the first iteration.  If the consumer stops early (``aclose``,
        cancellation), the upstream response is closed, which drops the connection.
        """
        return with_retries(lambda: self._attempt(request), self._settings, self.name)

    async def _attempt(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        self.validate(request)
        url, payload, extra_headers = self._build(request)
        headers = {
            "Accept": "text/event-stream",
            # We read decoded bytes, but a compressed body would be inflated a whole network
            # chunk at a time, with no cap (a zip bomb outruns max_line_bytes), so ask for
            # none.  A server that compresses anyway is still decoded.
            "Accept-Encoding": "identity",
            **extra_headers,
        }
        client = self._get_client()
        mapper = self._mapper()
        try:
            async with client.stream(
                "POST", url, json=payload, headers=headers, timeout=self._timeout
            ) as response:
                if not response.is_success:
                    yield await self._http_failure(response)
                    return
                content_type = response.headers.get("content-type", "")
                if "text/event-stream" not in content_type.lower():
                    yield UpstreamFailure(
                        "upstream_protocol",
                        "expected a text/event-stream response, got "
                        + self._redact(repr(content_type))[:CODE_LIMIT],
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
            failure = transport_failure(exc)
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
        message = error_message(text) or text.strip() or response.reason_phrase
        logger.warning("upstream returned HTTP %d", response.status_code)
        status = response.status_code
        return UpstreamFailure(
            f"upstream_http_{status}",
            # Redact before truncating, so a cut cannot leave a prefix of the key behind.
            self._redact(message)[:MESSAGE_LIMIT],
            retryable=status == 429 or status >= 500,
            retry_after=retry_after(response.headers),
        )


def error_message(text: str) -> str | None:
    """``error.message`` (or a string ``error``) of an OpenAI- or Anthropic-style error body."""
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


def transport_failure(exc: httpx.TransportError) -> UpstreamFailure:
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
