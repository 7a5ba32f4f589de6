"""The catalog: a LocalAI-style `index.yaml` whose entries each pin a ModelConfig and the files to install.

    - name: qwen3-4b-4bit                 # equals the config's name; becomes <models-dir>/<name>.yaml
      description: …
      license: apache-2.0
      icon: https://…                     # optional
      tags: [mlx, chat, qwen3, 4bit]
      urls: [https://huggingface.co/mlx-community/Qwen3-4B-4bit]
      size: 2.26 GB                       # what an install downloads
      config: entries/qwen3-4b-4bit.yaml  # or the config inline, as a mapping
      files:                              # every file an install downloads, each with its sha256
        - filename: config.json
          sha256: 3f1c…
          uri: https://huggingface.co/mlx-community/Qwen3-4B-4bit/resolve/<commit>/config.json

Reading is lenient where it can be (one broken entry must not hide the others, the lesson of LocalAI's
gallery) and exact about where each problem is: every Problem carries its file and line. The entry format
(Entry, IndexEntry, CatalogFile, Problem) lives in catalog.entry and is re-exported here; the deep checks
(templates, stop sets, hashes against the config) live in catalog.validate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

# The entry format lives in catalog.entry; its names stay importable from here (re-exported).
from catalog.entry import (  # noqa: F401
    CatalogFile,
    Entry,
    IndexEntry,
    Problem,
    Severity,
    describe_location,
    file_uri,
    human_size,
    install_files,
    path_problem,
    repo_url,
)
from catalog.export import localai_data
from gallery.config import SUPPORTED_BACKENDS, ModelConfig
from gallery.configfile import MAX_CONFIG_BYTES, schema_errors
from gallery.errors import BadConfig, OutputExists, UsageError
from gallery.yamlio import YamlDocument, atomic_write, dump_yaml, read_yaml_file

INDEX_FILE = "index.yaml"
ENTRIES_DIR = "entries"
CATALOG_ENV = "GALLERY_CATALOG"
HOME_ENV = "GALLERY_HOME"
MAX_INDEX_BYTES = 64 * 1024 * 1024

INDEX_HEADER = (
    "# MLX model gallery: a LocalAI-style index. Each entry pins a ModelConfig (`config:`) and every file an\n"
    "# install downloads, with its sha256. Check it with `gallery validate`; re-pin it with `gallery refresh --write`.\n"
    "# Written by `gallery add` / `gallery refresh --write` / `python -m fixtures.catalog_seed`.\n"
)


# ----------------------------------------------------------------------------------------------- paths
def bundled_catalog_path() -> Path:
    """The catalog shipped inside the package (catalog/index.yaml): read-only, never written by a command."""
    return Path(__file__).resolve().parent / INDEX_FILE


def gallery_home() -> Path:
    """The user's own folder for this tool: $GALLERY_HOME, else $XDG_DATA_HOME/mlx-gallery, else
    ~/.local/share/mlx-gallery (the user-level catalog lives here, never inside the installed package)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path("~/.local/share").expanduser())
    return Path(data).expanduser() / "mlx-gallery"


def user_catalog_path() -> Path:
    """The user-level catalog that `gallery add` and `gallery pull` write when no catalog is named."""
    return gallery_home() / "catalog" / INDEX_FILE


def _as_index(path: Path) -> Path:
    # A folder (existing, or a new path without a YAML suffix) means the index.yaml inside it.
    is_folder = path.is_dir() or (not path.exists() and path.suffix.lower() not in (".yaml", ".yml"))
    return path / INDEX_FILE if is_folder else path


def _named_catalog(option: Path | str | None) -> Path | None:
    chosen = option if option not in (None, "") else os.environ.get(CATALOG_ENV) or None
    return _as_index(Path(chosen).expanduser()) if chosen is not None else None


def resolve_catalog_path(option: Path | str | None = None) -> Path:
    """The catalog to read when one is meant: --catalog, else $GALLERY_CATALOG, else the bundled one."""
    return _named_catalog(option) or bundled_catalog_path()


def catalog_search_path(option: Path | str | None = None) -> list[Path]:
    """The catalogs names are looked up in: the one named (--catalog / $GALLERY_CATALOG), else the user's
    catalog (when it exists) and then the bundled one."""
    named = _named_catalog(option)
    if named is not None:
        return [named]
    user = user_catalog_path()
    return [user, bundled_catalog_path()] if user.is_file() else [bundled_catalog_path()]


