"""The catalog commands of the `gallery` CLI: validate, list, show, search, add, refresh, install, export.

The root app (cli.app) adds them. Every command takes --catalog PATH; without it names are looked up in the
user's catalog and then the bundled one, and `add` / `refresh --write` write the user's catalog (never the
installed package's). Human output by default and JSON with --json; every failure is one line and a
documented exit code.
"""

from __future__ import annotations

import json
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from catalog.index import (
    Catalog,
    Entry,
    catalog_search_path,
    index_data,
    load_catalog_strict,
    load_catalogs,
    resolve_catalog_path,
    writable_catalog_path,
    write_catalog,
)
from cli.output import download_progress, emit, note, print_table, spinner, warn
from gallery.errors import BadConfig, OutputExists, UsageError, ValidationFailed, WriteFailed

CatalogOpt = Annotated[
    Path | None,
    typer.Option(
        "--catalog",
        help="Catalog index (or its folder). Default: $GALLERY_CATALOG, else yours and the bundled one.",
    ),
]
ModelsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        help="Install into this plain folder ($GALLERY_MODELS_DIR) instead of the Hugging Face cache.",
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
    lmstudio = "lmstudio"


def entry_names(incomplete: str) -> list[str]:
    """Shell completion: the catalog's entry names that start with what was typed."""
    try:
        names = load_catalogs(catalog_search_path(None)).names()
    except Exception:  # completion must never print a traceback into the shell
        return []
    return [name for name in names if name.startswith(incomplete)]


NameArg = Annotated[str, typer.Argument(help="Entry name.", autocompletion=entry_names)]


def _load(catalog: Path | None) -> Catalog:
    """Load the catalog leniently, warning (once, on stderr) about entries that are skipped as invalid."""
    loaded = load_catalogs(catalog_search_path(catalog))
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


def _row(entry: Entry, *, installed: Path | None = None) -> dict[str, Any]:
    from catalog.install import missing_weights_reason

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
        "weights": missing_weights_reason(entry) is None,
        "installed": str(installed) if installed is not None else None,
    }


def _status(row: dict[str, Any]) -> Any:
    from rich.text import Text

    if not row["weights"]:
        return Text("no weights", style="yellow")
    return Text("installed", style="green") if row["installed"] else ""


def _rows(entries: list[Entry]) -> list[dict[str, Any]]:
    from catalog.install import installed_location, resolve_models_dir

    models_dir = resolve_models_dir(None)
    return [_row(e, installed=installed_location(e, models_dir)) for e in entries]


def _print_entries(entries: list[Entry], as_json: bool) -> None:
    rows = _rows(entries)
    if as_json:
        emit(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        return
    if not rows:
        emit("(no entries)\n")
        return
    print_table(
        ("NAME", "BACKEND", "SIZE", "STATUS", "LICENSE", "DESCRIPTION"),
        [
            (
                r["name"],
                r["backend"],
                r["size"] or "-",
                _status(r),
                r["license"] or "-",
                r["description"] or "",
            )
            for r in rows
        ],
        wrap=("DESCRIPTION",),
    )


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
    as_json: Annotated[bool, typer.Option("--json", help="The same as --format json.")] = False,
) -> None:
    """Check catalogs and configs offline (CI). Exit 0 ok, 14 problems found, 13 a file could not be read."""
    from catalog.validate import format_report, validate_paths

    targets = list(paths or []) or [resolve_catalog_path(catalog)]
    report = validate_paths(targets)
    emit(format_report(report, "json" if as_json else output.value, strict=strict))
    code = report.exit_code(strict=strict)
    if code:
        raise typer.Exit(code)


@app.command("catalog")
def catalog_command(catalog: CatalogOpt = None, as_json: JsonOpt = False) -> None:
    """List the catalog's entries, installed or not (STATUS: installed, or no weights to install).

    `gallery list` (or `ls`) lists what is installed, as in ollama; `gallery search WORD…` narrows this list."""
    _print_entries(_load(catalog).entries, as_json)


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
    _print_entries(found, as_json)


