"""``tokentee``: the command line.  Parses arguments and hands over; logic lives elsewhere."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from pydantic import ValidationError

from broker.logs import configure_logging
from broker.settings import Settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Read an LLM token stream once; fan it out through Redis Streams.",
)


def _settings(**overrides: object) -> Settings:
    """The settings, or exit 2 with one line per invalid one (named by its variables)."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        names = Settings.env_names_by_field()
        for error in exc.errors():
            loc = str(error["loc"][0]) if error["loc"] else ""
            where = next((" or ".join(env) for field, env in names.items()
                          if loc == field or loc.upper() in env), loc)
            typer.echo(f"error: invalid setting {where}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


def _env_epilog() -> str:
    names = [" or ".join(env) for env in Settings.env_names_by_field().values()]
    return (
        "Settings come from these environment variables (README.md, Configuration, says"
        " what each does; a TOKENTEE_ name wins over its unprefixed alias): "
        + ", ".join(names) + "."
    )


LogFormatOption = Annotated[str | None, typer.Option(
    "--log-format", help="'text' or 'json' (one JSON object per line, with generation_id);"
    " default: TOKENTEE_LOG_FORMAT, else text.",
)]


def _log_format(value: str | None) -> str | None:
    if value is not None and value not in ("text", "json"):
        raise typer.BadParameter("--log-format must be 'text' or 'json'")
    return value


@app.command(epilog=_env_epilog())
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    no_consumers: Annotated[bool, typer.Option(
        "--no-consumers", help="Do not run the durable consumers (TOKENTEE_CONSUMERS) here.",
    )] = False,
    log_format: LogFormatOption = None,
) -> None:
    """Run the HTTP API (embedded Redis and the simulated provider unless configured).

    Also runs one worker of each durable consumer type in TOKENTEE_CONSUMERS (sentences and
    analytics by default) unless --no-consumers.
    """
    from broker.errors import RedisUnavailable
    from broker.server import serve as run

    settings = _settings(host=host, port=port, consumers="" if no_consumers else None,
                         log_format=_log_format(log_format))
    configure_logging(log_level, settings.log_format)
    try:
        asyncio.run(run(settings, log_level=log_level.lower()))
    except RedisUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def consume(
    consumer_type: Annotated[str, typer.Argument(
        metavar="TYPE", help="sentences, analytics, or module:Class for your own type.",
    )],
    workers: Annotated[int, typer.Option(min=1, help="Worker processes to run.")] = 1,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    log_format: LogFormatOption = None,
) -> None:
    """Run durable consumer workers against the broker's Redis (REDIS_URL required).

    SIGTERM drains: no new generations, held ones finish or are checkpointed and handed
    over within TOKENTEE_SHUTDOWN_GRACE_SECONDS, then exit 0.
    """
    from broker.errors import ConsumerConfigError, RedisUnavailable
    from consumers.process import load_consumer_type, run_worker, supervise

    settings = _settings(log_format=_log_format(log_format))
    configure_logging(log_level, settings.log_format)
    try:
        if workers > 1:
            raise typer.Exit(supervise(consumer_type, workers, settings, log_level))
        status = asyncio.run(run_worker(settings, load_consumer_type(consumer_type, settings)))
    except (ConsumerConfigError, RedisUnavailable) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(status)


@app.command()
def demo(
    tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 60,
    rate: Annotated[float, typer.Option(help="Tokens per second.")] = 15.0,
) -> None:
    """Show one generation arriving live at three independent readers."""
    from broker.demo import run_demo

    raise typer.Exit(asyncio.run(run_demo(_settings(), tokens=tokens, rate=rate)))


@app.command()
def bench(
    generations: Annotated[int, typer.Option(help="Concurrent generations.")] = 10,
    readers: Annotated[int, typer.Option(help="Readers per generation.")] = 10,
    tokens: Annotated[int, typer.Option(help="Tokens per generation.")] = 200,
    rate: Annotated[float, typer.Option(help="Tokens per second per generation.")] = 50.0,
    via: Annotated[str, typer.Option(help="Readers through 'api' (Python) or 'sse' (HTTP).")] = (
        "api"
    ),
    consumers: Annotated[bool, typer.Option(
        "--consumers", help="Also run the sentence logger and analytics counter (with"
        " backpressure) and report when they had processed everything.",
    )] = False,
) -> None:
    """Measure fan-out: deliveries, latency, CPU and Redis connections; prints JSON."""
    from broker.bench import run_bench

    if via not in ("api", "sse"):
        raise typer.BadParameter("--via must be 'api' or 'sse'")
    ok = asyncio.run(
        run_bench(_settings(), generations=generations, readers=readers, tokens=tokens,
                  rate=rate, via=via, consumers=consumers)
    )
    raise typer.Exit(0 if ok else 1)


@app.command()
def upstream(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind (0: any free"
                                      " one).")] = 9000,
    tokens: Annotated[int, typer.Option(min=0, help="Completion length of requests that"
                                        " give no max_tokens.")] = 64,
    rate: Annotated[float, typer.Option(min=0, help="Tokens per second (0: as fast as"
                                        " possible).")] = 20.0,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    log_format: LogFormatOption = None,
) -> None:
    """Serve a simulated OpenAI-compatible LLM (POST /v1/chat/completions, streaming or
    not), to run the stack without an API key: set OPENAI_BASE_URL=http://HOST:PORT/v1 and
    TOKENTEE_DEFAULT_PROVIDER=openai on the API.  Prints that URL once listening."""
    from broker.upstream import run_upstream

    fmt = _settings(log_format=_log_format(log_format)).log_format
    configure_logging(log_level, fmt)
    asyncio.run(run_upstream(host, port, tokens=tokens, rate=rate, log_level=log_level.lower(),
                             json_logs=fmt == "json"))


def main() -> None:
    app()
