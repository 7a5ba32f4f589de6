"""`python -m runtime`: the runtime as a child process of an orchestrator (what LocalAI starts).

    python -m runtime --addr 127.0.0.1:50051 [--model SPEC]     # LocalAI-compatible gRPC backend
    python -m runtime --stdio [SPEC]                            # JSON-RPC 2.0 over stdin/stdout

The same command as `gallery serve` (runtime.serve), except that arguments it does not know are warned about
and ignored (an orchestrator may pass more than this backend needs). Errors are one line on stderr and the
exit code of their class (gallery.errors.EXIT_CODES).
"""

from __future__ import annotations

import sys

import typer

from gallery.commandline import run_app
from runtime.serve import serve_command


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve; returns the exit code."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(serve_command)
    return run_app(app, argv, prog_name="python -m runtime", label="runtime")


if __name__ == "__main__":
    sys.exit(main())
