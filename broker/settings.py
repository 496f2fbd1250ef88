"""The one settings object.

Built once at the edge (CLI, test fixture, embedding application) and passed down; nothing
below this module reads the environment.  Every field can be set from the environment with
the ``TOKENTEE_`` prefix; the few names that users already know from other tools
(``REDIS_URL``, ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``) are accepted without it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.keys import is_consumer_type

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_ORIGIN_RE = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENTEE_", extra="ignore", frozen=True)

    # --- Redis -------------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TOKENTEE_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis to use. Unset: start a private embedded redis-server.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="A redis:// or rediss:// REDIS_URL names a Redis Cluster node (same as a"
        " redis+cluster:// URL).",
    )
    key_prefix: str = Field(default="tokentee", description="Prefix of every Redis key.")
    redis_max_connections: int = Field(
        default=16, ge=2, description="Shared command pool size (blocking readers excluded)."
    )
    block_ms: int = Field(
        default=5_000, ge=100, description="BLOCK time of the hub's and listeners' XREADs."
    )
    redis_timeout_slack_seconds: float = Field(default=5.0, gt=0)

    # --- generations -------------------------------------------------------------------
    default_provider: str = "simulated"
    retention_seconds: int = Field(
        default=3_600, ge=1, description="TTL of a finished generation's keys."
    )
    max_entries: int = Field(
        default=100_000, ge=2, description="Cap on entries per generation (runaway guard)."
    )
    max_generation_seconds: float = Field(
        default=1_800.0, gt=0, description="Total deadline of one generation."
    )
    lease_seconds: float = Field(
        default=10.0, gt=0, description="A producer that misses its lease this long is lost."
    )
    append_batch: int = Field(default=512, ge=1, description="Max entries per append call.")
    append_retry_seconds: float = Field(
        default=10.0, ge=0, description="How long a producer retries a failing log write."
    )
    catalog_maxlen: int = Field(default=100_000, ge=100)
    control_maxlen: int = Field(default=10_000, ge=100)
    shutdown_grace_seconds: float = Field(
        default=5.0, ge=0,
        description="On SIGTERM, how long running generations get to finish before they end"
        " with error/shutdown.",
    )
    watchdog: bool = Field(
        default=True,
        description="Run the lease watchdog: end any replica's generation whose producer lost"
        " its lease with error/producer_lost, even when nobody reads it.",
    )

    # --- durable consumers and backpressure --------------------------------------------
    max_lag: int = Field(
        default=1_000, ge=0,
        description="A producer stays at most this many entries ahead of the slowest live"
        " consumer type on its generation (0: consumers never hold producers back).",
    )
    stall_timeout_seconds: float = Field(
        default=30.0, gt=0,
        description="A consumer type with no worker heartbeat for this long is reported as"
        " stalled and no longer holds producers back.",
    )
    claim_idle_seconds: float = Field(
        default=10.0, gt=0,
        description="A generation whose worker has not checked in for this long is taken over"
        " by another worker of the same type (XAUTOCLAIM).",
    )
    consumer_concurrency: int = Field(
        default=64, ge=1, description="Generations one consumer worker processes at once."
    )
    consumer_batch: int = Field(
        default=256, ge=1, description="Most entries a worker handles per checkpoint."
    )
    max_deliveries: int = Field(
        default=5, ge=1,
        description="Attempts at an entry whose handler keeps failing before it goes to the"
        " consumer type's dead-letter stream.",
    )
    consumers: str = Field(
        default="sentences,analytics",
        description="Consumer types `tokentee serve` runs in-process (comma-separated; empty:"
        " none, as with --no-consumers).",
    )
    sentences_sink: str = Field(
        default="-",
        description="Where the sentence logger writes JSON lines: '-' (stdout), 'off', or a"
        " file path (appended to).",
    )

    # --- SSE ---------------------------------------------------------------------------
    heartbeat_seconds: float = Field(default=15.0, gt=0)
    send_timeout_seconds: float = Field(default=30.0, gt=0)
    client_queue_size: int = Field(
        default=256, ge=1, description="Entries buffered per reader before it reads the log."
    )
    catchup_batch: int = Field(default=500, ge=1, description="XRANGE COUNT while catching up.")
    hub_batch_ms: float = Field(
        default=2.0, ge=0,
        description="After a hub read that returned entries, wait this long before the next"
        " one, so one XREAD carries the entries of many streams.",
    )

    # --- HTTP server -------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    public_url: str | None = Field(
        default=None, description="Base URL used in events_url; default: the request's own."
    )
    max_body_bytes: int = Field(
        default=1_000_000, ge=1_024,
        description="Largest request body (counted while reading, chunked ones too): 413.",
    )

    # --- security and limits (README "Security") ----------------------------------------
    api_tokens: SecretStr = Field(
        default=SecretStr(""),
        description="Comma-separated bearer tokens of producers and service clients. Empty:"
        " authentication is off (loopback use only; serve warns on other addresses).",
    )
    signing_key: SecretStr | None = Field(
        default=None,
        description="Key that signs browsers' read tokens; the same on every replica."
        " Default: derived from TOKENTEE_API_TOKENS.",
    )
    read_token_ttl_seconds: int = Field(
        default=600, ge=1,
        description="How long a read token opens its event stream (an open stream is not"
        " cut when it expires).",
    )
    cors_origins: str = Field(
        default="",
        description="Comma-separated origins (scheme://host[:port]) that browsers may call"
        " the API from. Empty: no CORS headers.",
    )
    trusted_proxies: str = Field(
        default="",
        description="Comma-separated proxy addresses or networks whose X-Forwarded-For is"
        " believed when limits identify a client by address.",
    )
    max_sse_per_client: int = Field(
        default=32, ge=0,
        description="Open event streams per client (bearer token, else address) across all"
        " replicas: 429 beyond (0: no limit).",
    )
    max_active_generations: int = Field(
        default=1_000, ge=0,
        description="Generations one API process runs at once: 503 beyond (0: no limit).",
    )
    max_prompt_chars: int = Field(
        default=200_000, ge=1,
        description="Characters of a request's messages (prompt included): 413 beyond.",
    )

    # --- operations --------------------------------------------------------------------
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="'json': one JSON object per log line, with generation_id where there is"
        " one (also --log-format).",
    )
    ready_timeout_seconds: float = Field(
        default=1.0, gt=0, description="How long GET /readyz waits for Redis to answer PING."
    )

    # --- upstream ----------------------------------------------------------------------
    openai_base_url: str = Field(
        default="https://api.openai.com/v1",
        validation_alias=AliasChoices(
            "TOKENTEE_OPENAI_BASE_URL", "OPENAI_BASE_URL", "openai_base_url"
        ),
    )
    openai_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "TOKENTEE_OPENAI_API_KEY", "OPENAI_API_KEY", "openai_api_key"
        ),
    )
    openai_model: str = "gpt-4o-mini"
    anthropic_base_url: str = Field(
        default="https://api.anthropic.com",
        validation_alias=AliasChoices(
            "TOKENTEE_ANTHROPIC_BASE_URL", "ANTHROPIC_BASE_URL", "anthropic_base_url"
        ),
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "TOKENTEE_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY", "anthropic_api_key"
        ),
    )
    anthropic_model: str = "claude-sonnet-4-5"
    anthropic_max_tokens: int = Field(
        default=4_096, ge=1,
        description="max_tokens of anthropic requests that give none (Messages requires it).",
    )
    upstream_connect_timeout: float = Field(default=10.0, gt=0)
    upstream_read_timeout: float = Field(default=60.0, gt=0)
    upstream_max_line_bytes: int = Field(default=1_048_576, ge=1_024)
    upstream_retries: int = Field(
        default=2, ge=0,
        description="Retries of an upstream call that failed before its first token (could"
        " not connect, 429, 5xx).  After the first token a failure ends the generation.",
    )
    upstream_retry_base_seconds: float = Field(
        default=0.5, gt=0,
        description="First retry delay; it doubles per retry, with full jitter.",
    )
    upstream_retry_max_wait_seconds: float = Field(
        default=30.0, ge=0,
        description="Longest wait before a retry.  An upstream asking (Retry-After) for"
        " longer is not retried: the generation ends with its error.",
    )
    upstream_trust_env: bool = Field(
        default=True,
        description="Let the upstream HTTP client use HTTP(S)_PROXY, NO_PROXY and SSL_CERT_FILE"
        " from the environment (the API key then goes through that proxy).",
    )

    @classmethod
    def env_names(cls) -> list[str]:
        """Every environment variable the settings read, in field order: ``TOKENTEE_<FIELD>``
        for each field, and after it the unprefixed alias a field also accepts
        (``REDIS_URL``, ``OPENAI_API_KEY``, ...)."""
        return [name for names in cls.env_names_by_field().values() for name in names]

    @classmethod
    def env_names_by_field(cls) -> dict[str, list[str]]:
        """The environment variables of each field (see :meth:`env_names`)."""
        prefix = cls.model_config.get("env_prefix", "")
        out: dict[str, list[str]] = {}
        for field, info in cls.model_fields.items():
            alias = info.validation_alias
            if isinstance(alias, AliasChoices):
                # The field's own name is also a choice (for keyword construction), not an
                # environment variable.
                out[field] = [c for c in alias.choices if isinstance(c, str) and c != field]
            else:
                out[field] = [f"{prefix}{field}".upper()]
        return out

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        if value is not None and not value.startswith(schemes):
            raise ValueError("REDIS_URL must start with " + ", ".join(schemes))
        return value

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.fullmatch(value):
            raise ValueError("key_prefix must be 1-64 characters of [A-Za-z0-9_.:-]")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: str) -> str:
        origins = [o.strip().rstrip("/") for o in value.split(",") if o.strip()]
        for origin in origins:
            if not _ORIGIN_RE.fullmatch(origin):
                raise ValueError(
                    f"CORS origin {origin!r} must be scheme://host[:port] (no '*': list them)"
                )
        return ",".join(origins)

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: str) -> str:
        networks = [n.strip() for n in value.split(",") if n.strip()]
        for network in networks:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad one
        return ",".join(networks)

    @field_validator("consumers")
    @classmethod
    def _check_consumers(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        for name in names:
            if not is_consumer_type(name):
                raise ValueError(f"consumer type {name!r} must match [a-z][a-z0-9_-]{{0,31}}")
        return ",".join(names)

    @property
    def consumer_types(self) -> list[str]:
        return [n for n in self.consumers.split(",") if n]

    @property
    def bearer_tokens(self) -> list[str]:
        return [t.strip() for t in self.api_tokens.get_secret_value().split(",") if t.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o for o in self.cors_origins.split(",") if o]

    @property
    def trusted_proxy_list(self) -> list[str]:
        return [p.strip() for p in self.trusted_proxies.split(",") if p.strip()]

    @property
    def consumer_heartbeat_seconds(self) -> float:
        """How often a worker checks in: well inside both the claim and the stall timeouts."""
        return min(self.claim_idle_seconds, self.stall_timeout_seconds) / 4

    @property
    def lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    @property
    def redis_socket_timeout(self) -> float:
        """Socket timeout for every Redis connection: above the BLOCK time, never None.

        redis-py raises ``TimeoutError`` when a blocking read outlives the socket timeout,
        and ``None`` would let a half-open socket hang forever.
        """
        return self.block_ms / 1000 + self.redis_timeout_slack_seconds
