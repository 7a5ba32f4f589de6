"""The one place a model spec becomes a config: config file, catalog entry, installed model, folder or Hub repo.

Every command and interface that takes a model (`gallery run`, `chat`, `serve`, `explain`, gRPC LoadModel,
stdio `load`, the HTTP server's `model`) resolves it here, in the same order:
1. a config file that exists (YAML or JSON), relative to the working folder or to a base folder (LocalAI's
   models directory);
2. a model folder that exists: with a revision asked for, the catalog entry pinned at it whose files the
   folder holds (a LocalAI gallery install); else imported on the fly from its metadata;
3. a catalog entry name (the user's catalog, then the bundled one): its installed copy first — in the models
   folder when one is given, else the entry's verified files in the Hugging Face cache — else its pinned
   config (whose weights then come from the cache, or a download when allowed);
4. a Hub repo id or URL: an installed catalog entry of that repo first (no network), else the commit's
   snapshot in the Hugging Face cache when the revision is a full commit (no network), else an import on
   the fly through the Hub (or the local cache when offline), which records the commit it resolved.
A spec that looks like a config file or a path but does not exist is an error at once, rather than being
tried as a repo id.

A revision (`org/name@REV`, `NAME@REV`, or the `revision` argument: LoadModel's `revision:` option) is
honoured on every route: a repo is read at that revision, and a config, entry or installed model whose pin
is another commit is refused by name rather than loaded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from catalog.index import Entry, catalog_search_path, load_catalogs
from catalog.install import installed_location, resolve_models_dir
from gallery import hub
from gallery.config import ModelConfig
from gallery.configfile import read_config
from gallery.errors import BadConfig, ModelNotFound, UsageError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
MAX_SPEC_CHARS = 4096
_ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
_COMMIT = re.compile(r"[0-9a-f]{40}")

SpecKind = Literal["file", "folder", "installed", "entry", "repo"]


@dataclasses.dataclass
class Resolved:
    """A resolved spec: the config, the folder its relative paths resolve against, what the spec was, and the
    importer's warnings when it was imported on the fly."""

    config: ModelConfig
    base: Path | None
    kind: SpecKind
    spec: str
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def imported_note(self) -> str | None:
        """For an import on the fly: which commit it pinned (and what was asked for), else None."""
        if self.kind not in ("repo", "folder"):
            return None
        source = self.config.mlx.source
        if not source.repo or not source.revision:
            return None
        asked = source.requested_revision or "main"
        return f"imported {source.repo} at commit {source.revision} ({asked} resolved to it)"


def looks_like_config_file(spec: str) -> bool:
    """Whether a spec names a config file (by its suffix), existing or not."""
    return Path(spec).suffix.lower() in CONFIG_SUFFIXES


def resolve_spec(
    spec: str,
    *,
    catalog: str | Path | None = None,
    models_dir: str | Path | None = None,
    base_dirs: Sequence[str | Path] = (),
    revision: str | None = None,
) -> Resolved:
    """Resolve a model spec to its config (no weights are read). See the module docstring for the order.

    Raises ModelNotFound (exit 3) when the spec names nothing, BadConfig for a broken config or catalog entry,
    UsageError when a revision is asked for that the spec's pin is not, and the importer's errors when an
    import on the fly fails (a revision the Hub does not have: exit 5; offline and not cached: exit 6).
    """
    spec = spec.strip() if isinstance(spec, str) else ""
    if not spec:
        raise UsageError(
            "no model given: give a config file, catalog entry name, model folder or Hub repo id"
        )
    if len(spec) > MAX_SPEC_CHARS or "\x00" in spec:
        raise UsageError(
            f"model spec of {len(spec)} characters is not a config file, entry name, folder or repo id"
        )
    if revision is not None and not _REVISION.fullmatch(revision.strip()):
        raise UsageError(f"revision {revision!r} is not a branch, tag or commit name")
    revision = revision.strip() if revision else None
    path = _locate(spec, base_dirs)
    if path is None:
        spec, revision = _split_revision(spec, revision)
    resolved = _resolve(spec, path, catalog, models_dir, revision)
    if revision is not None:
        _check_revision(resolved, revision)
    return resolved


