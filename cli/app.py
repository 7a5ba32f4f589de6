"""The `gallery` command line: the root app, which imports every command module and adds its commands.

Command modules never import this one (typer's add_typer, one direction only). Human output by default,
machine output with --json; every failure is one line on stderr (`gallery: error: …`) and the exit code of
its error class (gallery.errors.EXIT_CODES). Nothing here imports MLX: `gallery --help` stays fast and works
without the runtime extra; the run, chat and serve commands import the runtime when they run.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli import catalog, chat, importing, models, run, serve, server
from gallery.commandline import run_app
from gallery.errors import EXIT_CODES


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-gallery")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gallery {_version()}")
        raise typer.Exit(0)


app = typer.Typer(
    name="gallery",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Pull MLX models from Hugging Face with their decisions pinned (backend, stop tokens, chat template), "
    "chat with them, and serve them to LocalAI.\n\n"
    "Start: gallery pull NAME|ORG/REPO, then gallery chat NAME. Exit codes: "
    + "; ".join(f"{code} {name}" for code, (name, _) in EXIT_CODES.items()),
)


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """The root: its only own option is --version."""


for module in (models, chat, run, importing, catalog, serve, server):
    app.add_typer(module.app)


def _one_line_warning(message: Warning | str, *_: object, **__: object) -> None:
    from cli.output import warn

    warn(" ".join(str(message).split()))  # a library's warning (not enough disk space…) in one line, not two


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every failure into one line and an exit code."""
    import warnings

    warnings.showwarning = _one_line_warning
    return run_app(app, argv, prog_name="gallery", label="gallery")