def writable_catalog_path(option: Path | str | None = None) -> Path:
    """The catalog `add`, `pull` and `refresh --write` change: the one named, else the user-level catalog.

    Never the catalog inside an installed package (site-packages): that file is replaced by every upgrade.
    A source checkout's catalog/index.yaml can be named explicitly (that is how its maintainers refresh it).
    """
    path = _named_catalog(option) or user_catalog_path()
    if path.resolve() == bundled_catalog_path() and any(
        part in ("site-packages", "dist-packages") for part in path.resolve().parts
    ):
        raise UsageError(
            f"refusing to write {path}: it belongs to the installed package; name your own catalog with "
            f"--catalog PATH (or leave it out to use {user_catalog_path()})"
        )
    return path


# ----------------------------------------------------------------------------------------------- reading
def read_document(path: Path, limit: int, what: str) -> YamlDocument:
    """Read and parse a YAML file. Raises BadConfig naming the file and line when it cannot be read."""
    return read_yaml_file(path, limit=limit, what=what)


def schema_problems(
    exc: ValidationError, file: str, doc: YamlDocument, prefix: tuple[Any, ...], entry: str | None
) -> list[Problem]:
    """One Problem per pydantic error, at the line of the offending key, with a code for the kind of error."""
    problems: list[Problem] = []
    seen: set[Problem] = set()  # a set, not `in problems`: 15,000 bad stopwords made this quadratic (16 s)
    for loc, kind, message, value in schema_errors(exc):
        if len(loc) == 2 and loc[0] == "config" and loc[1] in ("str", "dict[str,any]"):
            # `config: str | dict` reports one error per union member: say it once, plainly.
            loc, message = (
                ("config",),
                "must be a path to the entry's config file, or the config as a mapping",
            )
        where = ".".join(str(part) for part in loc) or "(top level)"
        code = "schema"
        last = loc[-1] if loc else None
        if loc == ("backend",) and kind == "literal_error":
            code = "unsupported-backend"
            message = f"backend {value!r} is not supported (supported: {', '.join(SUPPORTED_BACKENDS)})"
        elif last == "revision":
            code = "bad-revision"
        elif last == "sha256":
            code = "bad-sha256"
        elif last in ("filename", "config") and (
            "escapes" in message or "absolute" in message or "backslash" in message or "NUL" in message
        ):
            code = "unsafe-path"
        problem = Problem(file, doc.line(*prefix, *loc), "error", code, f"{where}: {message}", entry)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


@dataclasses.dataclass
class RawEntry:
    """One entry as read, before and after validation, with what is needed to locate its problems."""

    position: int
    index_path: Path
    index_doc: YamlDocument
    raw: Any
    meta: IndexEntry | None = None
    config: ModelConfig | None = None
    config_ref: str | None = None
    config_file: Path | None = None
    config_doc: YamlDocument | None = None
    problems: list[Problem] = dataclasses.field(default_factory=list)
    unreadable: bool = False

    @property
    def name(self) -> str | None:
        """The entry's name as written (even when the entry is otherwise invalid)."""
        if self.meta is not None:
            return self.meta.name
        if isinstance(self.raw, dict) and isinstance(self.raw.get("name"), str):
            return self.raw["name"]
        return None

    def index_line(self, *path: str | int) -> int | None:
        """Line of a key path inside this entry of the index."""
        return self.index_doc.line(self.position, *path)

    def config_location(self, *path: str | int) -> tuple[str, int | None]:
        """(file, line) of a key path inside this entry's config, inline or in its own file."""
        if self.config_doc is not None and self.config_file is not None:
            return str(self.config_file), self.config_doc.line(*path)
        return str(self.index_path), self.index_doc.line(self.position, "config", *path)

    def entry(self) -> Entry | None:
        """The valid Entry, or None when the index fields or the config did not validate."""
        if self.meta is None or self.config is None:
            return None
        return Entry(self.meta, self.config, self.config_ref, self.index_path)


def read_index(path: Path) -> YamlDocument:
    """Read a catalog index. Raises BadConfig when the file cannot be read or parsed."""
    return read_document(path, MAX_INDEX_BYTES, "catalog index")