def _split_revision(spec: str, revision: str | None) -> tuple[str, str | None]:
    """`NAME@REV` / `org/name@REV` (what a request's `model` may say) into the name and the revision."""
    name, at, rev = spec.rpartition("@")
    if not at or not name or not _REVISION.fullmatch(rev) or "://" in spec or looks_like_config_file(spec):
        return spec, revision
    if not (_ENTRY_NAME.fullmatch(name) or _REPO_ID.fullmatch(name)):
        return spec, revision
    if revision is not None and revision != rev:
        raise UsageError(f"{spec}: names revision {rev!r}, but revision {revision!r} was asked for too")
    return name, rev


def _resolve(
    spec: str,
    path: Path | None,
    catalog: str | Path | None,
    models_dir: str | Path | None,
    revision: str | None,
) -> Resolved:
    if path is not None and path.is_file():
        return Resolved(read_config(path), path.parent.resolve(), "file", spec)
    if path is not None and path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{spec}: the folder has no config.json (not a model folder)", spec=spec)
        pinned = find_pinned_folder(path, revision, catalog=catalog) if revision is not None else None
        return pinned or _import(str(path), spec, "folder")
    found = find_entry(spec, catalog=catalog, models_dir=models_dir)
    if found is not None:
        return found
    if looks_like_config_file(spec):
        raise ModelNotFound(f"{spec}: no such config file", spec=spec)
    if spec.startswith(("/", "./", "../", "~")):
        raise ModelNotFound(f"{spec}: no such file or folder", spec=spec)
    if _REPO_ID.fullmatch(spec):
        installed = find_installed_repo(spec, revision, catalog=catalog, models_dir=models_dir)
        if installed is not None:
            return installed
        cached = _cached_commit(spec, revision)
        if cached is not None:  # the exact commit is in the HF cache: read it there, no network
            return _import(str(cached), spec, "repo")
    try:
        return _import(spec, spec, "repo", revision)
    except UsageError as exc:  # not a repo id either: the spec names nothing
        raise ModelNotFound(
            f"{spec}: not a config file, catalog entry, model folder or Hub repo id ({exc})", spec=spec
        ) from None


def revision_matches(pinned: str | None, requested_revision: str | None, revision: str) -> bool:
    """Whether a pin (full commit, and the branch or tag it was asked as) is the revision asked for; a
    commit may be abbreviated to 7+ hex digits."""
    if pinned is None:
        return False
    if revision in (pinned, requested_revision):
        return True
    return (
        len(revision) >= 7
        and re.fullmatch(r"[0-9a-f]+", revision) is not None
        and pinned.startswith(revision)
    )


def _check_revision(resolved: Resolved, revision: str) -> None:
    """Refuse, by name, a resolved config whose pin is not the revision asked for."""
    source = resolved.config.mlx.source
    if revision_matches(source.revision, source.requested_revision, revision):
        return
    what = {
        "file": "the config",
        "folder": "the folder",
        "installed": "the installed model",
        "entry": "the entry",
    }
    if source.revision is None:
        raise UsageError(
            f"{resolved.spec}: revision {revision!r} asked for, but {what.get(resolved.kind, 'it')} pins no "
            "revision (a local folder has none)"
        )
    raise UsageError(
        f"{resolved.spec}: revision {revision!r} asked for, but {what.get(resolved.kind, 'it')} pins "
        f"{source.repo or resolved.config.name}@{source.revision}"
        + (f"; load {source.repo}@{revision} to import that revision" if source.repo else "")
    )


def find_installed_repo(
    repo: str,
    revision: str | None = None,
    *,
    catalog: str | Path | None = None,
    models_dir: str | Path | None = None,
) -> Resolved | None:
    """An installed catalog entry pinning `repo` (at `revision` when given), found without the network.

    Several installed entries of one repo: the first in catalog order (the user's catalog first)."""
    paths = catalog_search_path(catalog)
    if not any(p.exists() for p in paths):
        return None
    folder = resolve_models_dir(models_dir)
    try:
        loaded = load_catalogs(paths)
    except BadConfig:
        return None
    for entry in loaded.entries:
        source = entry.config.mlx.source
        if (source.repo or "").lower() != repo.lower():
            continue
        if revision is not None and not revision_matches(
            source.revision, source.requested_revision, revision
        ):
            continue
        found = _installed(entry, folder, paths)
        if found is not None:
            return found
    return None


