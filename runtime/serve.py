"""Serving models: one typed options model and one command, for two front doors and three interfaces.

`gallery serve CONFIG --addr HOST:PORT` and `python -m runtime --addr HOST:PORT [--model CONFIG]` (what LocalAI
starts) are the same typer command, `serve_command`, which fills a `ServeOptions` and calls `serve`. The
runtime's own entry point tolerates (and warns about) arguments it does not know, since an orchestrator may
pass more than this backend needs; `gallery serve` refuses them like any other command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Annotated, Any

import typer

from gallery.errors import UsageError

log = logging.getLogger("runtime")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclasses.dataclass
class ServeOptions:
    """Everything a server start takes, whichever command line it came from."""

    specs: list[str] = dataclasses.field(default_factory=list)  # models to serve (the first loads at start)
    addr: str | None = None  # gRPC HOST:PORT
    stdio: bool = False
    http: str | None = None  # OpenAI-compatible HTTP HOST:PORT
    api_key: str | None = None  # HTTP: required bearer key
    cors_origins: list[str] = dataclasses.field(default_factory=list)
    max_models: int = 1  # HTTP: models resident in memory at once
    any_model: bool = False  # HTTP: a request may name any spec (loaded on first use)
    load_timeout: float = 600.0
    options: list[str] = dataclasses.field(default_factory=list)  # load options, key:value
    model_path: str | None = None  # base folder for relative specs (LocalAI's models directory)
    catalog: str | None = None
    grace: float = 30.0
    allow_remote: bool = False
    insecure: bool = False
    max_message_mb: int = 64
    max_line_mb: int = 64
    parent_pid: int | None = None
    log_level: str = "INFO"

    def check(self) -> None:
        """Refuse contradictory or out-of-range options (UsageError, one line)."""
        if sum((bool(self.addr), self.stdio, bool(self.http))) != 1:
            raise UsageError("give exactly one of --addr HOST:PORT (gRPC), --http HOST:PORT and --stdio")
        if len(self.specs) > 1 and not self.http:
            raise UsageError(
                f"this interface serves one model at a time; got {len(self.specs)}: {' '.join(self.specs)} "
                "(the HTTP server serves several)"
            )
        if self.http and not self.specs and not self.any_model:
            raise UsageError("--http: name the models to serve (CONFIG …), or pass --any-model")
        if self.max_models < 1 or self.load_timeout <= 0:
            raise UsageError("--max-models must be at least 1 and --load-timeout positive")
        if self.grace < 0:
            raise UsageError(f"--grace must not be negative, got {self.grace}")
        for name in ("max_message_mb", "max_line_mb"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.log_level.upper() not in LOG_LEVELS:
            raise UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")


def _preload(host: Any, options: ServeOptions) -> Callable[[], Any] | None:
    if not options.specs:
        return None
    spec = options.specs[0]
    return lambda: host.load(spec, options.options, model_path=options.model_path)


def serve(options: ServeOptions) -> int:
    """Start the chosen interface and serve until told to stop; returns the exit code."""
    from runtime.lifecycle import setup_logging
    from runtime.load_options import parse_options

    options.check()
    parse_options(options.options)  # a bad load option fails here, before anything starts
    setup_logging(options.log_level)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # progress bars would garble the logs
    from runtime.host import ModelHost

    if options.stdio:
        from runtime.stdio import run_stdio

        host = ModelHost(interface="stdio", catalog=options.catalog)
        return run_stdio(
            host,
            preload=_preload(host, options),
            grace=options.grace,
            max_line_mb=options.max_line_mb,
            parent_pid=options.parent_pid,
        )
    from runtime.bind import check_bind

    if options.http:
        from runtime import http_server
        from runtime.pool import ModelPool

        check_bind(
            options.http,
            allow_remote=options.allow_remote,
            insecure=options.insecure,
            token=options.api_key,
            flag="--http",
            token_source=f"an API key (--api-key or {http_server.API_KEY_ENV})",
        )
        pool = ModelPool(
            options.specs,
            options=options.options,
            catalog=options.catalog,
            model_path=options.model_path,
            max_resident=options.max_models,
            any_model=options.any_model,
            load_timeout=options.load_timeout,
        )
        return asyncio.run(
            http_server.serve(
                options.http,
                pool,
                api_key=options.api_key,
                cors_origins=options.cors_origins,
                grace=options.grace,
                max_body_mb=options.max_message_mb,
                parent_pid=options.parent_pid,
            )
        )
    from runtime.grpc_server import AUTH_ENV
    from runtime.grpc_server import serve as serve_grpc

    assert options.addr is not None
    token = os.environ.get(AUTH_ENV) or None
    check_bind(options.addr, allow_remote=options.allow_remote, insecure=options.insecure, token=token)
    host = ModelHost(interface="grpc", catalog=options.catalog)
    return asyncio.run(
        serve_grpc(
            options.addr,
            host,
            token=token,
            grace=options.grace,
            max_message_mb=options.max_message_mb,
            parent_pid=options.parent_pid,
            preload=_preload(host, options),
        )
    )


def serve_command(
    ctx: typer.Context,
    specs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[CONFIG]...",
            help="The model to load at start: a config file, catalog name, model folder or Hub repo "
            "id (or load one later with LoadModel / `load`).",
        ),
    ] = None,
    addr: Annotated[
        str | None,
        typer.Option(
            "--addr",
            help="Serve LocalAI's gRPC backend protocol on HOST:PORT "
            "(loopback unless --allow-remote; port 0 picks a free port).",
        ),
    ] = None,
    stdio: Annotated[
        bool, typer.Option("--stdio", help="Serve JSON-RPC 2.0 on stdin/stdout instead.")
    ] = False,
    http: Annotated[
        str | None,
        typer.Option(
            "--http", help="Serve the OpenAI-compatible HTTP API on HOST:PORT (several models: CONFIG …)."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="GALLERY_API_KEY", help="HTTP: require 'Authorization: Bearer KEY'."
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", help="HTTP: allow browser calls from this origin (repeatable)."),
    ] = None,
    max_models: Annotated[
        int, typer.Option("--max-models", help="HTTP: models kept loaded at once (LRU).")
    ] = 1,
    any_model: Annotated[
        bool,
        typer.Option("--any-model", help="HTTP: load any model a request names (file, entry, folder, repo)."),
    ] = False,
    load_timeout: Annotated[
        float, typer.Option("--load-timeout", help="HTTP: seconds a request waits for its model to load.")
    ] = 600.0,
    model: Annotated[
        str | None, typer.Option("--model", help="The model to load at start (same as CONFIG).")
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="A load option KEY:VALUE (repeatable), as in LoadModel Options."),
    ] = None,
    model_path: Annotated[
        str | None,
        typer.Option(
            "--model-path", help="Base folder for relative model paths (LocalAI's models directory)."
        ),
    ] = None,
    catalog: Annotated[
        str | None, typer.Option("--catalog", help="Catalog index to look model names up in.")
    ] = None,
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            help="Seconds in-flight requests get to finish on SIGTERM, stdio shutdown or end of input.",
        ),
    ] = 30.0,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Allow a non-loopback --addr (needs LOCALAI_GRPC_AUTH_TOKEN unless --insecure).",
        ),
    ] = False,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="With --allow-remote: serve without a token.")
    ] = False,
    max_message_mb: Annotated[
        int, typer.Option("--max-message-mb", help="Largest gRPC message or HTTP request body, in MiB.")
    ] = 64,
    max_line_mb: Annotated[
        int, typer.Option("--max-line-mb", help="Largest stdio request line, in MiB.")
    ] = 64,
    parent_pid: Annotated[
        int | None,
        typer.Option("--parent-pid", help="Also exit when this process dies (default: the parent)."),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level", envvar="GALLERY_LOG_LEVEL", help="stderr log level: DEBUG, INFO, WARNING or ERROR."
        ),
    ] = "INFO",
) -> None:
    """Serve a model to a parent process: LocalAI's gRPC backend protocol (--addr) or JSON-RPC (--stdio)."""
    if ctx.args:
        logging.getLogger("runtime").warning("ignoring unknown arguments: %s", " ".join(ctx.args))
    options = ServeOptions(
        specs=[*(specs or []), *([model] if model else [])],
        addr=addr,
        stdio=stdio,
        http=http,
        api_key=api_key,
        cors_origins=list(cors_origin or []),
        max_models=max_models,
        any_model=any_model,
        load_timeout=load_timeout,
        options=list(option or []),
        model_path=model_path,
        catalog=catalog,
        grace=grace,
        allow_remote=allow_remote,
        insecure=insecure,
        max_message_mb=max_message_mb,
        max_line_mb=max_line_mb,
        parent_pid=parent_pid,
        log_level=log_level.upper(),
    )
    code = serve(options)
    if code:
        raise typer.Exit(code)
