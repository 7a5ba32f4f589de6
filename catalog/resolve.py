"""The one place a model spec becomes a config: config file, catalog entry, installed model, folder or Hub repo.

Every command and interface that takes a model (`gallery run`, `chat`, `serve`, `explain`, gRPC LoadModel,
stdio `load`, the HTTP server's `model`) resolves it here, in the same order:
1. a config file that exists (YAML or JSON), relative to the working folder or to a base folder (LocalAI's
   models directory);
2. a model folder that exists (imported on the fly from its metadata);
3. a catalog entry name: its installed copy in the models folder first (it points at verified local files),
   else the catalog's pinned config;
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

from catalog.index import load_catalog, resolve_catalog_path
from catalog.install import resolve_models_dir
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

    None when `name` is not an entry name of the catalog (the caller then tries the spec's other meanings);
    BadConfig when the catalog or the entry is broken.
    """
    if not _ENTRY_NAME.fullmatch(name) or ".." in name:
        return None
    installed = resolve_models_dir(models_dir) / f"{name}.yaml"
    if installed.is_file():
        return Resolved(read_config(installed), installed.parent, "installed", name)
    path = resolve_catalog_path(catalog)
    if not path.exists():
        if catalog is not None:
            raise BadConfig("no such catalog", file=path)
        return None
    loaded = load_catalog(path)
    try:
        entry = loaded.get(name)
    except UsageError:
        return None
    return Resolved(entry.config, path.parent, "entry", name)


def _import(source: str, spec: str, kind: SpecKind) -> Resolved:
    from importers import import_model

    result = import_model(source)
    return Resolved(result.config, None, kind, spec, list(result.warnings))
