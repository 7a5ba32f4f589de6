"""The catalog commands of the `gallery` CLI: validate, list, show, search, add, refresh, install, export.

The root app (cli.app) adds them. Every
command takes --catalog PATH (default: $GALLERY_CATALOG, else the bundled gallery/index.yaml), prints human
output by default and JSON with --json, and fails with one line and a documented exit code.
"""

from __future__ import annotations

import json
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from catalog.index import (
    Catalog,
    Entry,
    load_catalog,
    load_catalog_strict,
    resolve_catalog_path,
    write_catalog,
)
from cli.output import emit, warn
from gallery.errors import BadConfig, OutputExists, UsageError, ValidationFailed

CatalogOpt = Annotated[
    Path | None,
    typer.Option(
        "--catalog", help="Catalog index (or its folder). Default: $GALLERY_CATALOG, else the bundled one."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


app = typer.Typer()


class ValidateFormat(str, Enum):
    text = "text"
    json = "json"
    github = "github"


class ExportFormat(str, Enum):
    localai = "localai"


def _load(catalog: Path | None) -> Catalog:
    """Load the catalog leniently, warning (once, on stderr) about entries that are skipped as invalid."""
    loaded = load_catalog(resolve_catalog_path(catalog))
    loaded_names = set(loaded.names())
    broken = sorted({p.entry or "?" for p in loaded.errors} - loaded_names)
    if broken:
        warn(
            f"{len(broken)} invalid entr{'y' if len(broken) == 1 else 'ies'} skipped ({', '.join(broken[:5])}): "
            f"run `gallery validate {loaded.path}`"
        )
    elif loaded.errors:
        warn(f"the catalog has {len(loaded.errors)} problem(s): run `gallery validate {loaded.path}`")
    return loaded


def _row(entry: Entry) -> dict[str, Any]:
    config = entry.config
    return {
        "name": entry.name,
        "backend": config.backend,
        "size": entry.meta.size,
        "license": entry.meta.license or config.license,
        "tags": list(entry.meta.tags),
        "description": entry.meta.description or config.description,
        "repo": config.mlx.source.repo,
        "revision": config.mlx.source.revision,
    }


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _table(entries: list[Entry]) -> str:
    if not entries:
        return "(no entries)\n"
    rows = [_row(e) for e in entries]
    headers = ("NAME", "BACKEND", "SIZE", "LICENSE", "DESCRIPTION")
    cells = [
        (r["name"], r["backend"], r["size"] or "-", r["license"] or "-", _clip(r["description"] or "", 70))
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers[:-1], widths, strict=True)) + "  " + headers[-1]]
    lines += ["  ".join(c[i].ljust(w) for i, w in enumerate(widths)) + "  " + c[-1] for c in cells]
    return "\n".join(line.rstrip() for line in lines) + "\n"


@app.command("validate")
def validate_command(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Catalog indexes, catalog folders or config files. Default: the catalog."),
    ] = None,
    output: Annotated[
        ValidateFormat, typer.Option("--format", help="text, json, or github (Actions annotations).")
    ] = ValidateFormat.text,
    strict: Annotated[bool, typer.Option("--strict", help="Treat warnings as problems (exit 14).")] = False,
    catalog: CatalogOpt = None,
) -> None:
    """Check catalogs and configs offline (CI). Exit 0 ok, 14 problems found, 13 a file could not be read."""
    from catalog.validate import format_report, validate_paths

    targets = list(paths or []) or [resolve_catalog_path(catalog)]
    report = validate_paths(targets)
    emit(format_report(report, output.value, strict=strict))
    code = report.exit_code(strict=strict)
    if code:
        raise typer.Exit(code)


@app.command("list")
def list_command(catalog: CatalogOpt = None, as_json: JsonOpt = False) -> None:
    """List the catalog's entries."""
    loaded = _load(catalog)
    if as_json:
        emit(json.dumps([_row(e) for e in loaded.entries], indent=2, ensure_ascii=False) + "\n")
        return
    emit(_table(loaded.entries))


