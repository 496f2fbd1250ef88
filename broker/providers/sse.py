"""An incremental Server-Sent Events decoder over bytes, for upstream responses.

It follows the WHATWG event-stream rules (HTML §9.2.5-9.2.6): lines end in CRLF, LF or CR;
one leading BOM is stripped; ``:`` lines are comments; a field's value loses one leading
space; ``data`` lines are joined with LF; ``id`` is sticky and ignored if it contains NUL;
``retry`` must be ASCII digits; an empty line dispatches an event only if some ``data`` line
was seen; an event not closed by an empty line before EOF is discarded.

Why not httpx-sse (which the project also depends on):

* **Bounded memory.**  An upstream is a remote party we do not control.  Here a line longer
  than ``max_line_bytes`` or an event whose data exceeds ``max_event_bytes`` raises
  :class:`~broker.errors.UpstreamProtocolError` while it is being buffered, so a 50 MB line
  costs at most the cap plus one transport chunk, never 50 MB.  httpx-sse has no cap.
* **Bytes in, UTF-8 per complete line.**  httpx-sse reads ``aiter_text()``; we split on the
  ASCII bytes CR and LF, which never occur inside a UTF-8 multi-byte sequence, and decode
  only complete lines, so a character split across chunks needs no incremental decoder.
  Invalid UTF-8 becomes U+FFFD, as the spec's "UTF-8 decode" does.
* **No phantom events.**  httpx-sse dispatches on a blank line whenever the sticky last id is
  set (httpx-sse issue #35), so every keep-alive comment after an ``id:`` becomes an empty
  event.  It also accepts ``retry: -5`` and does not strip the BOM explicitly.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass

from broker.errors import UpstreamProtocolError

__all__ = ["SSEDecoder", "SSEMessage", "aiter_sse"]

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEMessage:
    """One dispatched event.

    ``event`` is the event type (``"message"`` if the stream set none).  ``id`` is the last
    event id in effect when the event was dispatched: ``None`` if the stream never sent a valid
    ``id`` field, ``""`` after an empty ``id:`` reset it.  ``retry`` is likewise the
    reconnection time (ms) most recently set by a valid ``retry`` field, or ``None``.  Both are
    sticky, as the spec makes them connection state rather than per-event fields.
    """

    event: str
    data: str
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Push-style decoder: :meth:`feed` bytes as they arrive, get the completed events.

    ``max_line_bytes`` caps one line (without its terminator); ``max_event_bytes`` caps the
    data of one event (the data lines joined with LF, in bytes) and defaults to
    ``max_line_bytes``.  Exceeding either raises :class:`UpstreamProtocolError`; the decoder
    is then in an undefined state and must be discarded.  Not safe for concurrent use.
    """

    def __init__(self, max_line_bytes: int, max_event_bytes: int | None = None) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self._max_line = max_line_bytes
        self._max_event = max_line_bytes if max_event_bytes is None else max_event_bytes
        if self._max_event < 1:
            raise ValueError("max_event_bytes must be positive")
        # The unterminated tail of the current line.  It never contains CR or LF: every
        # terminator is consumed as soon as it is seen.
        self._line = bytearray()
        # A chunk ended in CR.  That CR already ended its line (it does so whether or not an
        # LF follows, so the line need not wait for the next chunk); if the next byte is LF
        # it belongs to the same CRLF and must be skipped, not read as a second, empty line.
        self._skip_lf = False
        self._at_start = True  # the BOM may only be stripped from the very first line
        self._data: list[bytes] = []
        self._data_size = 0
        self._event_type = b""
        self._last_id: str | None = None
        self._retry: int | None = None
        self._error: UpstreamProtocolError | None = None  # deferred by feed(), see there

    @property
    def last_event_id(self) -> str | None:
        """The current last-event-id (what a reconnect would send), or ``None``."""
        return self._last_id

    @property
    def retry(self) -> int | None:
        """The reconnection time (ms) most recently set by the stream, or ``None``."""
        return self._retry

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        """Decode ``chunk`` and return the events it completed (possibly none).

        Raises :class:`UpstreamProtocolError` as soon as the current line or event exceeds
        its cap, before the excess is copied into the decoder's buffers.  If events completed
        earlier in the same chunk, they are returned first and the error is raised by the
        next :meth:`feed` or :meth:`close`, so valid events before the violation are not lost.
        """
        if self._error is not None:
            raise self._error
        messages: list[SSEMessage] = []
        try:
            self._feed(chunk, messages)
        except UpstreamProtocolError as exc:
            if not messages:
                raise
            self._error = exc
        return messages

    def _feed(self, chunk: bytes, messages: list[SSEMessage]) -> None:
        pos = 0
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                pos = 1
        for match in _EOL.finditer(chunk, pos):
            start, end = match.span()
            size = len(self._line) + (start - pos)
            if size > self._max_line:
                raise self._line_too_long(size)
            if self._line:
                self._line += chunk[pos:start]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = chunk[pos:start]
            message = self._process_line(line)
            if message is not None:
                messages.append(message)
            pos = end
            if end == len(chunk) and end - start == 1 and chunk[start] == 0x0D:
                self._skip_lf = True
        rest = len(chunk) - pos
        if rest:
            if len(self._line) + rest > self._max_line:
                raise self._line_too_long(len(self._line) + rest)
            self._line += chunk[pos:]

    def close(self) -> list[SSEMessage]:
        """Signal end of stream: discard the unterminated line and the unfinished event.

        Always returns ``[]``, because the spec drops an event that no empty line closed; it
        exists so callers handle EOF explicitly.  The sticky id and retry survive, as they do
        across an EventSource reconnect, so the decoder can go on with a new connection.
        Raises the :class:`UpstreamProtocolError` that :meth:`feed` deferred, if any.
        """
        if self._error is not None:
            raise self._error
        self._line.clear()
        self._skip_lf = False
        self._at_start = True
        self._data = []
        self._data_size = 0
        self._event_type = b""
        return []

    # --- internals -----------------------------------------------------------------------

    def _line_too_long(self, size: int) -> UpstreamProtocolError:
        return UpstreamProtocolError(
            f"upstream SSE line exceeds {self._max_line} bytes (at least {size})"
        )

    def _process_line(self, line: bytes) -> SSEMessage | None:
        if self._at_start:
            self._at_start = False
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        if not line:
            return self._dispatch()
        if line[0] == 0x3A:  # ":" starts a comment
            return None
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            added = len(value) + (1 if self._data else 0)
            if self._data_size + added > self._max_event:
                raise UpstreamProtocolError(
                    f"upstream SSE event data exceeds {self._max_event} bytes"
                )
            self._data.append(value)
            self._data_size += added
        elif name == b"event":
            self._event_type = value
        elif name == b"id":
            if b"\x00" not in value:
                self._last_id = value.decode("utf-8", "replace")
        # bytes.isdigit() is ASCII-only and False for b"", which is exactly the spec's
        # "consists of only ASCII digits" (int() would also take "-5", "+3", "1_0").
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEMessage | None:
        if not self._data:
            # No data line: nothing fires (this is where httpx-sse emits phantom events).
            self._event_type = b""
            return None
        # Joining bytes then decoding equals decoding each line: LF is ASCII and ends any
        # invalid sequence either way.
        data = b"\n".join(self._data).decode("utf-8", "replace")
        event = self._event_type.decode("utf-8", "replace") if self._event_type else "message"
        self._data = []
        self._data_size = 0
        self._event_type = b""
        return SSEMessage(event=event, data=data, id=self._last_id, retry=self._retry)


async def aiter_sse(
    source: AsyncIterable[bytes],
    max_line_bytes: int,
    max_event_bytes: int | None = None,
) -> AsyncGenerator[SSEMessage, None]:
    """Decode an async byte stream into :class:`SSEMessage` values as they complete.

    Raises :class:`UpstreamProtocolError` on an oversized line or event (see
    :class:`SSEDecoder`); exceptions of ``source`` propagate unchanged.  A partial event at
    the end of ``source`` is dropped.  When this generator finishes, fails or is closed early
    (``aclose``, cancellation), it closes ``source`` too if ``source`` is an async generator,
    such as httpx's ``Response.aiter_bytes()``, rather than leaving it to the garbage
    collector.
    """
    decoder = SSEDecoder(max_line_bytes, max_event_bytes)
    iterator = aiter(source)
    try:
        async for chunk in iterator:
            for message in decoder.feed(chunk):
                yield message
        for message in decoder.close():
            yield message
    finally:
        if isinstance(iterator, AsyncGenerator):
            await iterator.aclose()
