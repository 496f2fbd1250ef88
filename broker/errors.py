"""The few exceptions tokentee raises."""

from __future__ import annotations


class TokenteeError(Exception):
    """Base class of tokentee's own errors."""


class GenerationNotFound(TokenteeError, LookupError):
    """No generation with this id exists (never did, or its retention expired)."""

    def __init__(self, gid: str) -> None:
        super().__init__(f"unknown generation {gid!r}")
        self.gid = gid


class InvalidResumePoint(TokenteeError, ValueError):
    """A resume id that is malformed or beyond what the generation has written."""


class UnknownProvider(TokenteeError, LookupError):
    """The request named a provider that is not configured."""


class ProviderConfigError(TokenteeError, ValueError):
    """A provider cannot run with the given settings or request parameters."""


class ShuttingDown(TokenteeError, RuntimeError):
    """This process is draining and starts no new generations."""


class EmbeddedRedisError(TokenteeError, RuntimeError):
    """The embedded redis-server could not be started."""


class UpstreamProtocolError(TokenteeError, ValueError):
    """The upstream response broke its wire format (bad SSE, bad JSON, oversized line)."""


class ConsumerConfigError(TokenteeError, ValueError):
    """A consumer type that cannot be loaded or set up (an unknown type, a sink that cannot
    be opened), or a worker without a Redis to work on."""


class IdempotencyConflict(TokenteeError, ValueError):
    """An ``Idempotency-Key`` that started a generation was reused with another request."""


class RedisUnavailable(TokenteeError, ConnectionError):
    """Redis could not be used at startup: unreachable, refused the credentials, or failed
    TLS verification.  The message names the URL with its password redacted."""


class AtCapacity(TokenteeError, RuntimeError):
    """This process already runs ``TOKENTEE_MAX_ACTIVE_GENERATIONS`` generations (HTTP 503
    with ``Retry-After``; another replica, or this one a little later, can take it)."""


class TooManyStreams(TokenteeError, RuntimeError):
    """The client already has ``TOKENTEE_MAX_SSE_PER_CLIENT`` open event streams (HTTP 429)."""
