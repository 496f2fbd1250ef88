"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker.presence import MAX_CANCEL_UNREAD_AFTER


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class CreateStream(BaseModel):
    """``POST /v1/streams``: exactly one of ``prompt`` or ``messages``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, min_length=1, max_length=1_000_000)
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=10_000)
    provider: str | None = Field(default=None, min_length=1, max_length=64)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    params: dict[str, Any] = Field(default_factory=dict)
    channel: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$",
                                description="announce the generation on this channel")
    cancel_unread_after: float | None = Field(
        default=None, gt=0, le=MAX_CANCEL_UNREAD_AFTER, strict=True, allow_inf_nan=False,
        description="cancel the generation (cancelled, reason unread) once nobody has read"
        " it for this many seconds, counted from its creation; absent: never",
    )

    @model_validator(mode="after")
    def _one_input(self) -> CreateStream:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def message_dicts(self) -> list[dict[str, Any]]:
        if self.messages is None:
            return [{"role": "user", "content": self.prompt}]
        return [m.model_dump(exclude_none=True) for m in self.messages]


class StreamCreated(BaseModel):
    id: str
    events_url: str
    status_url: str
    provider: str
    model: str
    created: float
    read_token: str = Field(
        description="for a browser: opens events_url as ?token=... for read_token_expires_in"
        " seconds; reads this generation only"
    )
    read_token_expires_in: int


class ReadToken(BaseModel):
    token: str = Field(description="pass as ?token= on the event-stream URL")
    expires_in: int = Field(description="seconds the token can open the stream")
    events_url: str


class StreamStatus(BaseModel):
    id: str
    status: Literal["running", "done", "error", "cancelled"]
    text: str
    provider: str
    model: str
    created: float
    finished: float | None
    finish_reason: str | None
    last_event_id: int = Field(description="id of the newest event in the log")
    usage: dict[str, Any] | None = None
    error_code: str | None = None
    cancel_reason: str | None = Field(
        default=None, description="why a cancelled generation was cancelled: requested, unread"
    )


class CancelAccepted(BaseModel):
    id: str
    status: str


class ConsumerProgress(BaseModel):
    consumer: str = Field(description="the consumer type")
    processed_seq: int = Field(description="id of the last event the consumer has processed")
    complete: bool = Field(description="the consumer has processed the terminal event")


class Sentence(BaseModel):
    model_config = ConfigDict(extra="allow")

    generation: str
    index: int = Field(description="1-based position of the sentence in the generation")
    text: str
    started: float = Field(description="unix time of the token that began the sentence")
    completed: float = Field(description="unix time of the entry that completed it")
    seq_first: int
    seq_last: int


class StreamSentences(ConsumerProgress):
    id: str
    sentences: list[Sentence]


class GapStats(BaseModel):
    p50: float | None
    p95: float | None
    max: float | None
    count: int


class StreamStats(ConsumerProgress):
    id: str
    status: str
    provider: str
    model: str
    tokens: int
    characters: int
    time_to_first_token_ms: float | None
    duration_ms: float | None
    tokens_per_second: float | None
    inter_token_gap_ms: GapStats
    finish_reason: str | None
    error_code: str | None
    usage: dict[str, Any] | None
    lost_entries: int


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's request body.  ``provider`` (an extension)
    picks the upstream; every field other than the ones below is passed to the provider
    as a parameter, which accepts or refuses it."""

    model_config = ConfigDict(extra="allow")

    messages: list[Message] = Field(min_length=1, max_length=10_000)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    provider: str | None = Field(default=None, min_length=1, max_length=64)

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]
