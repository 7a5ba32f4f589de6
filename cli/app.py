"""The `gallery` command line: the root app, which imports every command module and adds its commands.

Command modules never import this one (typer's add_typer, one direction only). Human output by default,
machine output with --json; every failure is one line on stderr (`gallery: error: …`) and the exit code of
its error class (gallery.errors.EXIT_CODES). Nothing here imports MLX: `gallery --help` stays fast and works
without the runtime extra; the run and serve commands import the runtime when they run.
"""

from __future__ import annotations

import typer

from cli import catalog, importing, run, serve
from gallery.commandline import run_app
from gallery.errors import EXIT_CODES

app = typer.Typer(
    name="gallery",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Import Hugging Face repos into pinned MLX model configs, keep a catalog of them, and run them.\n\n"
    "Exit codes: " + "; ".join(f"{code} {name}" for code, (name, _) in EXIT_CODES.items()),
)
for module in (importing, catalog, run, serve):
    app.add_typer(module.app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every failure into one line and an exit code."""
    return run_app(app, argv, prog_name="gallery", label="gallery")
