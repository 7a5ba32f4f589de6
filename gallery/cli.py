"""The `gallery` command line: a thin typed layer over the library.

Human output by default, machine output with --json; every failure is one line on stderr
(`gallery: error: …`) and a documented exit code (see gallery.errors.EXIT_CODES).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from gallery.config import ModelConfig, json_schema
from gallery.configfile import config_to_json, config_to_yaml, read_config, write_config
from gallery.errors import EXIT_CODES, GalleryError, OutputExists, StrictFailure

try:  # typer >= 0.20 vendors its own click: its exceptions are not click's, so catch both kinds
    from typer._click import exceptions as _typer_click
except ImportError:  # pragma: no cover - older typer raises click's own exceptions
    _typer_click = click.exceptions  # type: ignore[assignment]
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_CLICK_ERROR = (click.ClickException, _typer_click.ClickException)
_USAGE_ERROR = (click.UsageError, _typer_click.UsageError)

app = typer.Typer(
    name="gallery",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Import Hugging Face repos into pinned MLX model configs, keep a catalog of them, and run them.\n\n"
    "Exit codes: " + "; ".join(f"{code} {name}" for code, (name, _) in EXIT_CODES.items()),
)


def warn(message: str) -> None:
    """Print a warning line to stderr."""
    print(f"gallery: warning: {message}", file=sys.stderr)


def loud_template_warning(config: ModelConfig) -> None:
    """The banner shown whenever a config has no usable chat template."""
    template = config.mlx.chat_template
    if template.status == "pinned":
        return
    why = "none was found in any home" if template.status == "missing" else f"the one in {template.source} is unusable"
    print(
        f"gallery: WARNING: {config.name} HAS NO CHAT TEMPLATE ({why}). Chat requests will not be formatted "
        "the way the model was trained; answers may be garbage.",
        file=sys.stderr,
    )


def emit(text: str) -> None:
    """Write command output to stdout."""
    sys.stdout.write(text)
    sys.stdout.flush()


BackendOpt = Annotated[str | None, typer.Option("--backend", help="Force a backend: mlx or mlx-vlm.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit (default: main).")]


@app.command("import")
def import_command(
    source: Annotated[str, typer.Argument(help="org/name, hf://org/name, a Hub URL, or a local folder.")],
    backend: BackendOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Config name (default: the repo name).")] = None,
    revision: RevisionOpt = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write here instead of stdout.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail when the chat template is missing or broken.")] = False,
) -> None:
    """Import a repo into a pinned, explained model config."""
    from importers import import_model

    if output is not None and output.exists() and not force:
        raise OutputExists(f"{output} exists; use --force to replace it")
    result = import_model(source, revision=revision, backend=backend, name=name)
    config = result.config
    for message in result.warnings:
        warn(message)
    loud_template_warning(config)
    if strict:
        _check_strict(config)
    if output is None:
        emit(config_to_json(config) if as_json else config_to_yaml(config))
        return
    try:
        write_config(config, output, overwrite=force, as_json=as_json)
    except FileExistsError:
        raise OutputExists(f"{output} exists; use --force to replace it") from None
    except OSError as exc:
        raise OutputExists(f"cannot write {output}: {exc.strerror}") from None
    print(f"gallery: wrote {output} ({config.backend}, {len(config.mlx.stop_tokens)} stop tokens, "
          f"template {config.mlx.chat_template.status})", file=sys.stderr)


def _check_strict(config: ModelConfig) -> None:
    template = config.mlx.chat_template
    if template.status != "pinned":
        raise StrictFailure(f"--strict: {config.name} has no usable chat template ({template.status})")
    check = template.render_check
    failed = [probe for probe, state in (("text", check.text_probe), ("image", check.image_probe)) if state == "error"]
    if failed:
        raise StrictFailure(f"--strict: the chat template failed its {' and '.join(failed)} render check: "
                            f"{check.errors[-1] if check.errors else 'see render_check'}")


def _looks_like_config(target: str) -> bool:
    # A YAML/JSON path is a config even when missing: "no such file" beats trying it as a repo id.
    path = Path(target)
    return path.suffix.lower() in (".yaml", ".yml", ".json") and not path.is_dir()


@app.command()
def explain(
    target: Annotated[str, typer.Argument(help="A config file, or a SOURCE to import first.")],
    backend: BackendOpt = None,
    revision: RevisionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Decisions as JSON.")] = False,
) -> None:
    """Show every decision in a config and the evidence behind it."""
    if _looks_like_config(target):
        config = read_config(target)
        warnings = config.mlx.warnings
    else:
        from importers import import_model

        result = import_model(target, revision=revision, backend=backend)
        config, warnings = result.config, result.warnings
    loud_template_warning(config)
    if as_json:
        data = {key: decision.model_dump(mode="json") for key, decision in config.mlx.decisions.items()}
        emit(json.dumps({"name": config.name, "decisions": data, "warnings": warnings}, indent=2) + "\n")
        return
    emit(render_explanation(config, warnings))


def render_explanation(config: ModelConfig, warnings: list[str]) -> str:
    """The decision table as plain text (readable in a terminal and in CI logs)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.name} ({config.backend})", show_lines=True, expand=False)
    table.add_column("decision", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold", max_width=48)
    table.add_column("evidence", overflow="fold", max_width=70)
    for key, decision in config.mlx.decisions.items():
        lines = [f"{e.source}{':' + e.field if e.field else ''} — {e.detail}" for e in decision.evidence]
        lines += [f"AGAINST: {c}" for c in decision.conflicts]
        table.add_row(key, decision.value, "\n".join(lines) or "-")
    buffer = StringIO()
    width = int(os.environ.get("COLUMNS", "160"))
    console = Console(file=buffer, width=max(width, 100), force_terminal=False, color_system=None)
    console.print(table)
    if warnings:
        console.print("warnings:")
        for message in warnings:
            console.print(f"  - {message}", soft_wrap=True)
    return buffer.getvalue()


@app.command()
def schema() -> None:
    """Print the ModelConfig JSON Schema."""
    emit(json.dumps(json_schema(), indent=2) + "\n")


def _register_extensions() -> None:
    # Catalog and runtime commands live next to their code; importing them registers their commands.
    # Neither imports MLX at import time, so `gallery --help` stays fast and works without the runtime extra.
    import importlib

    for module in ("gallery.catalog_cli", "runtime.cli", "runtime.serve_cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every failure into one line and an exit code."""
    _register_extensions()
    debug = os.environ.get("GALLERY_DEBUG") == "1"
    try:
        result: Any = app(args=argv, prog_name="gallery", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except GalleryError as exc:
        if debug:
            raise
        print(f"gallery: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except _EXIT as exc:
        return exc.exit_code
    except _ABORT:
        print("gallery: interrupted", file=sys.stderr)
        return 130
    except _CLICK_ERROR as exc:
        exc.show(file=sys.stderr)
        return 2 if isinstance(exc, _USAGE_ERROR) else exc.exit_code
    except KeyboardInterrupt:
        print("gallery: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug, not a user error: say so, in one line, with a way to see more
        if debug:
            raise
        print(f"gallery: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
              "(set GALLERY_DEBUG=1 for the traceback; please report it)", file=sys.stderr)
        return 1

