"""`gallery pull`, `ls` and `rm`: the models on this machine, as ollama, lms and hf users expect them.

- `pull SOURCE|NAME` installs a catalog entry, or imports a Hub repo into your catalog first and then installs
  it (one command); the files go to the Hugging Face cache at the pinned commit, sha256-verified.
- `ls` lists what is installed (name, backend, size, revision, where), from any working folder.
- `rm NAME` deletes an installed model's files (asks first, or --yes).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from catalog.index import Entry, catalog_search_path, load_catalogs
from catalog.install import installed_location, remove_installed, resolve_models_dir
from cli.catalog import (
    AcceptMissingTemplateOpt,
    BackendOpt,
    CatalogOpt,
    DrafterOpt,
    EntryNameOpt,
    JsonOpt,
    ModelsDirOpt,
    NameArg,
    RevisionOpt,
    add_entry,
    install_and_report,
    refuse_invalid,
)
from cli.output import emit, note, print_table, stdout_is_terminal, warn
from gallery.config import ModelConfig
from gallery.errors import UnsupportedModel, UsageError

app = typer.Typer()


def memory_fit(config: ModelConfig, *, force: bool = False) -> str:
    """One line on whether the model fits this machine's memory (importers.memory's estimate).

    Raises UnsupportedModel (exit 10) when it cannot run here at all, unless force.
    """
    from importers.memory import check_fit

    fit = check_fit(config)
    if fit.fits is False and not force:
        raise UnsupportedModel(f"{fit.warning}; pass --force to download it anyway")
    return f"memory: {fit.summary()}" + (f" — {fit.warning}" if fit.warning else "")


def _find(name: str, catalog: Path | None) -> Entry | None:
    loaded = load_catalogs(catalog_search_path(catalog))
    try:
        return loaded.get(name)
    except UsageError:
        return None


def _looks_like_repo(source: str) -> bool:
    return "/" in source or source.startswith(("hf://", "huggingface://", "https://"))


@app.command("pull")
def pull_command(
    source: Annotated[
        str,
        typer.Argument(
            help="A catalog name, or a Hub repo (org/name, hf://org/name, a Hub URL) to import first."
        ),
    ],
    name: EntryNameOpt = None,
    revision: RevisionOpt = None,
    backend: BackendOpt = None,
    accept_missing_template: AcceptMissingTemplateOpt = False,
    models_dir: ModelsDirOpt = None,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="Download even when the model does not fit this machine's memory.")
    ] = False,
    drafter: DrafterOpt = False,
) -> None:
    """Install a model: a catalog entry, or a Hub repo imported into your catalog first.

    The files go to the Hugging Face cache (or --models-dir) at the pinned commit, each sha256-verified; a second
    pull only re-verifies. Then `gallery chat NAME` or `gallery run NAME -p TEXT` from any folder.
    """
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # the import's small downloads run under the spinner: no tqdm bars between lines
    entry = _find(source, catalog) if name is None and revision is None else None
    if entry is None and not _looks_like_repo(source):
        raise UsageError(
            f"{source!r} is neither a catalog entry (see `gallery catalog`) nor a Hub repo id (org/name)"
        )
    if entry is None:
        existing = _same_repo(source, name, catalog) if revision is None and backend is None else None
        if existing is not None:
            entry = existing
            note(f"{source} is already in the catalog as {entry.name}")
        else:
            entry, path = add_entry(
                source,
                catalog=catalog,
                name=name,
                revision=revision,
                backend=backend,
                accept_missing_template=accept_missing_template,
                drafter=drafter,
            )
            note(f"imported {source} as {entry.name} into {path}")
    refuse_invalid(entry)
    note(memory_fit(entry.config, force=force))
    folder = install_and_report(entry, resolve_models_dir(models_dir), as_json=as_json)
    # The printed commands must work as typed: a models folder given on the command line is needed again.
    where = f" --models-dir {shlex.quote(str(resolve_models_dir(models_dir)))}" if models_dir else ""
    note(f"ready: `gallery chat {entry.name}{where}` or `gallery run {entry.name}{where} -p TEXT` ({folder})")


def _same_repo(source: str, name: str | None, catalog: Path | None) -> Entry | None:
    """An entry of the searched catalogs that already pins this repo (so a second pull does not import again)."""
    from importers.source import parse_source

    try:
        repo = parse_source(source).repo_id
    except Exception:  # not a repo spec after all: add_entry says why
        return None
    loaded = load_catalogs(catalog_search_path(catalog))
    for entry in loaded.entries:
        if entry.config.mlx.source.repo == repo and (name is None or entry.name == name):
            return entry
    return None


def installed_rows(catalog: Path | None, models_dir: Path | None) -> list[dict[str, Any]]:
    """Every installed model: catalog entries whose files are installed, and configs in the models dir."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    paths = catalog_search_path(catalog)
    entries = load_catalogs(paths).entries if any(p.is_file() for p in paths) else []
    for entry in entries:
        location = installed_location(entry, models_dir)
        if location is None:
            continue
        seen.add(entry.name)
        config = entry.config
        rows.append(
            {
                "name": entry.name,
                "backend": config.backend,
                "size": entry.meta.size,
                "repo": config.mlx.source.repo,
                "revision": config.mlx.source.revision,
                "where": str(location),
                "store": "models-dir" if models_dir is not None else "hf-cache",
            }
        )
    if models_dir is not None and models_dir.is_dir():
        rows.extend(_models_dir_rows(models_dir, seen))
    return rows


