"""What a provider is: one upstream call turned into normalized events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.events import ProviderEvent


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What a client asked for.  ``messages`` is always set (a prompt becomes one user
    message); ``params`` are passed through to the provider, which validates its own."""

    messages: list[dict[str, Any]]
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


class Provider(Protocol):
    """An upstream LLM.

    ``stream`` is an async generator over one upstream call.  It yields ``TextDelta`` and
    ``Usage`` events, and ends with exactly one ``Finish`` or ``UpstreamFailure``; an
    exception it raises is also turned into an ``error`` entry by the producer.  The producer
    may stop iterating at any point (cancel, deadline); the generator must then release the
    upstream request in its ``finally`` (``aclose`` runs it).
    """

    name: str

    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]: ...

    def model_for(self, request: GenerationRequest) -> str:
        """The model name this request will run on (for the generation's metadata)."""
        ...

    def validate(self, request: GenerationRequest) -> None:
        """Raise ``ProviderConfigError`` for a request this provider cannot run.  Called
        before the generation is created, so a bad request gets a 422 and starts nothing."""
        ...

    async def aclose(self) -> None:
        """Release what the provider holds (HTTP clients)."""
        ...
