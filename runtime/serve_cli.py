"""`gallery serve`: load one config and serve it over gRPC (LocalAI's backend protocol) or stdio.

Registered on the `gallery` app when the CLI starts; grpc and MLX are imported only when it runs.
The same server as `python -m runtime`, with the model loaded at start.
"""

from __future__ import annotations

from typing import Annotated

import typer

from gallery.cli import app


@app.command()
def serve(
    config: Annotated[str, typer.Argument(help="A config file, catalog name, model folder or Hub repo id.")],
    addr: Annotated[str | None, typer.Option("--addr", help="Serve gRPC on HOST:PORT (loopback unless "
                                             "--allow-remote; port 0 picks a free port).")] = None,
    stdio: Annotated[bool, typer.Option("--stdio", help="Serve JSON-RPC 2.0 on stdin/stdout instead.")] = False,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="A load option KEY:VALUE "
                                                     "(repeatable), as in LoadModel Options.")] = None,
    catalog: Annotated[str | None, typer.Option("--catalog", help="Catalog index to look names up in.")] = None,
    grace: Annotated[float, typer.Option("--grace", help="Seconds in-flight requests get on SIGTERM.")] = 30.0,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a non-loopback --addr.")] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="With --allow-remote: no token needed.")] = False,
    max_message_mb: Annotated[int, typer.Option("--max-message-mb", help="Largest gRPC message (MiB).")] = 64,
) -> None:
    """Serve a model to a parent process: LocalAI's gRPC backend protocol (--addr) or JSON-RPC (--stdio)."""
    from gallery.errors import UsageError
    from runtime.__main__ import main as runtime_main

    if bool(addr) == stdio:
        raise UsageError("give exactly one of --addr HOST:PORT and --stdio")
    argv = ["--stdio", config] if stdio else ["--addr", str(addr), "--model", config]
    for item in option or []:
        argv += ["--option", item]
    if catalog:
        argv += ["--catalog", catalog]
    argv += ["--grace", str(grace), "--max-message-mb", str(max_message_mb)]
    if allow_remote:
        argv.append("--allow-remote")
    if insecure:
        argv.append("--insecure")
    code = runtime_main(argv)
    if code:
        raise typer.Exit(code)
