"""`gallery import`, `explain` and `schema`: a repo or folder into a pinned config, and the decisions behind it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from cli.catalog import check_output_path
from cli.output import (
    emit,
    loud_template_warning,
    note,
    print_table,
    spinner,
    stdout_console,
    stdout_is_terminal,
    template_warning,
    warn,
)
from gallery.config import ModelConfig, json_schema
from gallery.configfile import config_to_json, config_to_yaml, write_config
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
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Write the config here (- for stdout). Default: stdout when piped, else ./NAME.yaml.",
        ),
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
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Pin trust_remote_code on: loading may run the repo's own tokenizer/model code (review it first).",
        ),
    ] = False,
    drafter: Annotated[
        bool,
        typer.Option(
            "--drafter",
            help="Pin the model's documented drafter (read from the Hub and checked against the model): "
            "text requests then draft, and pull fetches it too.",
        ),
    ] = False,
) -> None:
    """Import a repo into a pinned, explained model config.

    In a terminal it prints the decisions and writes ./NAME.yaml; piped (or with -o -) the config goes to stdout.
    """
    from importers import import_model

    to_stdout = str(output) == "-" or (output is None and not stdout_is_terminal())
    if output is not None and not to_stdout:
        check_output_path(output)
        if output.exists() and not force:
            raise OutputExists(f"{output} exists; use --force to replace it", path=output)
    with spinner(f"importing {source}"):
        result = import_model(
            source,
            revision=revision,
            backend=backend,
            name=name,
            trust_remote_code=trust_remote_code,
            drafter=drafter,
        )
    config = result.config
    for message in result.warnings:
        if not (template_warning(config) and "template" in message.lower()):
            warn(message)
    loud_template_warning(config)
    if strict:
        _check_strict(config, result.missing)
    if to_stdout:
        emit(config_to_json(config) if as_json else config_to_yaml(config))
        return
    target = output or Path(f"{config.name}.{'json' if as_json else 'yaml'}")
    if output is None and target.exists() and not force:
        raise OutputExists(
            f"{target} exists; use --force to replace it, or -o PATH (- for stdout)", path=target
        )
    write_config(config, target, overwrite=force, as_json=as_json)
    if output is None:  # a person at a terminal: the decisions, then where the config went
        _print_summary(config)
    note(
        f"wrote {target} ({config.backend}, {len(config.mlx.stop_tokens)} stop tokens, "
        f"template {config.mlx.chat_template.status}); `gallery explain {target}` shows the evidence"
    )


def _print_summary(config: ModelConfig) -> None:
    """One line per decision (the value only; `explain` has the evidence), fitted to the terminal."""
    rows = [(key, decision.value) for key, decision in config.mlx.decisions.items()]
    stdout_console().print(f"{config.name} ({config.backend})", style="bold", markup=False)
    print_table(("DECISION", "VALUE"), rows, wrap=("VALUE",))


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
    target: Annotated[
        str, typer.Argument(help="A catalog name, config file, model folder, or a SOURCE to import first.")
    ],
    backend: BackendOpt = None,
    revision: RevisionOpt = None,
    catalog: Annotated[
        str | None, typer.Option("--catalog", help="Catalog index to look names up in.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Decisions as JSON.")] = False,
) -> None:
    """Show every decision in a config and the evidence behind it."""
    if backend is not None or revision is not None:  # an import with choices: not a stored config
        from importers import import_model

        with spinner(f"importing {target}"):
            result = import_model(target, revision=revision, backend=backend)
        config, warnings = result.config, result.warnings
    else:
        from catalog.resolve import resolve_spec

        with spinner(f"reading {target}"):
            resolved = resolve_spec(target, catalog=catalog)
        config = resolved.config
        warnings = resolved.warnings if resolved.kind in ("folder", "repo") else config.mlx.warnings
    loud_template_warning(config)
    from importers.memory import check_fit

    if as_json:
        data = {key: decision.model_dump(mode="json") for key, decision in config.mlx.decisions.items()}
        fit = check_fit(config)
        body = {"name": config.name, "decisions": data, "warnings": warnings, "fit": dataclasses.asdict(fit)}
        emit(json.dumps(body, indent=2) + "\n")
        return
    emit(render_explanation(config, warnings))


def render_explanation(config: ModelConfig, warnings: list[str]) -> str:
    """The decision table as plain text (readable in a terminal and in CI logs)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    from importers.memory import check_fit

    table = Table(title=f"{config.name} ({config.backend})", show_lines=True, expand=True)
    table.add_column("decision", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold", ratio=2)
    table.add_column("evidence", overflow="fold", ratio=3)
    for key, decision in config.mlx.decisions.items():
        lines = [
            f"{'(' + e.strength + ') ' if e.strength else ''}{e.source}{':' + e.field if e.field else ''} — {e.detail}"
            for e in decision.evidence
        ]
        lines += [f"AGAINST: {c}" for c in decision.conflicts]
        table.add_row(key, decision.value, "\n".join(lines) or "-")
    buffer = StringIO()
    # The real terminal's width (rich reads it, and COLUMNS only when there is none); 100 when piped.
    width = stdout_console().width if stdout_is_terminal() else int(os.environ.get("COLUMNS") or 100)
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    console.print(table)
    fit = check_fit(config)
    console.print(f"memory: {fit.summary()}")
    if fit.warning and fit.warning not in warnings:
        warnings = [*warnings, fit.warning]
    if warnings:
        console.print("warnings:")
        for message in warnings:
            console.print(f"  - {message}")
    return buffer.getvalue()


@app.command()
def schema() -> None:
    """Print the ModelConfig JSON Schema."""
    emit(json.dumps(json_schema(), indent=2) + "\n")
