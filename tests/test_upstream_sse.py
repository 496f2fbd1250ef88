"""The upstream SSE decoder (broker/providers/sse.py) against the WHATWG event-stream rules."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import AsyncIterator

import pytest

from broker.errors import UpstreamProtocolError
from broker.providers.sse import SSEDecoder, SSEMessage, aiter_sse

CAP = 1024


def decode(*chunks: bytes, max_line_bytes: int = CAP) -> list[SSEMessage]:
    decoder = SSEDecoder(max_line_bytes)
    out: list[SSEMessage] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    out.extend(decoder.close())
    return out


def m(
    data: str, event: str = "message", id: str | None = None, retry: int | None = None
) -> SSEMessage:
    return SSEMessage(event=event, data=data, id=id, retry=retry)


# (name, stream bytes, expected messages).  Each is also re-run split at every byte (below).
CASES: list[tuple[str, bytes, list[SSEMessage]]] = [
    ("lf", b"data: a\n\n", [m("a")]),
    ("crlf", b"data: a\r\n\r\n", [m("a")]),
    ("cr", b"data: a\r\r", [m("a")]),
    ("mixed-eol", b"data: a\r\ndata: b\rdata: c\n\r\n", [m("a\nb\nc")]),
    ("lf-cr-is-two-lines", b"data: a\n\rdata: b\n\n", [m("a"), m("b")]),
    ("cr-lf-lf", b"data: a\r\n\ndata: b\r\n\n", [m("a"), m("b")]),
    ("no-space", b"data:a\n\n", [m("a")]),
    ("one-space-removed", b"data:  a \n\n", [m(" a ")]),
    ("colon-in-value", b"data: a: b\n\n", [m("a: b")]),
    ("multi-line-data", b"data: a\ndata:\ndata: b\n\n", [m("a\n\nb")]),
    ("bare-data-fires-empty", b"data\n\n", [m("")]),
    ("two-bare-data", b"data\ndata\n\n", [m("\n")]),
    ("comments", b": ping\ndata: a\n:\n: x: y\n\n: only\n\n", [m("a")]),
    ("unknown-field", b"foo: bar\ndata: a\nDATA: no\n\n", [m("a")]),
    ("event-type", b"event: add\ndata: 1\n\ndata: 2\n\n", [m("1", "add"), m("2")]),
    ("event-reset-without-data", b"event: x\n\ndata: y\n\n", [m("y")]),
    ("empty-event-is-message", b"event:\ndata: a\n\n", [m("a")]),
    ("id-sticky", b"id: 1\ndata: a\n\ndata: b\n\n", [m("a", id="1"), m("b", id="1")]),
    ("id-reset", b"id: 1\ndata: a\n\nid\ndata: b\n\n", [m("a", id="1"), m("b", id="")]),
    (
        "id-with-nul-ignored",
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
        [m("a", id="1"), m("b", id="1")],
    ),
    ("id-in-data-less-block", b"id: 7\n\ndata: a\n\n", [m("a", id="7")]),
    ("retry-digits", b"retry: 1500\ndata: a\n\n", [m("a", retry=1500)]),
    (
        "retry-rejects",
        b"retry: -5\nretry: +3\nretry: 1_0\nretry: 10 \nretry:\nretry: 1.5\n"
        b"retry: \xd9\xa1\ndata: a\n\n",
        [m("a")],
    ),
    (
        "retry-sticky",
        b"retry: 5\n\ndata: a\n\nretry: x\ndata: b\n\n",
        [m("a", retry=5), m("b", retry=5)],
    ),
    # httpx-sse issue #35: after an id, every comment + blank line is a phantom event there.
    (
        "no-phantom-events",
        b"id: 1\ndata: a\n\n: ping\n\nretry: 5\n\nevent: e\n\n\n\n",
        [m("a", id="1")],
    ),
    ("bom-stripped", b"\xef\xbb\xbfdata: a\n\n", [m("a")]),
    ("bom-stripped-once", b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n", [m("b")]),
    ("bom-only-at-start", b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [m("a")]),
    ("bom-then-blank-line", b"\xef\xbb\xbf\ndata: a\n\n", [m("a")]),
    ("partial-event-dropped", b"data: a\n\ndata: b\n", [m("a")]),
    ("partial-line-dropped", b"data: a\n\ndata: b", [m("a")]),
    ("multibyte", "data: héllo € 😀 中\n\n".encode(), [m("héllo € 😀 中")]),
    ("invalid-utf8-replaced", b"data: \xff\xfe ok \xe2\x82\n\n", [m("\ufffd\ufffd ok \ufffd")]),
    ("nul-in-data-kept", b"data: a\x00b\n\n", [m("a\x00b")]),
]


@pytest.mark.parametrize(("stream", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cases_in_one_chunk(stream: bytes, expected: list[SSEMessage]) -> None:
    assert decode(stream) == expected


@pytest.mark.parametrize(("stream", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cases_split_anywhere(stream: bytes, expected: list[SSEMessage]) -> None:
    # Every two-chunk split (this covers a CR at a chunk end followed by LF, and every byte
    # boundary inside a multi-byte character), plus one byte per chunk.
    for i in range(len(stream) + 1):
        assert decode(stream[:i], stream[i:]) == expected, f"split at {i}"
    assert decode(*(stream[i : i + 1] for i in range(len(stream)))) == expected


def test_utf8_char_split_at_every_byte_boundary() -> None:
    text = "é€😀"  # 2-, 3- and 4-byte sequences
    stream = f"data: {text}\n\n".encode()
    start = len(b"data: ")
    for i in range(start, start + len(text.encode()) + 1):
        for j in range(i, start + len(text.encode()) + 1):
            assert decode(stream[:i], stream[i:j], stream[j:]) == [m(text)], (i, j)


def test_events_are_returned_by_the_feed_that_completes_them() -> None:
    decoder = SSEDecoder(CAP)
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\ndata: b\n") == [m("a")]
    assert decoder.feed(b"\n") == [m("b")]


def test_cr_at_chunk_end_ends_the_line_and_swallows_one_following_lf() -> None:
    decoder = SSEDecoder(CAP)
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []  # an empty chunk does not decide the pending LF
    assert decoder.feed(b"\n") == []  # second half of CRLF, not an empty line
    assert decoder.feed(b"\n") == [m("a")]
    # A CR right after a line end is an empty line at once: no need to wait for the next chunk.
    assert decoder.feed(b"data: b\r\r") == [m("b")]
    assert decoder.feed(b"\ndata: c\n\n") == [m("c")]


def test_crlf_at_chunk_end_does_not_swallow_the_next_lf() -> None:
    decoder = SSEDecoder(CAP)
    assert decoder.feed(b"data: a\r\n") == []
    assert decoder.feed(b"\n") == [m("a")]


def test_close_drops_the_partial_event_and_keeps_the_sticky_id() -> None:
    decoder = SSEDecoder(CAP)
    assert decoder.feed(b"id: 9\ndata: a\n\ndata: partial\nevent: x\ndata: more") == [
        m("a", id="9")
    ]
    assert decoder.close() == []
    assert decoder.last_event_id == "9"
    assert decoder.feed(b"data: b\n\n") == [m("b", id="9")]


def test_line_of_exactly_the_cap_is_accepted_and_one_more_byte_raises() -> None:
    ok = b"data: " + b"x" * (CAP - len(b"data: "))
    assert len(ok) == CAP
    assert decode(ok + b"\n\n") == [m("x" * (CAP - 6))]
    assert decode(ok[:100], ok[100:], b"\n\n") == [m("x" * (CAP - 6))]
    with pytest.raises(UpstreamProtocolError, match="line exceeds"):
        decode(ok + b"x\n\n")
    with pytest.raises(UpstreamProtocolError, match="line exceeds"):
        decode(ok[:100], ok[100:] + b"x")  # no terminator yet: raised while buffering


def test_events_before_a_violation_in_the_same_chunk_are_not_lost() -> None:
    decoder = SSEDecoder(CAP)
    assert decoder.feed(b"data: ok\n\n" + b"x" * (CAP + 1)) == [m("ok")]
    with pytest.raises(UpstreamProtocolError, match="line exceeds"):
        decoder.feed(b"data: more\n\n")
    with pytest.raises(UpstreamProtocolError, match="line exceeds"):
        decoder.close()


async def test_aiter_sse_yields_events_before_a_violation_then_raises() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"data: ok\n\n" + b"x" * (CAP + 1)

    messages = aiter_sse(source(), max_line_bytes=CAP)
    assert await anext(messages) == m("ok")
    with pytest.raises(UpstreamProtocolError):
        await anext(messages)


def test_comment_lines_are_capped_too() -> None:
    with pytest.raises(UpstreamProtocolError):
        decode(b":" + b"x" * CAP + b"\n")


def test_event_data_cap() -> None:
    line = b"data: " + b"y" * 99 + b"\n"  # 99 bytes of data per line, +1 for each join LF
    decoder = SSEDecoder(CAP, max_event_bytes=499)
    assert decoder.feed(line * 5 + b"\n") == [m("\n".join(["y" * 99] * 5))]  # 499 bytes
    with pytest.raises(UpstreamProtocolError, match="event data exceeds"):
        decoder.feed(line * 6)


def test_event_data_cap_defaults_to_the_line_cap() -> None:
    with pytest.raises(UpstreamProtocolError, match="event data exceeds"):
        decode(b"data: " + b"z" * 600 + b"\n" + b"data: " + b"z" * 600 + b"\n\n")


async def test_huge_line_is_rejected_without_being_buffered() -> None:
    chunk = b"a" * 65536
    pulled = 0

    async def fifty_megabytes() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield b"data: "
        for _ in range(800):
            pulled += 1
            yield chunk

    cap = 1_048_576
    with pytest.raises(UpstreamProtocolError):
        async for _ in aiter_sse(fifty_megabytes(), max_line_bytes=cap):
            pass
    # Rejected by the first chunk that took the buffered line past the cap, not after 50 MB.
    assert pulled == (cap - len(b"data: ")) // len(chunk) + 1


async def test_aiter_sse_yields_messages_and_drops_partial_event() -> None:
    async def source() -> AsyncIterator[bytes]:
        for part in (
            b"data: a\r",
            b"\n\r\nid: 1\ndata: ",
            "b€".encode()[:2],
            "€".encode()[1:],
            b"\n\ndata: partial",
        ):
            yield part

    got = [msg async for msg in aiter_sse(source(), max_line_bytes=CAP)]
    assert got == [m("a"), m("b€", id="1")]


async def test_aiter_sse_closes_its_source_when_closed_early() -> None:
    closed = False

    async def source() -> AsyncIterator[bytes]:
        nonlocal closed
        try:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
            raise AssertionError("read past the first event")
        finally:
            closed = True

    messages = aiter_sse(source(), max_line_bytes=CAP)
    assert await anext(messages) == m("1")
    assert not closed
    await messages.aclose()
    assert closed


def test_constructor_rejects_nonpositive_caps() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        SSEDecoder(0)
    with pytest.raises(ValueError, match="max_event_bytes"):
        SSEDecoder(10, max_event_bytes=0)


# --- random streams: chunking never matters, and a literal reading of the spec agrees ------


def reference_decode(stream: bytes) -> list[SSEMessage]:
    """The spec's algorithm, written as literally as possible over the whole stream."""
    text = stream.decode("utf-8", "replace")
    text = text.removeprefix("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)
    lines.pop()  # the text after the last line end is not a line (discarded at EOF)
    out: list[SSEMessage] = []
    data, event, last_id, retry = "", "", None, None
    for line in lines:
        if line == "":
            if data == "":
                event = ""
                continue
            out.append(SSEMessage(event or "message", data.removesuffix("\n"), last_id, retry))
            data, event = "", ""
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event = value
        elif name == "id" and "\x00" not in value:
            last_id = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return out


def random_stream(rng: random.Random) -> bytes:
    values = [
        "",
        " ",
        "a",
        "  two spaces",
        "x:y",
        "héllo",
        "😀 emoji",
        "\x00nul",
        "7",
        "-3",
        "\uff11\uff12",
        "data",
        "[DONE]",
        '{"k": "v"}',
    ]
    names = ["data", "data", "data", "event", "id", "retry", "", "foo", "DATA", "\ufeffdata"]
    eols = ["\n", "\r", "\r\n"]
    parts: list[bytes] = []
    if rng.random() < 0.3:
        parts.append(b"\xef\xbb\xbf")
    for _ in range(rng.randint(0, 40)):
        kind = rng.random()
        if kind < 0.2:
            line = b""
        elif kind < 0.3:
            line = b":" + rng.choice(values).encode()
        elif kind < 0.35:
            line = rng.choice([b"\xff", b"\xe2\x82", b"data: \xc3"])
        else:
            name = rng.choice(names)
            sep = rng.choice([":", ": ", ":  ", ""]) if name else ":"
            line = (name + sep + (rng.choice(values) if sep else "")).encode()
        parts.append(line + rng.choice(eols).encode())
    if rng.random() < 0.5:
        parts.append(b"data: tail")
    return b"".join(parts)


def random_split(rng: random.Random, stream: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(len(stream) + 1), k=min(len(stream) + 1, rng.randint(0, 12))))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def test_random_streams_match_the_reference_and_any_chunking() -> None:
    rng = random.Random(20240917)
    dispatched = 0
    for _ in range(2000):
        stream = random_stream(rng)
        expected = reference_decode(stream)
        dispatched += len(expected)
        assert decode(stream, max_line_bytes=10_000) == expected, stream
        for _ in range(5):
            chunks = random_split(rng, stream)
            assert decode(*chunks, max_line_bytes=10_000) == expected, chunks
    assert dispatched > 1000  # the generator really produces events


def test_many_lines_in_one_big_chunk() -> None:
    stream = b"".join(b"data: %d\r\n\r\n" % i for i in range(50_000))
    got = decode(stream)
    assert len(got) == 50_000
    assert got[-1] == m("49999")
