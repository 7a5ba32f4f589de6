"""`gallery import`, `explain` and `schema`: a repo or folder into a pinned config, and the decisions behind it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from catalog.resolve import looks_like_config_file
from cli.output import emit, loud_template_warning, warn
from gallery.config import ModelConfig, json_schema
from gallery.configfile import config_to_json, config_to_yaml, read_config, write_config
from gallery.errors import OutputExists, StrictFailure

app = typer.Typer()


BackendOpt = Annotated[str | None, typer.Option("--backend", help="Force a backend: mlx or mlx-vlm.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit (default: main).")]


@app.command("import")
def import_command(
    source: Annotated[str, typer.Argument(help="org/name, hf://org/name, a Hub URL, or a local folder.")],
    backend: BackendOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Config name (default: the repo name).")] = None,
    revision: RevisionOpt = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here instead of stdout.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML.")] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Fail when the chat template is missing or broken, or an expected metadata file could not be read.",
        ),
    ] = False,
) -> None:
    """Import a repo into a pinned, explained model config."""
    from importers import import_model

    if output is not None and output.exists() and not force:
        raise OutputExists(f"{output} exists; use --force to replace it", path=output)
    result = import_model(source, revision=revision, backend=backend, name=name)
    config = result.config
    for message in result.warnings:
        warn(message)
    loud_template_warning(config)
    if strict:
        _check_strict(config, result.missing)
    if output is None:
        emit(config_to_json(config) if as_json else config_to_yaml(config))
        return
    write_config(config, output, overwrite=force, as_json=as_json)
    print(
        f"gallery: wrote {output} ({config.backend}, {len(config.mlx.stop_tokens)} stop tokens, "
        f"template {config.mlx.chat_template.status})",
        file=sys.stderr,
    )


def _check_strict(config: ModelConfig, missing: list[str]) -> None:
    if missing:
        raise StrictFailure(
            f"--strict: {config.name} was imported without {', '.join(missing)} (listed by the Hub but not "
            "read; import once online to fill the cache)"
        )
    template = config.mlx.chat_template
    if template.status != "pinned":
        raise StrictFailure(f"--strict: {config.name} has no usable chat template ({template.status})")
    check = template.render_check
    failed = [
        probe
        for probe, state in (("text", check.text_probe), ("image", check.image_probe))
        if state == "error"
    ]
    if failed:
        raise StrictFailure(
            f"--strict: the chat template failed its {' and '.join(failed)} render check: "
            f"{check.errors[-1] if check.errors else 'see render_check'}"
        )


@app.command()
def explain(
    target: Annotated[str, typer.Argument(help="A config file, or a SOURCE to import first.")],
    backend: BackendOpt = None,
    revision: RevisionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Decisions as JSON.")] = False,
) -> None:
    """Show every decision in a config and the evidence behind it."""
    if looks_like_config_file(target) and not Path(target).is_dir():
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
