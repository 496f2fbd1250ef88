"""Who may call the API: bearer tokens, browsers' read tokens, client identity, redaction.

Framework-free; ``broker/api/security.py`` turns it into FastAPI dependencies.

- *Bearer tokens* (``TOKENTEE_API_TOKENS``) are for producers and service clients.  Each
  request's token is compared with every configured one in constant time.
- *Read tokens* are for browsers, whose ``EventSource`` cannot send headers: short-lived,
  signed (itsdangerous, HMAC-SHA1 over a timestamped payload), bound to one generation (or one
  channel) and passed as ``?token=`` on the event-stream routes only.
- No configured bearer token means authentication is off: meant for loopback use, and
  ``tokentee serve`` warns loudly when it listens elsewhere without tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from broker.settings import Settings

logger = logging.getLogger(__name__)

READ_TOKEN_SALT = "tokentee.read-token.v1"


class AuthError(Exception):
    """A request that is not allowed.  ``status`` is 401 (no or bad credentials) or 403 (good
    credentials for something else)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Authenticator:
    """Checks bearer tokens and mints and checks read tokens, from one settings object."""

    def __init__(self, settings: Settings) -> None:
        self._tokens = [t.encode() for t in settings.bearer_tokens]
        self.ttl = settings.read_token_ttl_seconds
        if settings.signing_key is not None:
            key = settings.signing_key.get_secret_value().encode()
        elif self._tokens:
            # Replicas configured with the same tokens agree on the key without another secret.
            key = hashlib.sha256(b"tokentee signing key\0" + b"\0".join(sorted(self._tokens)))\
                .digest()
        else:
            key = secrets.token_bytes(32)  # auth is off: read tokens are never required
        self._serializer = URLSafeTimedSerializer(key, salt=READ_TOKEN_SALT)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def bearer(self, authorization: str | None) -> str | None:
        """The client id (a digest, never the token) of a valid ``Authorization: Bearer``
        header; ``None`` without the header.  Raises :class:`AuthError` (401) for a wrong
        token or scheme."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "the Authorization header must be 'Bearer <token>'")
        given = token.strip().encode()
        # Compare with every token, whatever matches, so timing tells nothing.
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(given, known)
        if not matched:
            raise AuthError(401, "invalid bearer token")
        return "t:" + hashlib.sha256(given).hexdigest()[:32]

    def mint(self, scope: str) -> str:
        """A read token for ``scope`` (``generation_scope(gid)`` or ``channel_scope(name)``)."""
        return self._serializer.dumps(scope)

    def check_read_token(self, token: str, scope: str) -> None:
        """Raises :class:`AuthError`: 401 for a forged, damaged or expired token, 403 for a
        token of another generation or channel."""
        try:
            granted = self._serializer.loads(token, max_age=self.ttl)
        except SignatureExpired as exc:
            raise AuthError(401, "read token expired; ask for a new one") from exc
        except BadSignature as exc:
            raise AuthError(401, "invalid read token") from exc
        if granted != scope:
            raise AuthError(403, "this read token is for another stream")


def generation_scope(gid: str) -> str:
    return f"g:{gid}"


def channel_scope(name: str) -> str:
    return f"c:{name}"


# --- client identity (for per-client limits) ------------------------------------------------


class ClientAddresses:
    """The address of the client behind a request, believing ``X-Forwarded-For`` only when
    the peer is a trusted proxy (``TOKENTEE_TRUSTED_PROXIES``).  The header is read from the
    right: the first address that is not a trusted proxy is the client."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in trusted]

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def client(self, peer: str | None, forwarded_for: str | None) -> str:
        address = peer or "unknown"
        if forwarded_for and self._is_trusted(address):
            for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
                if not hop:
                    continue
                address = hop
                if not self._is_trusted(hop):
                    break
        return address[:64]


# --- keeping tokens out of logs ---------------------------------------------------------------

_QUERY_TOKEN_RE = re.compile(r"((?:^|[?&;\s])token=)[^&\s\"']*")
_BEARER_RE = re.compile(r"(Bearer\s+)[^\s\"',]+", re.IGNORECASE)
REDACTED = "[redacted]"


def redact(text: str, secrets_: Iterable[str] = ()) -> str:
    text = _QUERY_TOKEN_RE.sub(lambda m: m.group(1) + REDACTED, text)
    text = _BEARER_RE.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in secrets_:
        text = text.replace(secret, REDACTED)
    return text


class RedactTokens(logging.Filter):
    """Rewrites a record's message and arguments so that no ``?token=`` value, bearer
    token or configured API token survives.  Argument by argument, because uvicorn's access
    formatter unpacks ``record.args`` (the request line is one of them)."""

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        super().__init__()
        self.tokens = sorted(set(tokens), key=len, reverse=True)

    def _clean(self, value: object) -> object:
        return redact(value, self.tokens) if isinstance(value, str) else value

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, self.tokens)
        args: Any = record.args
        if isinstance(args, tuple):
            record.args = tuple(self._clean(a) for a in args)
        elif isinstance(args, Mapping):
            record.args = {k: self._clean(v) for k, v in args.items()}
        return True


_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "broker", "consumers")


def install_redaction(settings: Settings) -> RedactTokens:
    """Put one :class:`RedactTokens` on the loggers that print request lines and on every
    handler they have now (filters on a logger do not see records propagated from its
    children; filters on a handler see all).  Idempotent; call after logging is configured
    (uvicorn configures its loggers when its ``Config`` is built)."""
    tokens = settings.bearer_tokens
    if settings.signing_key is not None:
        tokens.append(settings.signing_key.get_secret_value())
    flt = RedactTokens(tokens)
    for name in _LOGGERS:
        target = logging.getLogger(name)
        for holder in (target, *target.handlers):
            for old in [f for f in holder.filters if isinstance(f, RedactTokens)]:
                holder.removeFilter(old)
            holder.addFilter(flt)
    return flt


def warn_if_open(settings: Settings) -> bool:
    """Log a loud warning (and return True) when the API listens beyond loopback with
    authentication off."""
    if settings.bearer_tokens or is_loopback(settings.host):
        return False
    logger.warning(
        "AUTHENTICATION IS OFF and the API listens on %s: anyone who can reach this port"
        " can start generations and read them. Set TOKENTEE_API_TOKENS (see README,"
        " Security), or bind to 127.0.0.1.", settings.host,
    )
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
