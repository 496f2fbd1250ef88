"""Every Redis key name tokentee uses, and nothing else.

All keys of one generation carry the generation id as their Redis Cluster hash tag
(``<prefix>:{<id>}:...``), so the multi-key scripts that append entries and finish a
generation touch a single hash slot.  Process-wide keys (catalog, control stream, channels,
idempotency keys) have no tag: each is one key in a slot of its own, and no command names one
of them together with a generation's keys.  The few global keys that one script writes
together share a tag of their own (the consumers' liveness hashes; a type's totals).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

# Generation ids are what ``new_generation_id`` makes: url-safe base64, no braces, so the
# id can be a hash tag and a path segment without escaping.  Parsing accepts the same
# alphabet from user input and nothing else.
GENERATION_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
# Channel names: a conversation or an agent run that groups generations.
CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# Consumer type names become consumer group names and key segments.
CONSUMER_TYPE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


# Random bytes in a generation id: 144 bits, above the 128 that make an id unguessable
# (knowing an id is what lets a reader in when auth is off).  18 bytes are 24 base64
# characters without padding.
GENERATION_ID_BYTES = 18


def new_generation_id() -> str:
    """``g`` and 24 url-safe base64 characters (144 random bits from ``secrets``)."""
    return "g" + secrets.token_urlsafe(GENERATION_ID_BYTES)


def is_generation_id(value: str) -> bool:
    return bool(GENERATION_ID_RE.fullmatch(value))


def is_channel(value: str) -> bool:
    return bool(CHANNEL_RE.fullmatch(value))


def is_consumer_type(value: str) -> bool:
    return bool(CONSUMER_TYPE_RE.fullmatch(value))


def entry_id(seq: int) -> str:
    """Stream entry id of sequence number ``seq`` (1-based): ``0-<seq>``.

    Explicit ids make a retried append detectable (Redis refuses an id at or below the top
    entry) and let any reader see a gap as a jump in ``seq``.
    """
    return f"0-{seq}"


def seq_of(entry_id: str | bytes) -> int:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, seq = entry_id.partition("-")
    if ms != "0" or not seq.isdigit():
        raise ValueError(f"not a tokentee entry id: {entry_id!r}")
    return int(seq)


@dataclass(frozen=True, slots=True)
class GenerationKeys:
    """The keys of one generation (all in one hash slot)."""

    log: str  # stream: the entries
    meta: str  # hash: status, model, created, last_seq, ...
    text: str  # string: text accumulated so far
    lease: str  # string with TTL: present while a live producer owns the generation

    def all(self) -> tuple[str, str, str, str]:
        return (self.log, self.meta, self.text, self.lease)


@dataclass(frozen=True, slots=True)
class Keyspace:
    """Key builder for one prefix.  Tests isolate themselves by using their own prefix."""

    prefix: str

    def generation(self, gid: str) -> GenerationKeys:
        base = f"{self.prefix}:{{{gid}}}"
        return GenerationKeys(
            log=f"{base}:log", meta=f"{base}:meta", text=f"{base}:text", lease=f"{base}:lease"
        )

    @property
    def catalog(self) -> str:
        """Stream announcing every new generation."""
        return f"{self.prefix}:catalog"

    @property
    def control(self) -> str:
        """Stream of control messages (cancel requests) that every broker process follows."""
        return f"{self.prefix}:control"

    @property
    def figures(self) -> str:
        """Hash: each broker process's live figures for the console, a field per process
        (``<expiry ms> <JSON>``), written every second (``broker/figures.py``)."""
        return f"{self.prefix}:figures"

    def readers(self, gid: str) -> str:
        """Sorted set: one member per hub that has readers of a generation with the
        ``cancel_unread_after`` policy, scored by when its presence lapses (Redis clock, ms):
        a time to come while the hub has readers and refreshes it, the time its last reader
        left once it has none.  Only generations with the policy have one."""
        return f"{self.prefix}:{{{gid}}}:readers"

    # --- durable consumers ----------------------------------------------------------------
    # A consumer type's per-generation keys share the generation's hash tag, so a worker's
    # commit (checkpoint + output + waking a held producer) is one single-slot script.

    def checkpoint(self, gid: str, ctype: str) -> str:
        """Hash: a consumer type's position in one generation (seq, state, owner, ...)."""
        return f"{self.prefix}:{{{gid}}}:c:{ctype}"

    def output(self, gid: str, ctype: str) -> str:
        """Stream: the records a consumer type emitted for one generation (``0-<index>``)."""
        return f"{self.prefix}:{{{gid}}}:out:{ctype}"

    @property
    def _consumers(self) -> str:
        # One hash tag for the liveness keys, which one heartbeat script writes together.
        return f"{self.prefix}:{{{self.prefix}:consumers}}"

    @property
    def consumer_types(self) -> str:
        """Hash: consumer type -> last worker heartbeat (Redis clock, ms).  Producers are held
        back only by types whose heartbeat is recent."""
        return f"{self._consumers}:types"

    def consumer_workers(self, ctype: str) -> str:
        """Hash: worker id -> JSON status (heartbeat, generations in hand, lag)."""
        return f"{self._consumers}:{ctype}:workers"

    def dead_letters(self, ctype: str) -> str:
        """Stream: entries a consumer type gave up on after repeated failures."""
        return f"{self.prefix}:consumers:{ctype}:dlq"

    @property
    def dead_letter_counts(self) -> str:
        """Hash: consumer type -> number of entries dead-lettered (never trimmed)."""
        return f"{self._consumers}:dead-letters"

    def totals(self, ctype: str) -> str:
        """Hash: totals a consumer type adds once per generation (analytics counters)."""
        return f"{self.prefix}:{{consumers:{ctype}}}:totals"

    def totals_applied(self, ctype: str) -> str:
        """Sorted set (same slot as ``totals``): generations already added, by time."""
        return f"{self.prefix}:{{consumers:{ctype}}}:applied"

    def channel(self, name: str) -> str:
        """Stream: one entry per generation started in channel ``name``."""
        return f"{self.prefix}:chan:{name}"

    def idempotency(self, key: str) -> str:
        """String: the generation an ``Idempotency-Key`` started (hashed: any key is a safe
        key name)."""
        return f"{self.prefix}:idem:{hashlib.sha256(key.encode()).hexdigest()}"

    def sse_slots(self, client: str) -> str:
        """Sorted set: one member per open event stream of ``client`` (hashed: any client id
        is a safe key name), scored by when it expires (Redis clock, ms).  Replicas refresh
        their members; a crashed replica's age out."""
        return f"{self.prefix}:sse:{hashlib.sha256(client.encode()).hexdigest()[:32]}"

    def hub_wake(self, hub_id: str, tag: str | None = None) -> str:
        """Private stream a hub includes in its blocking read, to be woken for new streams.

        On a cluster a hub reads each hash slot separately, and the wake stream of a slot's
        read must be in that slot: ``tag`` is then the id of a generation in the slot, used
        as the key's hash tag."""
        if tag is None:
            return f"{self.prefix}:hub:{hub_id}:wake"
        return f"{self.prefix}:{{{tag}}}:hub:{hub_id}:wake"
