"""Run a typer command line so that every failure is one line on stderr and a documented exit code.

Shared by `gallery` (cli) and `python -m runtime` (runtime), the two command lines of the project: user
errors print `<prog>: error: <one line>` and exit with their class's code; usage errors are one line too
(click's three-line usage block is not what scripts want to parse); a bug prints one line that says so
(GALLERY_DEBUG=1 shows the traceback) and exits 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any

import click
import typer

from gallery.errors import EXIT_CODES, GalleryError, UsageError, one_line

_typer_click: types.ModuleType
try:  # typer >= 0.20 vendors its own click: its exceptions are not click's, so catch both kinds
    from typer._click import exceptions as _typer_click
except ImportError:  # pragma: no cover - older typer raises click's own exceptions
    _typer_click = click.exceptions
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_CLICK_ERROR = (click.ClickException, _typer_click.ClickException)
_USAGE_ERROR = (click.UsageError, _typer_click.UsageError)
# A command given no arguments shows its help (on stdout, as --help does) rather than an error line.
_NO_ARGS = tuple(
    kind
    for kind in (
        getattr(click.exceptions, "NoArgsIsHelpError", None),
        getattr(_typer_click, "NoArgsIsHelpError", None),
    )
    if kind
)
INTERRUPTED = next(code for code, (name, _) in EXIT_CODES.items() if name == "interrupted")


def run_app(app: typer.Typer, argv: list[str] | None, *, prog_name: str, label: str) -> int:
    """Run `app` on argv (None: sys.argv) and return the exit code; `label` prefixes every message."""
    debug = os.environ.get("GALLERY_DEBUG") == "1"
    try:
        result: Any = app(args=argv, prog_name=prog_name, standalone_mode=False)
        if result == INTERRUPTED:  # typer turns Ctrl-C into a return of 130: say so, as below
            print(f"\n{label}: interrupted", file=sys.stderr)
        return result if isinstance(result, int) else 0
    except GalleryError as exc:
        if debug:
            raise
        print(f"{label}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except _EXIT as exc:
        return int(exc.exit_code)
    except _ABORT:
        print(f"\n{label}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except _NO_ARGS as exc:
        context = getattr(exc, "ctx", None)
        print(context.get_help() if context is not None else exc.format_message())
        return UsageError.exit_code
    except _CLICK_ERROR as exc:
        usage = isinstance(exc, _USAGE_ERROR)
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else prog_name
        hint = f" (see `{command} --help`)" if usage else ""
        print(f"{label}: error: {one_line(exc.format_message())}{hint}", file=sys.stderr)
        return UsageError.exit_code if usage else int(exc.exit_code)
    except KeyboardInterrupt:
        print(f"\n{label}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug, not a user error: say so, in one line, with a way to see more
        if debug:
            raise
        print(
            f"{label}: internal error: {type(exc).__name__}: {one_line(exc)[:300]} "
            "(set GALLERY_DEBUG=1 for the traceback; please report it)",
            file=sys.stderr,
        )
        return 1
