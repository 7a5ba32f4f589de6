"""`python -m runtime`: the runtime as a child process of an orchestrator.

    python -m runtime --addr 127.0.0.1:50051 [--model SPEC]     # LocalAI-compatible gRPC backend
    python -m runtime --stdio [SPEC]                            # JSON-RPC 2.0 over stdin/stdout

Arguments this version does not know are warned about and ignored (an orchestrator may pass more than
we need). Errors are one line on stderr and a documented exit code (gallery.errors.EXIT_CODES).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

from gallery.errors import GalleryError, UsageError
from runtime.messages import RequestError


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m runtime`."""
    parser = argparse.ArgumentParser(prog="python -m runtime", description="Serve one MLX model config to a parent "
                                     "process: a LocalAI-compatible gRPC backend (--addr) or JSON-RPC on stdio (--stdio).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--addr", help="serve gRPC on HOST:PORT (loopback unless --allow-remote; port 0 picks one)")
    mode.add_argument("--stdio", nargs="?", const="", metavar="MODEL",
                      help="serve JSON-RPC on stdin/stdout, optionally loading MODEL first")
    parser.add_argument("--model", help="load this model at start (config path, catalog name, folder or Hub repo id)")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="KEY:VALUE",
                        help="a load option for --model / --stdio MODEL (repeatable), as in LoadModel Options")
    parser.add_argument("--model-path", help="base folder for relative model paths (LocalAI's models directory)")
    parser.add_argument("--catalog", help="catalog index to look model names up in")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get to finish on "
                        "SIGTERM / shutdown / end of input (default 30)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --addr (logs a warning; "
                        "needs LOCALAI_GRPC_AUTH_TOKEN unless --insecure)")
    parser.add_argument("--insecure", action="store_true", help="with --allow-remote: serve without a token")
    parser.add_argument("--max-message-mb", type=int, default=64, help="largest gRPC message, in MiB (default 64)")
    parser.add_argument("--max-line-mb", type=int, default=64, help="largest stdio request line, in MiB (default 64)")
    parser.add_argument("--parent-pid", type=int, help="also exit when this process dies (default: the parent)")
    parser.add_argument("--log-level", default=os.environ.get("GALLERY_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level (default INFO)")
    return parser


def _preload(host: Any, spec: str | None, options: list[str], model_path: str | None) -> Callable[[], Any] | None:
    if not spec:
        return None
    return lambda: host.load(spec, options, model_path=model_path)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve; returns the exit code."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    from runtime.lifecycle import setup_logging

    setup_logging(args.log_level)
    import logging

    log = logging.getLogger("runtime")
    if unknown:
        log.warning("ignoring unknown arguments: %s", " ".join(unknown))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # progress bars would garble the logs
    try:
        from runtime.host import ModelHost

        if args.stdio is not None:
            from runtime.stdio import run_stdio

            host = ModelHost(interface="stdio", catalog=args.catalog)
            spec = args.stdio or args.model
            return run_stdio(host, preload=_preload(host, spec, args.option, args.model_path), grace=args.grace,
                             max_line_mb=args.max_line_mb, parent_pid=args.parent_pid)
        from runtime.bind import check_bind
        from runtime.grpc_server import AUTH_ENV, serve

        token = os.environ.get(AUTH_ENV) or None
        check_bind(args.addr, allow_remote=args.allow_remote, insecure=args.insecure, token=token)
        host = ModelHost(interface="grpc", catalog=args.catalog)
        return asyncio.run(serve(args.addr, host, token=token, grace=args.grace, max_message_mb=args.max_message_mb,
                                 parent_pid=args.parent_pid,
                                 preload=_preload(host, args.model, args.option, args.model_path)))
    except GalleryError as exc:
        print(f"runtime: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RequestError as exc:  # a bad load option given on the command line
        print(f"runtime: error: {exc}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        print("runtime: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