def _models_dir_rows(models_dir: Path, seen: set[str]) -> list[dict[str, Any]]:
    """Configs an install wrote into a models dir whose entry is in no searched catalog."""
    from catalog.index import human_size
    from gallery.configfile import read_config
    from gallery.errors import GalleryError

    rows = []
    for path in sorted(models_dir.glob("*.yaml")):
        if path.stem in seen:
            continue
        try:
            config = read_config(path)
        except GalleryError:
            continue
        rows.append(
            {
                "name": path.stem,
                "backend": config.backend,
                "size": human_size(config.mlx.total_size) if config.mlx.total_size else None,
                "repo": config.mlx.source.repo,
                "revision": config.mlx.source.revision,
                "where": config.parameters.model,
                "store": "models-dir",
            }
        )
    return rows


def _short_path(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home) :] if path.startswith(home + "/") else path


@app.command("list")
def list_command(
    models_dir: ModelsDirOpt = None,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List installed models (alias: ls): name, backend, size, revision and where the files are.

    The catalog's entries, installed or not: `gallery catalog`."""
    rows = installed_rows(catalog, resolve_models_dir(models_dir))
    if as_json:
        emit(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        note("no models installed yet: `gallery pull NAME` (see `gallery catalog`)")
        return
    print_table(
        ("NAME", "BACKEND", "SIZE", "REVISION", "WHERE"),
        [
            (r["name"], r["backend"], r["size"] or "-", (r["revision"] or "-")[:12], _short_path(r["where"]))
            for r in rows
        ],
        wrap=("WHERE",),
    )


app.command("ls", help="List installed models (alias of `list`).")(list_command)


@app.command("rm")
def rm_command(
    name: NameArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    models_dir: ModelsDirOpt = None,
    catalog: CatalogOpt = None,
) -> None:
    """Delete an installed model's files (the catalog entry stays; `gallery pull NAME` brings them back)."""
    folder = resolve_models_dir(models_dir)
    entry = _find(name, catalog)
    if entry is None:
        raise UsageError(f"no model named {name!r} (see `gallery ls`)")
    location = installed_location(entry, folder)
    if location is None:
        raise UsageError(
            f"{name} is not installed" + (f" in {folder}" if folder else "") + " (see `gallery ls`)"
        )
    sharing = [
        e.name
        for e in load_catalogs(catalog_search_path(catalog)).entries
        if e.name != entry.name
        and folder is None
        and (e.config.mlx.source.repo, e.config.mlx.source.revision)
        == (entry.config.mlx.source.repo, entry.config.mlx.source.revision)
    ]
    if sharing:
        warn(f"{', '.join(sharing)} use the same files and will need a pull again")
    if not yes:
        if not stdout_is_terminal() and not _stdin_is_terminal():
            raise UsageError(f"refusing to delete {location} without confirmation: pass --yes")
        if not typer.confirm(
            f"delete {name} ({entry.meta.size or 'size unknown'}) from {location}?", default=False
        ):
            note("nothing deleted")
            raise typer.Exit(1)
    removed = remove_installed(entry, folder)
    note(f"removed {name}: " + ", ".join(_short_path(str(p)) for p in removed))


def _stdin_is_terminal() -> bool:
    import sys

    return sys.stdin.isatty()