def index_problems(path: Path, doc: YamlDocument) -> list[Problem]:
    """Problems of the index document as a whole: duplicate keys and a top level that is not a list."""
    problems = [
        Problem(str(path), line, "error", "duplicate-key", message, _entry_name(doc, key))
        for key, line, message in doc.duplicates
    ]
    if doc.data is None:
        problems.append(
            Problem(
                str(path), 1, "error", "not-a-catalog", "the catalog is empty (expected a list of entries)"
            )
        )
    elif not isinstance(doc.data, list):
        problems.append(
            Problem(
                str(path),
                1,
                "error",
                "not-a-catalog",
                f"a catalog index must be a list of entries, got a {type(doc.data).__name__}",
            )
        )
    return problems


def _entry_name(doc: YamlDocument, key: tuple[Any, ...]) -> str | None:
    if key and isinstance(key[0], int) and isinstance(doc.data, list) and key[0] < len(doc.data):
        item = doc.data[key[0]]
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            return item["name"]
    return None


def iter_entries(path: Path, doc: YamlDocument) -> Iterator[RawEntry]:
    """Read every entry of a parsed index, one at a time (so a large catalog is never all in memory)."""
    if not isinstance(doc.data, list):
        return
    for position, raw in enumerate(doc.data):
        yield load_entry(path, doc, position, raw)


def load_entry(path: Path, doc: YamlDocument, position: int, raw: Any) -> RawEntry:
    """Validate one entry's index fields and load its config (inline or from its file)."""
    item = RawEntry(position=position, index_path=path, index_doc=doc, raw=raw)
    file = str(path)
    if not isinstance(raw, dict):
        item.problems.append(
            Problem(
                file,
                item.index_line(),
                "error",
                "schema",
                f"entry {position + 1} must be a mapping, got {type(raw).__name__}",
            )
        )
        return item
    name = item.name
    try:
        item.meta = IndexEntry.model_validate(raw)
    except ValidationError as exc:
        item.problems.extend(schema_problems(exc, file, doc, (position,), name))
    config_value = raw.get("config")
    if isinstance(config_value, dict):
        _load_config(item, config_value, file, doc, (position, "config"), name)
    elif isinstance(config_value, str) and path_problem(config_value, "config path") is None:
        config_file = path.parent / config_value
        item.config_ref = config_value
        item.config_file = config_file
        if not config_file.is_file():
            item.problems.append(
                Problem(
                    file,
                    item.index_line("config"),
                    "error",
                    "config-missing",
                    f"config: {config_value} does not exist next to the index",
                    name,
                )
            )
            return item
        try:
            item.config_doc = read_document(config_file, MAX_CONFIG_BYTES, "model config")
        except BadConfig as exc:
            item.problems.append(
                Problem(str(config_file), exc.line, "error", "unreadable", exc.problem, name)
            )
            item.unreadable = True
            return item
        config_doc = item.config_doc
        item.problems.extend(
            Problem(str(config_file), line, "error", "duplicate-key", message, name)
            for _key, line, message in config_doc.duplicates
        )
        if not isinstance(config_doc.data, dict):
            item.problems.append(
                Problem(
                    str(config_file),
                    1,
                    "error",
                    "config-schema",
                    f"a model config must be a mapping, got {type(config_doc.data).__name__}",
                    name,
                )
            )
            return item
        _load_config(item, config_doc.data, str(config_file), config_doc, (), name)
    return item


def _load_config(
    item: RawEntry,
    data: dict[str, Any],
    file: str,
    doc: YamlDocument,
    prefix: tuple[Any, ...],
    name: str | None,
) -> None:
    try:
        item.config = ModelConfig.model_validate(data)
    except ValidationError as exc:
        for problem in schema_problems(exc, file, doc, prefix, name):
            code = "config-schema" if problem.code == "schema" else problem.code
            item.problems.append(
                dataclasses.replace(
                    problem, code=code, message=f"config: {problem.message}" if prefix else problem.message
                )
            )