@app.command("search")
def search_command(
    query: Annotated[
        list[str], typer.Argument(help="Words to find in names, descriptions, tags, repos, licenses.")
    ],
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find entries whose name, description, tags, repo, license, backend or family match every word."""
    loaded = _load(catalog)
    words = " ".join(query).lower().split()
    found = []
    for entry in loaded.entries:
        row = _row(entry)
        haystack = " ".join(
            str(v)
            for v in (
                row["name"],
                row["description"],
                " ".join(row["tags"]),
                row["repo"],
                row["license"],
                row["backend"],
                entry.config.mlx.model_type,
            )
        ).lower()
        if all(word in haystack for word in words):
            found.append(entry)
    if as_json:
        emit(json.dumps([_row(e) for e in found], indent=2, ensure_ascii=False) + "\n")
        return
    emit(_table(found))


@app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="Entry name.")],
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one entry: its pins (repo, commit, files with sha256), backend, stop set and template."""
    entry = _load(catalog).get(name)
    config = entry.config
    if as_json:
        emit(
            json.dumps(
                {
                    "index": entry.meta.model_dump(exclude={"config"}),
                    "config_file": entry.config_ref,
                    "config": config.to_data(),
                },
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        )
        return
    from importers.memory import check_fit

    source = config.mlx.source
    template = config.mlx.chat_template
    stops = ", ".join(f"{t.id} {t.text!r}" if t.text else str(t.id) for t in config.mlx.stop_tokens) or "none"
    lines = [
        f"name:         {entry.name}",
        f"description:  {entry.meta.description or config.description or '-'}",
        f"repo:         {source.repo}@{source.revision}",
        f"backend:      {config.backend}",
        f"license:      {entry.meta.license or config.license or '-'}",
        f"size:         {entry.meta.size or '-'}",
        f"context size: {config.context_size or '-'}",
        f"memory:       {check_fit(config).summary()}",
        f"stop tokens:  {stops}",
        f"template:     {template.status}"
        + (f" (sha256 {template.sha256}, from {template.source})" if template.sha256 else ""),
        f"tags:         {', '.join(entry.meta.tags) or '-'}",
        f"config:       {entry.config_ref or '(inline)'}",
        "files:",
    ]
    sizes = {f.path: f.size for f in config.mlx.files}
    for file in entry.meta.files:
        size = sizes.get(file.filename)
        lines.append(f"  {file.sha256}  {file.filename}" + (f"  ({size} bytes)" if size is not None else ""))
    emit("\n".join(lines) + "\n")
    fit = check_fit(config)
    if fit.warning:
        warn(fit.warning)


def _check_new_entry(entry: Entry) -> None:
    """Validate a freshly imported entry on its own (as CI would) before it goes into the catalog."""
    from catalog.validate import validate_paths

    with tempfile.TemporaryDirectory(prefix="gallery-add-") as folder:
        index = Path(folder) / "index.yaml"
        write_catalog(index, [entry])
        report = validate_paths([index])
    errors = [p for p in report.sorted_problems() if p.severity == "error"]
    for problem in report.sorted_problems():
        if problem.severity == "warning":
            warn(f"{entry.name}: {problem.message}")
    if errors:
        hint = (
            " (pass --accept-missing-template to accept a model without a chat template)"
            if any(p.code == "template-missing" for p in errors)
            else ""
        )
        raise ValidationFailed(
            f"{entry.name} would fail `gallery validate`: [{errors[0].code}] {errors[0].message}"
            f"{f' (and {len(errors) - 1} more)' if len(errors) > 1 else ''}{hint}"
        )


@app.command("add")
def add_command(
    source: Annotated[str, typer.Argument(help="Hub repo: org/name, hf://org/name or a Hub URL.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Entry name (default: from the repo name).")
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch, tag or commit to pin (default: main).")
    ] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="Force a backend: mlx or mlx-vlm.")] = None,
    description: Annotated[str | None, typer.Option("--description", help="Curated description.")] = None,
    icon: Annotated[str | None, typer.Option("--icon", help="Icon URL (https).")] = None,
    tags: Annotated[
        list[str] | None, typer.Option("--tag", help="Tag (repeatable; default: derived).")
    ] = None,
    accept_missing_template: Annotated[
        bool,
        typer.Option(
            "--accept-missing-template",
            help="Accept a repo without a usable chat template (marks the entry).",
        ),
    ] = False,
    inline: Annotated[
        bool, typer.Option("--inline", help="Put the config inline in the index, not in entries/.")
    ] = False,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import a Hub repo into the catalog: writes entries/<name>.yaml and appends the index entry (atomically).

    Exit 11 when the name is taken, 14 when the new entry would fail `gallery validate`.
    """
    from catalog.build import build_entry
    from catalog.index import Catalog

    path = resolve_catalog_path(catalog)
    current = load_catalog_strict(path) if path.exists() else Catalog(path=path, entries=[], problems=[])
    taken = {n.lower() for n in current.names()}
    if name is not None and name.lower() in taken:
        raise OutputExists(f"the catalog already has an entry named {name!r}", path=path)
    built = build_entry(
        source,
        name=name,
        revision=revision,
        backend=backend,
        description=description,
        icon=icon,
        tags=tags or None,
        accept_missing_template=accept_missing_template,
        inline=inline,
    )
    entry = built.entry
    if entry.name.lower() in taken:
        raise OutputExists(
            f"the catalog already has an entry named {entry.name!r} (choose another with --name)", path=path
        )
    for message in built.warnings:
        warn(message)
    repo = entry.config.mlx.source.repo
    same_repo = [e.name for e in current.entries if e.config.mlx.source.repo == repo]
    if same_repo:
        warn(f"{repo} is already in the catalog as {', '.join(same_repo)}")
    _check_new_entry(entry)
    if entry.config_ref is not None and (path.parent / entry.config_ref).exists():
        raise OutputExists(
            f"{path.parent / entry.config_ref} already exists (not in the index): remove it "
            "or choose another --name"
        )
    write_catalog(
        path,
        [*current.entries, entry],
        changed={entry.name},
        new_configs={entry.name},
        expect_fingerprint=current.fingerprint,
    )
    if as_json:
        emit(json.dumps(entry.index_data(), indent=2, ensure_ascii=False) + "\n")
    print(
        f"gallery: added {entry.name} ({entry.config.backend}, {len(entry.meta.files)} files, "
        f"{entry.meta.size or 'size unknown'}) to {path}",
        file=sys.stderr,
    )


@app.command("refresh")
def refresh_command(
    names: Annotated[list[str] | None, typer.Argument(help="Entries to refresh (default: all).")] = None,
    write: Annotated[bool, typer.Option("--write", help="Rewrite drifted entries (atomically).")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Entries re-imported at once.")] = 4,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-import entries against the Hub and report drift. Exit 15 if any drifted (even with --write)."""
    from catalog.refresh import format_refresh, refresh_catalog

    path = resolve_catalog_path(catalog)
    loaded = load_catalog_strict(path) if write else _load(catalog)
    report = refresh_catalog(loaded, names or [], write=write, jobs=jobs)
    emit(format_refresh(report, as_json=as_json, write=write))
    code = report.exit_code()
    if code:
        raise typer.Exit(code)


@app.command("install")
def install_command(
    name: Annotated[str, typer.Argument(help="Entry name.")],
    models_dir: Annotated[
        Path | None,
        typer.Option("--models-dir", help="Where models go (default: $GALLERY_MODELS_DIR, else ./models)."),
    ] = None,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download an entry's pinned files, verify each sha256, and write <models-dir>/<name>.yaml.

    Exit 16 when a file does not match its sha256 (the file is removed), 4 for a gated repo without access.
    """
    from catalog.install import check_models_dir, install_entry, resolve_models_dir

    loaded = _load(catalog)
    entry = loaded.get(name)
    _refuse_invalid(loaded, entry)
    target = resolve_models_dir(models_dir)
    check_models_dir(target)
    result = install_entry(entry, target)
    if as_json:
        emit(
            json.dumps(
                {
                    "name": result.name,
                    "folder": str(result.folder),
                    "config": str(result.config_path),
                    "downloaded": result.downloaded,
                    "verified": result.verified,
                    "config_written": result.config_written,
                },
                indent=2,
            )
            + "\n"
        )
    state = "installed" if result.changed else "already installed, every file verified"
    print(f"gallery: {result.name}: {state}; config {result.config_path}", file=sys.stderr)


def _refuse_invalid(loaded: Catalog, entry: Entry) -> None:
    """Run the full validation on the catalog and refuse an entry with errors (never install a broken pin)."""
    from catalog.validate import validate_paths

    report = validate_paths([loaded.path])
    errors = [p for p in report.sorted_problems() if p.severity == "error" and p.entry == entry.name]
    if errors:
        first = errors[0]
        raise BadConfig(
            f"catalog entry {entry.name!r} is invalid: [{first.code}] {first.message} "
            "(run `gallery validate`)"
        )


@app.command("export")
def export_command(
    name: Annotated[str, typer.Argument(help="Entry name.")],
    output_format: Annotated[
        ExportFormat, typer.Option("--format", help="Output format.")
    ] = ExportFormat.localai,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here instead of stdout.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    models_dir: Annotated[
        Path | None,
        typer.Option(
            "--models-dir", help="Point parameters.model at the installed folder <models-dir>/<name>."
        ),
    ] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Export an entry as a LocalAI model YAML that carries its pins."""
    from catalog.export import export_entry
    from gallery.yamlio import atomic_write

    entry = _load(catalog).get(name)
    model_path = None
    if models_dir is not None:
        model_path = models_dir.expanduser().resolve() / entry.name
        if not model_path.is_dir():
            raise UsageError(
                f"{entry.name} is not installed in {models_dir} (run `gallery install {entry.name}`)"
            )
    text = export_entry(entry, output_format.value, model_path=model_path)
    if output is None:
        emit(text)
        return
    atomic_write(output, text, overwrite=force)
    print(f"gallery: wrote {output}", file=sys.stderr)
