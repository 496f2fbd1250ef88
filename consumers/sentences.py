"""The sentence logger: each sentence of a generation as soon as it is complete.

Token text goes through an incremental :class:`~consumers.segment.SentenceSegmenter` whose
state is checkpointed with the worker's position, so a takeover continues mid-sentence
without losing or repeating text.  Each sentence is a record of the ``sentences`` output
stream in Redis (``GET /v1/streams/{id}/sentences``), committed exactly once, and a JSON line
on the sink (stdout, a file, or off), written after the commit: at least once, keyed by
``(generation, index)``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, cast

from broker.errors import ConsumerConfigError
from broker.events import Event
from broker.settings import Settings
from consumers.runtime import ConsumerType, Generation
from consumers.segment import SentenceSegmenter

logger = logging.getLogger(__name__)


class JsonLinesSink:
    """Appends records as JSON lines: ``-`` is stdout, ``off`` nothing, else a file path.

    A file is opened for appending per batch, and each batch is one ``write``: several
    worker processes can share one file without interleaving lines, and a log rotation
    (the file renamed away) is followed.  Raises ``ConsumerConfigError`` for a file that
    cannot be opened."""

    def __init__(self, target: str) -> None:
        self.target = target
        if target not in ("-", "off"):
            try:
                with open(target, "a", encoding="utf-8"):
                    pass
            except OSError as exc:
                raise ConsumerConfigError(f"sentences sink {target!r}: {exc}") from exc

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.target == "off" or not records:
            return
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if self.target == "-":
            sys.stdout.write(lines)
            sys.stdout.flush()
            return
        with open(self.target, "a", encoding="utf-8") as out:
            out.write(lines)

    def close(self) -> None:
        """Nothing stays open between batches."""


def _segmenter(gen: Generation) -> SentenceSegmenter:
    seg = gen.scratch.get("seg")
    if seg is None:
        saved = gen.state.get("seg")
        seg = SentenceSegmenter.from_state(saved) if saved else SentenceSegmenter()
        gen.scratch["seg"] = seg
    return cast(SentenceSegmenter, seg)


class Sentences(ConsumerType):
    name = "sentences"

    def __init__(self, sink: JsonLinesSink | None = None) -> None:
        self.sink = sink or JsonLinesSink("off")

    @classmethod
    def from_settings(cls, settings: Settings) -> Sentences:
        return cls(JsonLinesSink(settings.sentences_sink))

    def token(self, gen: Generation, event: Event) -> None:
        if gen.state.get("since") is None:  # the first token of a sentence
            gen.state["since"], gen.state["since_seq"] = event.ts, event.seq
        self._emit(gen, _segmenter(gen).feed(event.text), event)

    def end(self, gen: Generation, event: Event) -> None:
        self._emit(gen, _segmenter(gen).flush(), event)

    def _emit(self, gen: Generation, sentences: list[str], event: Event) -> None:
        for text in sentences:
            gen.emit({
                "text": text,
                "started": gen.state.get("since") or event.ts,  # ts of its first token
                "completed": event.ts,  # ts of the entry that proved it complete
                "seq_first": gen.state.get("since_seq") or event.seq,
                "seq_last": event.seq,
            })
            # The next sentence began within this token (approximately: the segmenter
            # does not say where inside the token).
            gen.state["since"], gen.state["since_seq"] = event.ts, event.seq
        if sentences and not _segmenter(gen).pending:
            gen.state["since"] = gen.state["since_seq"] = None

    def checkpoint(self, gen: Generation) -> None:
        gen.state["seg"] = _segmenter(gen).state()

    def deliver(self, gen: Generation, records: list[dict[str, Any]]) -> None:
        now = time.time()
        self.sink.write([{**r, "logged": round(now, 6)} for r in records])

    def close(self) -> None:
        self.sink.close()
