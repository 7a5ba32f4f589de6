"""The one place a model spec becomes a config: config file, catalog entry, installed model, folder or Hub repo.

Every command and interface that takes a model (`gallery run`, `chat`, `serve`, `explain`, gRPC LoadModel,
stdio `load`, the HTTP server's `model`) resolves it here, in the same order:
1. a config file that exists (YAML or JSON), relative to the working folder or to a base folder (LocalAI's
   models directory);
2. a model folder that exists (imported on the fly from its metadata);
3. a catalog entry name (the user's catalog, then the bundled one): its installed copy first — in the models
   folder when one is given, else the entry's verified files in the Hugging Face cache — else its pinned
   config (whose weights then come from the cache, or a download when allowed);
4. a Hub repo id or URL (imported on the fly through the Hub, or the local cache when offline).
A spec that looks like a config file or a path but does not exist is an error at once, rather than being
tried as a repo id.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from catalog.index import catalog_search_path, load_catalogs
from catalog.install import installed_location, resolve_models_dir
from gallery.config import ModelConfig
from gallery.configfile import read_config
from gallery.errors import BadConfig, ModelNotFound, UsageError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
MAX_SPEC_CHARS = 4096
_ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

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


def looks_like_config_file(spec: str) -> bool:
    """Whether a spec names a config file (by its suffix), existing or not."""
    return Path(spec).suffix.lower() in CONFIG_SUFFIXES


def resolve_spec(
    spec: str,
    *,
    catalog: str | Path | None = None,
    models_dir: str | Path | None = None,
    base_dirs: Sequence[str | Path] = (),
) -> Resolved:
    """Resolve a model spec to its config (no weights are read). See the module docstring for the order.

    Raises ModelNotFound (exit 3) when the spec names nothing, BadConfig for a broken config or catalog entry,
    and the importer's errors when an import on the fly fails.
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
    path = _locate(spec, base_dirs)
    if path is not None and path.is_file():
        return Resolved(read_config(path), path.parent.resolve(), "file", spec)
    if path is not None and path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{spec}: the folder has no config.json (not a model folder)", spec=spec)
        return _import(str(path), spec, "folder")
    found = find_entry(spec, catalog=catalog, models_dir=models_dir)
    if found is not None:
        return found
    if looks_like_config_file(spec):
        raise ModelNotFound(f"{spec}: no such config file", spec=spec)
    if spec.startswith(("/", "./", "../", "~")):
        raise ModelNotFound(f"{spec}: no such file or folder", spec=spec)
    try:
        return _import(spec, spec, "repo")
    except UsageError as exc:  # not a repo id either: the spec names nothing
        raise ModelNotFound(
            f"{spec}: not a config file, catalog entry, model folder or Hub repo id ({exc})", spec=spec
        ) from None


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


def _import(source: str, spec: str, kind: SpecKind) -> Resolved:
    from importers import import_model

    result = import_model(source)
    return Resolved(result.config, None, kind, spec, list(result.warnings))