@app.command("show")
def show_command(
    name: NameArg,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one entry: its pins (repo, commit, files with sha256), backend, stop set and template."""
    from catalog.install import installed_location, missing_weights_reason, resolve_models_dir

    entry = _load(catalog).get(name)
    config = entry.config
    location = installed_location(entry, resolve_models_dir(None))
    no_weights = missing_weights_reason(entry)
    if as_json:
        emit(
            json.dumps(
                {
                    "index": entry.meta.model_dump(exclude={"config"}),
                    "config_file": entry.config_ref,
                    "catalog": str(entry.index_path) if entry.index_path else None,
                    "installed": str(location) if location else None,
                    "weights": no_weights is None,
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
        f"catalog:      {entry.index_path or '-'}",
        "installed:    "
        + (
            str(location)
            if location
            else "no weights to install"
            if no_weights
            else f"no (gallery pull {entry.name})"
        ),
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


SourceArg = Annotated[str, typer.Argument(help="Hub repo: org/name, hf://org/name or a Hub URL.")]
EntryNameOpt = Annotated[str | None, typer.Option("--name", help="Entry name (default: from the repo name).")]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Branch, tag or commit to pin (default: main).")
]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="Force a backend: mlx or mlx-vlm.")]
AcceptMissingTemplateOpt = Annotated[
    bool,
    typer.Option(
        "--accept-missing-template", help="Accept a repo without a usable chat template (marks the entry)."
    ),
]


DrafterOpt = Annotated[
    bool,
    typer.Option(
        "--drafter", help="Pin the model's documented drafter (checked against it); pull fetches it too."
    ),
]


def add_entry(
    source: str,
    *,
    catalog: Path | None,
    name: str | None = None,
    revision: str | None = None,
    backend: str | None = None,
    description: str | None = None,
    icon: str | None = None,
    tags: list[str] | None = None,
    accept_missing_template: bool = False,
    inline: bool = False,
    drafter: bool = False,
) -> tuple[Entry, Path]:
    """Import SOURCE into the writable catalog (the one named, else the user's); returns the entry and index.

    Exit 11 when the name is taken (in that catalog or one searched with it), 14 when the new entry would fail
    `gallery validate`. Writes are atomic and keep the index's comments and key order.
    """
    from catalog.build import build_entry

    path = writable_catalog_path(catalog)
    current = load_catalog_strict(path) if path.exists() else Catalog(path=path, entries=[], problems=[])
    others = [p for p in catalog_search_path(catalog) if p != path and p.is_file()]
    searched = load_catalogs(others).entries if others else []
    taken = {n.lower(): path for n in current.names()} | {
        e.name.lower(): e.index_path or path for e in searched if e.name.lower() not in current.names()
    }
    if name is not None and name.lower() in taken:
        raise OutputExists(f"{taken[name.lower()]} already has an entry named {name!r}", path=path)
    with spinner(f"importing {source}"):
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
            drafter=drafter,
        )
    entry = built.entry
    if entry.name.lower() in taken:
        raise OutputExists(
            f"{taken[entry.name.lower()]} already has an entry named {entry.name!r} (choose another with --name)",
            path=path,
        )
    for message in built.warnings:
        warn(message)
    repo = entry.config.mlx.source.repo
    same_repo = [e.name for e in [*current.entries, *searched] if e.config.mlx.source.repo == repo]
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
    entry.index_path = path
    return entry, path


@app.command("add")
def add_command(
    source: SourceArg,
    name: EntryNameOpt = None,
    revision: RevisionOpt = None,
    backend: BackendOpt = None,
    description: Annotated[str | None, typer.Option("--description", help="Curated description.")] = None,
    icon: Annotated[str | None, typer.Option("--icon", help="Icon URL (https).")] = None,
    tags: Annotated[
        list[str] | None, typer.Option("--tag", help="Tag (repeatable; default: derived).")
    ] = None,
    accept_missing_template: AcceptMissingTemplateOpt = False,
    inline: Annotated[
        bool, typer.Option("--inline", help="Put the config inline in the index, not in entries/.")
    ] = False,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
    drafter: DrafterOpt = False,
) -> None:
    """Import a Hub repo into a catalog (yours unless --catalog): entries/<name>.yaml plus the index entry.

    Exit 11 when the name is taken, 14 when the new entry would fail `gallery validate`.
    """
    entry, path = add_entry(
        source,
        catalog=catalog,
        name=name,
        revision=revision,
        backend=backend,
        description=description,
        icon=icon,
        tags=tags,
        accept_missing_template=accept_missing_template,
        inline=inline,
        drafter=drafter,
    )
    if as_json:
        emit(json.dumps(index_data(entry), indent=2, ensure_ascii=False) + "\n")
    note(
        f"added {entry.name} ({entry.config.backend}, {len(entry.meta.files)} files, "
        f"{entry.meta.size or 'size unknown'}) to {path}"
    )


@app.command("refresh")
def refresh_command(
    names: Annotated[list[str] | None, typer.Argument(help="Entries to refresh (default: all).")] = None,
    write: Annotated[
        bool, typer.Option("--write", help="Rewrite drifted entries (atomically, comments kept).")
    ] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Entries re-imported at once.")] = 4,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-import entries against the Hub and report drift. Exit 15 if any drifted (even with --write).

    --write changes the catalog named with --catalog, else yours; never the installed package's.
    """
    from catalog.refresh import format_refresh, refresh_catalog

    if write:
        path = writable_catalog_path(catalog)
        if not path.is_file():
            raise UsageError(f"no catalog at {path} to rewrite: name one with --catalog PATH")
        loaded = load_catalog_strict(path)
    else:
        loaded = _load(catalog)
    report = refresh_catalog(loaded, names or [], write=write, jobs=jobs)
    emit(format_refresh(report, as_json=as_json, write=write))
    code = report.exit_code()
    if code:
        raise typer.Exit(code)


def install_and_report(entry: Entry, models_dir: Path | None, *, as_json: bool) -> Path:
    """Install an entry (HF cache, or a models dir) with progress on stderr; returns where its files are."""
    from catalog.install import check_models_dir, install_entry

    check_models_dir(models_dir)
    from huggingface_hub.utils import disable_progress_bars

    # huggingface_hub's own tqdm bars never draw: at a terminal the one rich display below shows the download,
    # piped nothing does (no carriage-return bars in a log file).
    disable_progress_bars()
    with download_progress() as tqdm_class:  # one rich display at a terminal, nothing when piped
        result = install_entry(entry, models_dir, tqdm_class=tqdm_class)
    if as_json:
        emit(
            json.dumps(
                {
                    "name": result.name,
                    "store": result.store,
                    "folder": str(result.folder),
                    "config": str(result.config_path) if result.config_path else None,
                    "downloaded": result.downloaded,
                    "verified": result.verified,
                    "config_written": result.config_written,
                    "removed_partials": result.removed_partials,
                },
                indent=2,
            )
            + "\n"
        )
    state = "installed" if result.changed else "already installed, every file verified"
    where = result.config_path if result.config_path is not None else result.folder
    note(f"{result.name}: {state} ({entry.meta.size or 'size unknown'}); {where}")
    return result.folder


@app.command("install")
def install_command(
    name: NameArg,
    models_dir: ModelsDirOpt = None,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download an entry's pinned files into the Hugging Face cache (or --models-dir), each sha256-verified.

    Exit 16 when a file does not match its sha256 (the file is removed), 10 for an entry without weights, 4 for
    a gated repo without access, 18 when the disk is full.
    """
    from catalog.install import resolve_models_dir

    loaded = _load(catalog)
    entry = loaded.get(name)
    refuse_invalid(entry)
    install_and_report(entry, resolve_models_dir(models_dir), as_json=as_json)


def refuse_invalid(entry: Entry) -> None:
    """Run the full validation on the entry's catalog and refuse an entry with errors (never install a broken pin)."""
    from catalog.validate import validate_paths

    if entry.index_path is None:
        return
    report = validate_paths([entry.index_path])
    errors = [p for p in report.sorted_problems() if p.severity == "error" and p.entry == entry.name]
    if errors:
        first = errors[0]
        raise BadConfig(
            f"catalog entry {entry.name!r} is invalid: [{first.code}] {first.message} "
            "(run `gallery validate`)"
        )


def check_output_path(output: Path) -> None:
    """An output file's folder must exist: a typo in -o must not create a tree of folders."""
    parent = output.expanduser().parent
    if not parent.is_dir():
        raise WriteFailed(output, f"the folder {parent} does not exist")


@app.command("export")
def export_command(
    name: NameArg,
    output_format: Annotated[
        ExportFormat, typer.Option("--format", help="localai (LocalAI model YAML) or lmstudio (model.yaml).")
    ] = ExportFormat.localai,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here instead of stdout (- is stdout).")
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
    """Export an entry as a LocalAI model YAML or an LM Studio model.yaml that carries its pins."""
    from catalog.export import export_entry
    from catalog.install import installed_location
    from gallery.yamlio import atomic_write

    entry = _load(catalog).get(name)
    model_path = None
    if models_dir is not None:
        model_path = installed_location(entry, models_dir.expanduser().resolve())
        if model_path is None:
            raise UsageError(
                f"{entry.name} is not installed in {models_dir} (run `gallery install {entry.name} "
                f"--models-dir {models_dir}`)"
            )
    text = export_entry(entry, output_format.value, model_path=model_path)
    if output is None or str(output) == "-":
        emit(text)
        return
    check_output_path(output)
    atomic_write(output, text, overwrite=force)
    note(f"wrote {output}")
