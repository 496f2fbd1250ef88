"""Upstream providers and the registry that the broker looks them up in."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from broker.errors import UnknownProvider
from broker.providers.base import GenerationRequest, Provider
from broker.providers.simulated import SimulatedProvider
from broker.settings import Settings

__all__ = ["GenerationRequest", "Provider", "ProviderRegistry", "SimulatedProvider"]


class ProviderRegistry(Mapping[str, Provider]):
    """The providers one broker process can use, by name.  Owns their HTTP clients."""

    def __init__(self, providers: Mapping[str, Provider]) -> None:
        self._providers = dict(providers)

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderRegistry:
        from broker.providers.anthropic import AnthropicProvider
        from broker.providers.openai import OpenAIProvider

        return cls({"simulated": SimulatedProvider(), "openai": OpenAIProvider(settings),
                    "anthropic": AnthropicProvider(settings)})

    def __getitem__(self, name: str) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            raise UnknownProvider(
                f"unknown provider {name!r} (available: {', '.join(sorted(self._providers))})"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._providers)

    def __len__(self) -> int:
        return len(self._providers)

    def validate(self, name: str, request: GenerationRequest) -> Provider:
        """The provider called ``name``, after it checked the request (raises
        ``UnknownProvider`` or ``ProviderConfigError``)."""
        provider = self[name]
        provider.validate(request)
        return provider

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
