"""A deterministic upstream with no network: the default provider.

It is what the demo, the tests and the benchmarks use, so its output must be reproducible:
the same request always yields the same tokens.  Parameters (``params`` of the request):

- ``text``: the exact text to stream (split into word-sized tokens, whitespace kept); or
- ``max_tokens``: how many tokens of generated prose to stream (default 64);
- ``tokens_per_second``: pace (default 50; ``0`` means as fast as possible);
- ``fail_after``: stream this many tokens, then report an upstream error (for tests/demos).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, overload

from broker.errors import ProviderConfigError
from broker.events import Finish, ProviderEvent, TextDelta, UpstreamFailure, Usage
from broker.providers.base import GenerationRequest

_TOKEN_RE = re.compile(r"\s*\S+|\s+$")
_PROSE = (
    "the broker reads the stream once and every reader gets every token in order ."
    " a late joiner replays from the start , and a reader that drops resumes where it left"
    " off . slow readers read the log at their own pace , so nobody waits for anybody ."
)
_WORDS: list[str] = re.findall(r"\S+", _PROSE)
_ALLOWED = frozenset({"text", "max_tokens", "tokens_per_second", "fail_after"})
MAX_SIMULATED_TOKENS = 1_000_000
DEFAULT_TOKENS_PER_SECOND = 50.0


def tokenize(text: str) -> list[str]:
    """Split ``text`` into tokens that concatenate back to exactly ``text``."""
    return _TOKEN_RE.findall(text)


def _prose_token(i: int) -> str:
    word = _WORDS[i % len(_WORDS)]
    if i == 0 or _WORDS[(i - 1) % len(_WORDS)] == ".":
        word = word.capitalize()
    return word if i == 0 or word in {".", ","} else " " + word


class ProseTokens(Sequence[str]):
    """``count`` deterministic tokens of prose (word-sized, each with its leading space),
    computed on access: a million-token request must not build a million strings up front
    on the event loop."""

    def __init__(self, count: int) -> None:
        self._n = count

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [_prose_token(i) for i in range(*index.indices(self._n))]
        if not -self._n <= index < self._n:
            raise IndexError(index)
        return _prose_token(index % self._n)


def _number(params: dict[str, Any], name: str, default: float, *, integer: bool) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProviderConfigError(f"params.{name} must be a number")
    if integer and not isinstance(value, int):
        raise ProviderConfigError(f"params.{name} must be an integer")
    if value < 0:
        raise ProviderConfigError(f"params.{name} must be >= 0")
    return value


class SimulatedProvider:
    name = "simulated"

    def validate(self, request: GenerationRequest) -> None:
        """Raise :class:`ProviderConfigError` for parameters this provider cannot honour."""
        self._plan(request)

    async def aclose(self) -> None:
        return None

    def model_for(self, request: GenerationRequest) -> str:
        return request.model or "simulated-1"

    def _plan(
        self, request: GenerationRequest
    ) -> tuple[Sequence[str], str, float, int | None]:
        params = request.params
        unknown = set(params) - _ALLOWED
        if unknown:
            raise ProviderConfigError(
                f"unknown params for provider simulated: {', '.join(sorted(unknown))}"
                f" (allowed: {', '.join(sorted(_ALLOWED))})"
            )
        rate = _number(params, "tokens_per_second", DEFAULT_TOKENS_PER_SECOND, integer=False)
        fail_after = params.get("fail_after")
        if fail_after is not None:
            fail_after = int(_number(params, "fail_after", 0, integer=True))
        if "text" in params:
            text = params["text"]
            if not isinstance(text, str):
                raise ProviderConfigError("params.text must be a string")
            tokens = tokenize(text)
            if "max_tokens" in params:
                limit = int(_number(params, "max_tokens", 0, integer=True))
                if limit < len(tokens):
                    return tokens[:limit], "length", rate, fail_after
            return tokens, "stop", rate, fail_after
        count = int(_number(params, "max_tokens", 64, integer=True))
        if count > MAX_SIMULATED_TOKENS:
            raise ProviderConfigError(f"params.max_tokens must be <= {MAX_SIMULATED_TOKENS}")
        return ProseTokens(count), "length", rate, fail_after

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        tokens, reason, rate, fail_after = self._plan(request)
        loop = asyncio.get_running_loop()
        start = loop.time()
        prompt_tokens = sum(
            len(tokenize(str(m.get("content", "")))) for m in request.messages
        )
        for i, token in enumerate(tokens):
            if i == fail_after:
                break
            if rate > 0:
                # Pace against the start time, not per token, so rounding does not drift.
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            yield TextDelta(token)
        if fail_after is not None:
            yield UpstreamFailure("upstream_error", "simulated upstream failure")
            return
        yield Usage(
            {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            }
        )
        yield Finish(reason)
