"""``tokentee upstream``: a simulated OpenAI-compatible LLM server.

It lets the whole stack run without an API key (``docker compose up`` points the API
replicas' ``openai`` provider at it through ``OPENAI_BASE_URL``), and lets tests exercise the
real HTTP provider end to end.  The text is the simulated provider's (deterministic prose,
paced at ``rate`` tokens per second), and the chunks are encoded by the same code as the
broker's own ``?format=openai`` stream, so what it sends is what OpenAI clients accept.

- ``POST /v1/chat/completions``: ``stream: true`` gives ``chat.completion.chunk`` SSE ending
  in ``data: [DONE]`` (with a usage chunk when ``stream_options.include_usage``), otherwise one
  ``chat.completion``.  ``max_tokens`` (or ``max_completion_tokens``) sets the length;
  default ``tokens``.
- ``GET /v1/models``: the one model; ``GET /healthz``: liveness.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.config import LOGGING_CONFIG

from broker.errors import ProviderConfigError
from broker.events import Event, Finish, TextDelta, UpstreamFailure, Usage
from broker.formats import OpenAIChunks, completion
from broker.providers.base import GenerationRequest
from broker.providers.simulated import SimulatedProvider

__all__ = ["create_upstream_app", "run_upstream"]

MODEL = "simulated-1"


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": None}}, status_code=status)


async def _events(provider: SimulatedProvider, request: GenerationRequest
                  ) -> AsyncIterator[Event]:
    """The simulated provider's output as log-style events (what the encoders take)."""
    seq = 0
    usage: dict[str, Any] | None = None
    async for item in provider.stream(request):
        match item:
            case TextDelta(text=text):
                seq += 1
                yield Event(seq=seq, type="token", data={"text": text})
            case Usage(usage=reported):
                usage = reported
            case Finish(reason=reason):
                data: dict[str, Any] = {"finish_reason": reason}
                if usage is not None:
                    data["usage"] = usage
                yield Event(seq=seq + 1, type="done", data=data)
            case UpstreamFailure(code=code, message=message):
                yield Event(seq=seq + 1, type="error", data={"code": code, "message": message})


def create_upstream_app(*, tokens: int = 64, rate: float = 20.0) -> Starlette:
    """The simulated upstream.  ``tokens``: completion length for requests that set no
    ``max_tokens``; ``rate``: tokens per second (0: as fast as possible)."""
    provider = SimulatedProvider()

    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "messages must be a list", "messages")
        length = body.get("max_completion_tokens", body.get("max_tokens", tokens))
        model = str(body.get("model") or MODEL)
        gen = GenerationRequest(messages=body["messages"], model=model,
                                params={"max_tokens": length, "tokens_per_second": rate})
        try:
            provider.validate(gen)
        except ProviderConfigError as exc:
            return _error(400, str(exc).replace("params.", ""), "max_tokens")
        gid = f"sim-{secrets.token_hex(8)}"
        created = time.time()
        if not body.get("stream"):
            events = [event async for event in _events(provider, gen)]
            return JSONResponse(completion(gid, model, created, events))
        options = body.get("stream_options")
        encoder = OpenAIChunks(gid, model, created, include_usage=bool(
            isinstance(options, dict) and options.get("include_usage")))

        async def frames() -> AsyncIterator[bytes]:
            async for event in _events(provider, gen):
                yield encoder.encode(event)

        return StreamingResponse(frames(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "tokentee"}]})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])


async def run_upstream(host: str, port: int, *, tokens: int, rate: float,
                       log_level: str = "info", json_logs: bool = False) -> None:
    """Serve until SIGINT/SIGTERM.  Binds first and prints the base URL to stdout (``port``
    0 picks a free port), so that whoever started it can read where it listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)  # connections wait in the backlog until uvicorn serves them
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        print(f"tokentee upstream: OPENAI_BASE_URL=http://{shown}:{bound}/v1", flush=True)
        config = uvicorn.Config(create_upstream_app(tokens=tokens, rate=rate),
                                log_level=log_level, access_log=log_level == "debug",
                                log_config=None if json_logs else LOGGING_CONFIG)
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        sock.close()