# ----------------------------------------------------------------------------------------------- the catalog
@dataclasses.dataclass
class Catalog:
    """A loaded catalog: its valid entries in index order, and the problems of the ones that are not."""

    path: Path
    entries: list[Entry]
    problems: list[Problem]
    fingerprint: str | None = None  # sha256 of the index as read: a rewrite refuses if it changed meanwhile

    def names(self) -> list[str]:
        """Every valid entry's name."""
        return [entry.name for entry in self.entries]

    def get(self, name: str) -> Entry:
        """The entry called name. Raises UsageError naming close matches when there is none."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        # A duplicate key alone does not stop an entry from loading: name what did first.
        broken = sorted(
            (p for p in self.problems if p.entry == name and p.severity == "error"),
            key=lambda p: p.code == "duplicate-key",
        )
        if broken:
            first = broken[0]
            where = f"{first.file}:{first.line}" if first.line else first.file
            more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
            raise BadConfig(
                f"catalog entry {name!r} is invalid: {where}: {first.message}{more} (run `gallery validate`)"
            )
        close = [n for n in self.names() if name.lower() in n.lower() or n.lower() in name.lower()]
        hint = f"; did you mean {', '.join(close[:3])}?" if close else "; see `gallery catalog`"
        raise UsageError(f"no entry named {name!r} in {self.path}{hint}")

    @property
    def errors(self) -> list[Problem]:
        """The error-level problems found while loading."""
        return [p for p in self.problems if p.severity == "error"]


def load_catalog(path: Path) -> Catalog:
    """Load a catalog leniently: valid entries are kept, broken ones become problems (with file and line).

    Raises BadConfig only when the index itself cannot be read or is not a list of entries.
    """
    fingerprint = index_fingerprint(path)
    doc = read_index(path)
    problems = index_problems(path, doc)
    if not isinstance(doc.data, list):
        first = problems[-1]
        raise BadConfig(first.message, file=path, line=first.line)
    entries: list[Entry] = []
    seen: dict[str, int] = {}  # lowercased name -> position of its first entry
    for item in iter_entries(path, doc):
        problems.extend(item.problems)
        entry = item.entry()
        if entry is None:
            continue
        if entry.name.lower() in seen:
            first_line = doc.line(seen[entry.name.lower()], "name")
            problems.append(
                Problem(
                    str(path),
                    item.index_line("name"),
                    "error",
                    "duplicate-name",
                    f"duplicate name {entry.name!r} (first at line {first_line})",
                    entry.name,
                )
            )
            continue
        seen[entry.name.lower()] = item.position
        entries.append(entry)
    return Catalog(path=path, entries=entries, problems=problems, fingerprint=fingerprint)


def load_catalog_strict(path: Path) -> Catalog:
    """Load a catalog that is about to be rewritten: any error refuses (BadConfig), so nothing is lost."""
    catalog = load_catalog(path)
    if catalog.errors:
        first = catalog.errors[0]
        where = f"{first.file}:{first.line}" if first.line else first.file
        more = f" (and {len(catalog.errors) - 1} more)" if len(catalog.errors) > 1 else ""
        raise BadConfig(
            f"the catalog has errors; fix them before changing it: {where}: {first.message}{more} "
            "(run `gallery validate`)"
        )
    return catalog


def load_catalogs(paths: list[Path]) -> Catalog:
    """Several catalogs read as one (the first one's entry wins a name); a missing user catalog is skipped."""
    if len(paths) == 1:
        return load_catalog(paths[0])
    loaded = [load_catalog(path) for path in paths if path.is_file()]
    if not loaded:
        return load_catalog(paths[-1])
    entries: list[Entry] = []
    seen: set[str] = set()
    for catalog in loaded:
        for entry in catalog.entries:
            if entry.name.lower() not in seen:
                seen.add(entry.name.lower())
                entries.append(entry)
    problems = [problem for catalog in loaded for problem in catalog.problems]
    return Catalog(path=loaded[0].path, entries=entries, problems=problems, fingerprint=loaded[0].fingerprint)


# ----------------------------------------------------------------------------------------------- writing
def config_ref_for(name: str) -> str:
    """Where `gallery add` writes an entry's config, relative to the index."""
    return f"{ENTRIES_DIR}/{name}.yaml"


def index_data(entry: Entry) -> dict[str, Any]:
    """An entry's index mapping, in the canonical key order, without empty optional keys."""
    data: dict[str, Any] = {"name": entry.meta.name}
    for key in ("description", "license", "icon"):
        value = getattr(entry.meta, key)
        if value:
            data[key] = value
    for key in ("tags", "urls"):
        value = getattr(entry.meta, key)
        if value:
            data[key] = list(value)
    if entry.meta.size:
        data["size"] = entry.meta.size
    data["config"] = entry.config_ref if entry.config_ref is not None else entry.config.to_data()
    data["files"] = [f.model_dump() for f in entry.meta.files]
    # LocalAI's gallery reads `config_file` (the model YAML it writes on install) and `files`.
    data["config_file"] = localai_data(entry)
    return data


def render_index(entries: list[Entry]) -> str:
    """The index text in canonical form (header, then the entries in order)."""
    if not entries:
        return INDEX_HEADER + "[]\n"
    return INDEX_HEADER + dump_yaml([index_data(entry) for entry in entries])


def render_config(config: ModelConfig) -> str:
    """An entry's config file text."""
    return dump_yaml(config.to_data())


def index_fingerprint(path: Path) -> str | None:
    """sha256 of the index file's bytes, or None when it does not exist (yet)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadConfig(f"cannot read ({exc.strerror})", file=path) from None


def write_catalog(
    path: Path,
    entries: list[Entry],
    *,
    changed: set[str] | None = None,
    new_configs: set[str] | None = None,
    expect_fingerprint: str | bool | None = False,
) -> None:
    """Write the config files of the `changed` entries (all when None), then the index; each write is atomic.

    Configs go first so a reader never sees an index that names a config file that is not there yet;
    `new_configs` names entries whose config file must not exist yet (refusing to clobber one), and those
    are removed again if the index cannot be written. With `expect_fingerprint` (a Catalog.fingerprint),
    the write is refused when another writer changed the index since it was read.
    """
    if expect_fingerprint is not False and index_fingerprint(path) != expect_fingerprint:
        raise BadConfig(
            f"{path} changed while this command ran (another writer?): nothing was written; run it again"
        )
    created: list[Path] = []
    try:
        for entry in entries:
            if entry.config_ref is None or (changed is not None and entry.name not in changed):
                continue
            target = path.parent / entry.config_ref
            fresh = bool(new_configs and entry.name in new_configs)
            try:
                atomic_write(target, render_config(entry.config), overwrite=not fresh, create_parents=True)
            except OutputExists:
                raise OutputExists(
                    f"{target} already exists; remove it or choose another --name", path=target
                ) from None
            if fresh:
                created.append(target)
        atomic_write(path, _index_text(path, entries, changed), create_parents=True)  # `add` may start one
    except BaseException:
        for target in created:
            target.unlink(missing_ok=True)
        raise


def _index_text(path: Path, entries: list[Entry], changed: set[str] | None) -> str:
    """The new index text: a fresh file in canonical form, or the existing file rewritten round-trip.

    A rewrite keeps what a maintainer put in the index (comments, key order, quoting) and changes only the
    entries named in `changed` (every entry when None) plus new ones, appended in order. ruamel.yaml's
    round-trip mode does the preserving; each new or changed entry is first written by the project's own
    writer and read back, so its formatting matches a freshly written catalog.
    """
    if not path.is_file():
        return render_index(entries)
    from io import StringIO

    from ruamel.yaml import YAML

    yaml = _roundtrip_yaml(YAML)
    document = yaml.load(path.read_text(encoding="utf-8"))
    if document is None:
        document = yaml.load("[]\n")
    by_name = {item.get("name"): item for item in document if hasattr(item, "get")}
    for entry in entries:
        if changed is not None and entry.name not in changed and entry.name in by_name:
            continue
        fresh = yaml.load(dump_yaml([index_data(entry)]))[0]
        current = by_name.get(entry.name)
        if current is None:
            document.append(fresh)
            continue
        for key in [k for k in current if k not in fresh]:
            del current[key]
        for key, value in fresh.items():
            current[key] = value
    buffer = StringIO()
    yaml.dump(document, buffer)
    return buffer.getvalue()


def _roundtrip_yaml(factory: Any) -> Any:
    """ruamel.yaml in round-trip mode, formatted like the project's writer (lists flush with their key)."""
    yaml = factory(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long description onto several lines
    yaml.indent(mapping=2, sequence=2, offset=0)
    return yaml
