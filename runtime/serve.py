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

from backends.distributed import launched_rank
from gallery.errors import UsageError

log = logging.getLogger("runtime")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
OLLAMA_ADDRESS = "127.0.0.1:11434"  # where Ollama's clients look by default
# The HTTP address when no interface is named (`gallery serve NAME`), and the one `gallery ps` / `stop` ask.
DEFAULT_HTTP_ADDR = "127.0.0.1:8080"


@dataclasses.dataclass
class ServeOptions:
    """Everything a server start takes, whichever command line it came from."""

    specs: list[str] = dataclasses.field(default_factory=list)  # models to serve (the first loads at start)
    addr: str | None = None  # gRPC HOST:PORT
    stdio: bool = False
    http: str | None = None  # OpenAI-compatible HTTP HOST:PORT
    api_key: str | None = None  # HTTP: required bearer key
    cors_origins: list[str] = dataclasses.field(default_factory=list)
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)  # HTTP: Host names besides loopback
    quiet: bool = False  # HTTP: no access log
    header_timeout: float = 10.0  # HTTP: seconds a connection has to send its request headers
    max_connections: int = 512  # HTTP: open connections; past it the oldest idle one is closed
    ollama_addr: str | None = None  # HTTP: also listen here (Ollama's 127.0.0.1:11434 with --ollama)
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
    # Distributed runs (runtime.launch): the ranks, MLX's backend, and how to split the model.
    hosts: list[str] = dataclasses.field(default_factory=list)
    hostfile: str | None = None
    distributed_backend: str | None = None  # ring | jaccl (default: the config's, else ring)
    strategy: str | None = None
    layer_split: str | None = None
    ring_port: int | None = None
    rank_timeout: float | None = None  # seconds a rank waits for the others (default: runtime.cluster_watch)

    def check(self) -> None:
        """Refuse contradictory or out-of-range options (UsageError, one line)."""
        if sum((bool(self.addr), self.stdio, bool(self.http))) != 1:
            raise UsageError("give exactly one of --addr HOST:PORT (gRPC), --http HOST:PORT and --stdio")
        if len(self.specs) > 1 and not self.http:
            raise UsageError(
                f"this interface serves one model at a time; got {len(self.specs)}: {' '.join(self.specs)} "
                "(the HTTP server serves several)"
            )
        if self.ollama_addr and not self.http:
            raise UsageError(
                "--ollama / --ollama-addr: also give --http HOST:PORT (the same server answers both)"
            )
        if self.http and not self.specs and not self.any_model:
            raise UsageError("--http: name the models to serve (CONFIG …), or pass --any-model")
        if self.max_models < 1 or self.load_timeout <= 0:
            raise UsageError("--max-models must be at least 1 and --load-timeout positive")
        if self.header_timeout <= 0 or self.max_connections < 1:
            raise UsageError("--header-timeout must be positive and --max-connections at least 1")
        if self.grace < 0:
            raise UsageError(f"--grace must not be negative, got {self.grace}")
        for name in ("max_message_mb", "max_line_mb"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.log_level.upper() not in LOG_LEVELS:
            raise UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.hosts and self.hostfile:
            raise UsageError("give --hosts or --hostfile, not both")
        if self.distributed_backend not in (None, "ring", "jaccl"):
            raise UsageError(f"--backend must be ring or jaccl, got {self.distributed_backend!r}")
        if self.strategy not in (None, "auto", "pipeline", "tensor"):
            raise UsageError(f"--strategy must be auto, pipeline or tensor, got {self.strategy!r}")
        if self.ring_port is not None and not 1024 <= self.ring_port <= 65000:
            raise UsageError(f"--ring-port must be between 1024 and 65000, got {self.ring_port}")
        if self.rank_timeout is not None and not 0 < self.rank_timeout <= 86400:
            raise UsageError(
                f"--rank-timeout must be over 0 and at most 86400 seconds, got {self.rank_timeout:g}"
            )

    def check_distributed(self) -> None:
        """What a distributed run cannot do: it serves exactly one model, loaded at start."""
        if len(self.specs) != 1:
            raise UsageError("a distributed run serves exactly one model: name it (CONFIG) when starting")
        if self.any_model or self.max_models != 1:
            raise UsageError("a distributed run serves one model: --any-model and --max-models do not apply")


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
    from runtime.launch import run_launch

    rank = launched_rank()
    if rank is not None:
        return _serve_rank(options)
    target = _distributed_target(options)
    if target is not None:
        hosts, hostfile, backend = target
        options.check_distributed()
        if hostfile is None:
            from runtime.launch import check_hosts

            check_hosts(hosts, backend)
        _check_shardable(options, len(hosts) if hosts else None)
        return run_launch(
            rank_arguments(options),
            hosts=hosts,
            hostfile=hostfile,
            backend=backend,
            port=options.ring_port,
            stdio=options.stdio,
        )
    if options.strategy or options.layer_split or options.rank_timeout is not None:
        raise UsageError(
            "--strategy, --layer-split and --rank-timeout are for ranks: give --hosts (or --hostfile)"
        )
    return _serve_interface(options)


def _distributed_target(options: ServeOptions) -> tuple[list[str], str | None, str] | None:
    """(hosts, hostfile, backend) when this serve should start several ranks: flags first, then the config."""
    section = None
    if not (options.hosts or options.hostfile) and len(options.specs) == 1:
        from catalog.resolve import resolve_spec

        try:
            config = resolve_spec(
                options.specs[0],
                catalog=options.catalog,
                base_dirs=[options.model_path] if options.model_path else [],
            ).config
        except Exception:  # the interface reports a spec that does not resolve, as it always has
            return None
        section = config.distributed
        if section is None or not (section.hosts or section.hostfile):
            return None
        log.info("%s: starting the distributed run its config describes", config.name)
    elif not (options.hosts or options.hostfile):
        return None
    hosts = options.hosts or (list(section.hosts) if section else [])
    hostfile = options.hostfile or (section.hostfile if section and not options.hosts else None)
    backend = options.distributed_backend
    if backend is None and hostfile is not None:
        from runtime.launch import hostfile_backend

        backend = hostfile_backend(hostfile)  # mlx.distributed_config writes the backend into its hostfiles
    backend = backend or (section.backend if section else "ring")
    return hosts, hostfile, backend


def _check_shardable(options: ServeOptions, ranks: int | None) -> None:
    """Refuse, before starting any rank, a model that cannot be split this way (ShardingRefused, exit 10)."""
    from catalog.resolve import resolve_spec
    from gallery.sharding import parse_split, plan_sharding
    from runtime.load_options import parse_options

    config = resolve_spec(
        options.specs[0],
        catalog=options.catalog,
        base_dirs=[options.model_path] if options.model_path else [],
    ).config
    loaded = parse_options(options.options)
    section = config.distributed
    strategy = (
        options.strategy or loaded.get("distributed_strategy") or (section.strategy if section else "auto")
    )
    split_text = options.layer_split or loaded.get("layer_split")
    split = (
        parse_split(split_text)
        if split_text
        else (tuple(section.layer_split) if section and section.layer_split else None)
    )
    plan_sharding(config, ranks=ranks, strategy=strategy, layer_split=split)


def rank_arguments(options: ServeOptions) -> list[str]:
    """The `python -m runtime` arguments every rank gets (the same serve, minus the launch flags)."""
    args: list[str] = list(options.specs)
    if options.addr:
        args += ["--addr", options.addr]
    elif options.http:
        args += ["--http", options.http]
    else:
        args.append("--stdio")
    for origin in options.cors_origins:
        args += ["--cors-origin", origin]
    for name in options.allowed_hosts:
        args += ["--allowed-host", name]
    if options.quiet:
        args.append("--quiet")
    args += [
        "--header-timeout",
        str(options.header_timeout),
        "--max-connections",
        str(options.max_connections),
    ]
    if options.ollama_addr:
        args += ["--ollama-addr", options.ollama_addr]
    for option in options.options:
        args += ["--option", option]
    if options.strategy:
        args += ["--option", f"distributed_strategy:{options.strategy}"]
    if options.layer_split:
        args += ["--option", f"layer_split:{options.layer_split}"]
    for flag, value in (
        ("--model-path", options.model_path),
        ("--catalog", options.catalog),
        ("--grace", options.grace),
        ("--load-timeout", options.load_timeout),
        ("--max-message-mb", options.max_message_mb),
        ("--max-line-mb", options.max_line_mb),
        ("--log-level", options.log_level),
        ("--rank-timeout", options.rank_timeout),
    ):
        if value is not None:
            args += [flag, str(value)]
    if options.allow_remote:
        args.append("--allow-remote")
    if options.insecure:
        args.append("--insecure")
    return args  # the API key travels in the environment (GALLERY_API_KEY), never on a command line


def _serve_rank(options: ServeOptions) -> int:
    """This process is one rank of a distributed run (started by mlx.launch)."""
    from runtime.cluster import Cluster, Follower
    from runtime.cluster_watch import DEFAULT_RANK_TIMEOUT_S, LOST_EXIT
    from runtime.errors import ClusterLost
    from runtime.launch import ENV_BACKEND, attach_stdio, rank_finished, rank_started

    try:
        cluster = Cluster.join(
            os.environ.get(ENV_BACKEND, "any"),
            rank_timeout=options.rank_timeout or DEFAULT_RANK_TIMEOUT_S,
            load_timeout=options.load_timeout,
        )
    except ClusterLost as exc:
        log.error("could not join the distributed run: %s", exc)
        return 1
    if cluster.rank != 0:
        os.dup2(
            2, 1
        )  # stdout belongs to rank 0 (the stdio protocol); anything a library prints goes to stderr
        return Follower(cluster).run()
    rank_started()
    log.info("rank 0 of %d (pid %d): serving; the other ranks follow", cluster.size, os.getpid())
    if options.stdio:
        attach_stdio()
    code = 1
    try:
        code = _serve_interface(options, cluster)
        if cluster.failure is not None:
            code = code or LOST_EXIT  # a run that lost a rank did not end well, however it stopped
    finally:
        rank_finished(code)
        cluster.close(code)  # exits here if a thread is still blocked in a collective
    return code


def _serve_interface(options: ServeOptions, cluster: Any = None) -> int:
    """Serve the chosen interface in this process (rank 0 of a distributed run passes its cluster)."""
    from runtime.host import ModelHost

    if options.stdio:
        from runtime.stdio import run_stdio

        host = ModelHost(interface="stdio", catalog=options.catalog, cluster=cluster)
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
        if options.ollama_addr:
            check_bind(
                options.ollama_addr,
                allow_remote=options.allow_remote,
                insecure=options.insecure,
                token=options.api_key,
                flag="--ollama-addr",
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
            cluster=cluster,
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
                allowed_hosts=options.allowed_hosts,
                quiet=options.quiet,
                header_timeout=options.header_timeout,
                max_connections=options.max_connections,
                ollama_addr=options.ollama_addr,
            )
        )
    from runtime.grpc_server import AUTH_ENV
    from runtime.grpc_server import serve as serve_grpc

    assert options.addr is not None
    token = os.environ.get(AUTH_ENV) or None
    check_bind(options.addr, allow_remote=options.allow_remote, insecure=options.insecure, token=token)
    host = ModelHost(interface="grpc", catalog=options.catalog, cluster=cluster)
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
            "--http",
            help="Serve the OpenAI-compatible HTTP API on HOST:PORT (several models: CONFIG …); "
            f"the default interface, on {DEFAULT_HTTP_ADDR}.",
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
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="HTTP without an API key: also answer requests whose Host is this name (repeatable); "
            "loopback names always are.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="HTTP: no access-log line per request.")] = False,
    header_timeout: Annotated[
        float,
        typer.Option("--header-timeout", help="HTTP: seconds a connection has to send its request headers."),
    ] = 10.0,
    max_connections: Annotated[
        int,
        typer.Option(
            "--max-connections", help="HTTP: open connections at most; past it the oldest idle one is closed."
        ),
    ] = 512,
    ollama: Annotated[
        bool,
        typer.Option(
            "--ollama", help="HTTP: also listen on Ollama's 127.0.0.1:11434, for clients that assume it."
        ),
    ] = False,
    ollama_addr: Annotated[
        str | None,
        typer.Option(
            "--ollama-addr", help="HTTP: also listen on this HOST:PORT (what --ollama picks for you)."
        ),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level", envvar="GALLERY_LOG_LEVEL", help="stderr log level: DEBUG, INFO, WARNING or ERROR."
        ),
    ] = "INFO",
    hosts: Annotated[
        str | None,
        typer.Option(
            "--hosts",
            help="Serve across processes with mlx.launch: one IP per rank, rank 0 (this machine) first; "
            "a host named twice runs two ranks there (e.g. 127.0.0.1,127.0.0.1).",
        ),
    ] = None,
    hostfile: Annotated[
        str | None, typer.Option("--hostfile", help="An mlx.launch hostfile instead of --hosts.")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            help="MLX distributed backend: ring (TCP, default) or jaccl (RDMA over Thunderbolt 5).",
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy", help="Distributed: pipeline (layers per rank), tensor (every layer split) or auto."
        ),
    ] = None,
    layer_split: Annotated[
        str | None,
        typer.Option(
            "--layer-split", help="Distributed pipeline: layers per rank, rank 0 first (e.g. 20,12)."
        ),
    ] = None,
    ring_port: Annotated[
        int | None,
        typer.Option(
            "--ring-port", help="Distributed ring: first TCP port the ranks listen on (default: a free one)."
        ),
    ] = None,
    rank_timeout: Annotated[
        float | None,
        typer.Option(
            "--rank-timeout",
            help="Distributed: seconds a batch step may wait on the other ranks before the run is declared "
            "lost and exits (default 300; an idle heartbeat gets at most 10).",
        ),
    ] = None,
) -> None:
    """Serve models: the OpenAI-compatible HTTP API (--http; the default, on 127.0.0.1:8080), LocalAI's gRPC
    backend protocol (--addr), or JSON-RPC on stdin/stdout (--stdio)."""
    if ctx.args:
        logging.getLogger("runtime").warning("ignoring unknown arguments: %s", " ".join(ctx.args))
    if not (addr or stdio or http):
        http = DEFAULT_HTTP_ADDR  # like ollama and LM Studio: a server on a known local port
    options = ServeOptions(
        specs=[*(specs or []), *([model] if model else [])],
        addr=addr,
        stdio=stdio,
        http=http,
        api_key=api_key,
        cors_origins=list(cors_origin or []),
        allowed_hosts=list(allowed_host or []),
        quiet=quiet,
        header_timeout=header_timeout,
        max_connections=max_connections,
        ollama_addr=ollama_addr or (OLLAMA_ADDRESS if ollama else None),
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
        hosts=[host.strip() for host in hosts.split(",") if host.strip()] if hosts else [],
        hostfile=hostfile,
        distributed_backend=backend,
        strategy=strategy,
        layer_split=layer_split,
        ring_port=ring_port,
        rank_timeout=rank_timeout,
    )
    code = serve(options)
    if code:
        raise typer.Exit(code)
