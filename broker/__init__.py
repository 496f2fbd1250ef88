"""tokentee: read an LLM token stream once, log it in Redis Streams, fan it out.

The public surface for Python services::

    from broker import Broker, GenerationRequest, Settings
"""

from broker.errors import (
    GenerationNotFound,
    IdempotencyConflict,
    InvalidResumePoint,
    ProviderConfigError,
    ShuttingDown,
    TokenteeError,
    UnknownProvider,
)
from broker.events import TERMINAL_TYPES, Event
from broker.hub import Cursor
from broker.manager import GenerationInfo
from broker.providers.base import GenerationRequest, Provider
from broker.service import Broker, GenerationState
from broker.settings import Settings

__all__ = [
    "TERMINAL_TYPES",
    "Broker",
    "Cursor",
    "Event",
    "GenerationInfo",
    "GenerationNotFound",
    "GenerationRequest",
    "GenerationState",
    "IdempotencyConflict",
    "InvalidResumePoint",
    "Provider",
    "ProviderConfigError",
    "Settings",
    "ShuttingDown",
    "TokenteeError",
    "UnknownProvider",
]
