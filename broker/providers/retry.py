"""Retrying an upstream call that failed before its first token.

A provider's attempt is an async iterator of provider events that reports failures as
:class:`UpstreamFailure` (never raising).  :func:`with_retries` runs attempts while the
failure is ``retryable`` (the request did not get through, 429, 5xx) *and nothing has been
yielded yet*: once a token has gone out, a retry would produce a second, different text, so
the failure ends the generation.  Delays use exponential backoff with full jitter, or the
upstream's own ``Retry-After`` / ``retry-after-ms``, capped by
``upstream_retry_max_wait_seconds`` (asked for longer, we give up at once rather than hold the
generation).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing

from broker.events import ProviderEvent, UpstreamFailure, Usage
from broker.settings import Settings

logger = logging.getLogger(__name__)


async def with_retries(
    attempt: Callable[[], AsyncIterator[ProviderEvent]], settings: Settings, name: str,
) -> AsyncIterator[ProviderEvent]:
    for number in range(settings.upstream_retries + 1):
        failure: UpstreamFailure | None = None
        started = False
        held: list[ProviderEvent] = []  # usage before any output: dropped if we retry
        async with aclosing(attempt()) as events:  # type: ignore[type-var]
            async for event in events:
                if (isinstance(event, UpstreamFailure) and event.retryable and not started
                        and number < settings.upstream_retries):
                    failure = event
                    break
                if not started and isinstance(event, Usage):
                    held.append(event)
                    continue
                started = True
                for earlier in held:
                    yield earlier
                held = []
                yield event
        if failure is None:
            return
        delay = _delay(failure, number, settings)
        if delay is None:
            logger.warning("%s: %s, asked to wait %.0f s: not retried", name, failure.code,
                           failure.retry_after or 0)
            yield failure
            return
        logger.warning("%s: %s before the first token; retry %d of %d in %.2f s", name,
                       failure.code, number + 1, settings.upstream_retries, delay)
        await asyncio.sleep(delay)


def _delay(failure: UpstreamFailure, number: int, settings: Settings) -> float | None:
    if failure.retry_after is not None:
        wanted = max(0.0, failure.retry_after)
        return wanted if wanted <= settings.upstream_retry_max_wait_seconds else None
    ceiling = min(settings.upstream_retry_base_seconds * 2 ** number,
                  settings.upstream_retry_max_wait_seconds)
    return random.uniform(0, ceiling)  # full jitter: retries of many generations spread out


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or an
    HTTP date); ``None`` if neither is given or readable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