def find_pinned_folder(folder: Path, revision: str, *, catalog: str | Path | None = None) -> Resolved | None:
    """A folder holding a catalog entry's files (what LocalAI's gallery install leaves in `<models>/<name>/`),
    as that entry's pinned config, when the entry pins `revision`; an entry named like the folder first."""
    paths = catalog_search_path(catalog)
    if not any(p.exists() for p in paths):
        return None
    try:
        loaded = load_catalogs(paths)
    except BadConfig:
        return None
    entries = sorted(loaded.entries, key=lambda entry: entry.name != folder.name)
    for entry in entries:
        source = entry.config.mlx.source
        if not entry.meta.files or not revision_matches(source.revision, source.requested_revision, revision):
            continue
        if all((folder / file.filename).is_file() for file in entry.meta.files):
            config = entry.config.model_copy(deep=True)
            config.parameters.model = str(folder.resolve())
            return Resolved(config, folder.resolve(), "installed", entry.name)
    return None


def _installed(entry: Entry, folder: Path | None, paths: list[Path]) -> Resolved | None:
    """The entry's installed copy as a Resolved, or None when it is not installed."""
    if folder is not None:
        installed = folder / f"{entry.name}.yaml"
        if installed.is_file() and installed_location(entry, folder) is not None:
            return Resolved(read_config(installed), installed.parent, "installed", entry.name)
        return None
    location = installed_location(entry)
    if location is None:
        return None
    base = entry.index_path.parent if entry.index_path is not None else paths[0].parent
    config = entry.config.model_copy(deep=True)
    config.parameters.model = str(location)  # the verified snapshot: the loader needs no look-up
    return Resolved(config, base, "installed", entry.name)


def _cached_commit(repo: str, revision: str | None) -> Path | None:
    """The HF cache's snapshot folder of `repo` at a full commit, when it holds config.json."""
    if revision is None or not _COMMIT.fullmatch(revision):
        return None
    try:
        folder = hub.repo_cache_folder(repo) / "snapshots" / revision
        # An import alone caches the metadata files: only a snapshot with weights is a model to load.
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*/*.safetensors"))
        return folder if (folder / "config.json").is_file() and has_weights else None
    except OSError:
        return None


def _locate(spec: str, base_dirs: Sequence[str | Path]) -> Path | None:
    """The existing file or folder a spec names (relative paths also under each base folder), else None."""
    try:
        path = Path(spec).expanduser()
        candidates = [path]
        if not path.is_absolute():
            candidates += [Path(base).expanduser() / spec for base in base_dirs if base]
        for candidate in candidates:
            if candidate.exists():
                return candidate
    except OSError:  # a name the file system cannot even look up (too long, …)
        return None
    return None


def find_entry(
    name: str, *, catalog: str | Path | None = None, models_dir: str | Path | None = None
) -> Resolved | None:
    """A catalog entry by name: its installed copy when there is one, else the catalog's pinned config.

    Installed means: `<models-dir>/<name>.yaml` when a models dir is given (--models-dir or
    $GALLERY_MODELS_DIR), else every pinned file in the Hugging Face cache at the pinned commit — found the same
    from any working folder. The catalogs searched are the one named (--catalog, $GALLERY_CATALOG), else the
    user's catalog and the bundled one. None when `name` is no entry name (the caller then tries the spec's
    other meanings); BadConfig when the catalog or the entry is broken.
    """
    if not _ENTRY_NAME.fullmatch(name) or ".." in name:
        return None
    folder = resolve_models_dir(models_dir)
    if folder is not None and (folder / f"{name}.yaml").is_file():
        installed = folder / f"{name}.yaml"
        return Resolved(read_config(installed), installed.parent, "installed", name)
    paths = catalog_search_path(catalog)
    if not any(path.exists() for path in paths):
        if catalog is not None:
            raise BadConfig("no such catalog", file=paths[0])
        return None
    loaded = load_catalogs(paths)
    try:
        entry = loaded.get(name)
    except UsageError:
        return None
    base = entry.index_path.parent if entry.index_path is not None else paths[0].parent
    location = installed_location(entry) if folder is None else None
    if location is not None:
        config = entry.config.model_copy(deep=True)
        config.parameters.model = str(location)  # the verified snapshot: the loader needs no look-up
        return Resolved(config, base, "installed", name)
    return Resolved(entry.config, base, "entry", name)


def _import(source: str, spec: str, kind: SpecKind, revision: str | None = None) -> Resolved:
    from importers import import_model

    result = import_model(source, revision=revision)
    return Resolved(result.config, None, kind, spec, list(result.warnings))
