"""A catalog entry's format: its index fields, its pinned config, and the Problems found reading them.

The pieces every catalog module shares and that need nothing else of the catalog: `Entry` (the index
fields as `IndexEntry`, each download as `CatalogFile`, and the pinned ModelConfig), `Problem` (one finding
with its file and line), the safe-file-name check, pinned download URIs and the Hub's size notation.
Reading, writing and locating the index live in catalog.index; exporting in catalog.export.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gallery.config import ModelConfig, RepoFile
from gallery.hub import HUB_WEB

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Files an install skips: duplicates of the weights in other formats, docs media, git plumbing.
_SKIP_SUFFIXES = (
    ".gguf",
    ".pth",
    ".pt",
    ".onnx",
    ".onnx_data",
    ".h5",
    ".msgpack",
    ".ot",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".webp",
    ".mp4",
)
_SKIP_DIRS = ("original/", "onnx/", "gguf/", "coreml/", "openvino/")

Severity = Literal["error", "warning"]


# ----------------------------------------------------------------------------------------------- problems
@dataclasses.dataclass(frozen=True, order=True)
class Problem:
    """One finding: where (file, line), how bad, a stable code, which entry, and a one-line message."""

    file: str
    line: int | None
    severity: Severity
    code: str
    message: str
    entry: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The problem as JSON-ready data."""
        return dataclasses.asdict(self)


def path_problem(name: Any, what: str = "file name") -> str | None:
    """Why a relative file name could escape its folder (or is unusable), or None when it is safe.

    Catalog file names become paths under the models folder at install time, so absolute paths, `..`,
    backslashes (a separator on Windows), NUL, empty or `.` components and drive letters are all refused.
    """
    if not isinstance(name, str) or not name:
        return f"{what} must be a non-empty string"
    if "\x00" in name:
        return f"{what} {name!r} contains a NUL byte"
    if "\\" in name:
        return f"{what} {name!r} contains a backslash (use / between folders)"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return f"{what} {name!r} is absolute: it must be relative to its folder"
    parts = name.split("/")
    if any(part == ".." for part in parts):
        return f"{what} {name!r} escapes its folder (a '..' component)"
    if any(part in ("", ".") for part in parts):
        return f"{what} {name!r} has an empty or '.' component"
    if _CONTROL_RE.search(name):
        return f"{what} {name!r} contains a control character"
    return None


def file_uri(repo_id: str, revision: str, filename: str) -> str:
    """The pinned download URL of a repo file (LocalAI's downloader takes https URIs as they are)."""
    return f"{HUB_WEB}/{repo_id}/resolve/{revision}/{quote(filename, safe='/')}"


def repo_url(repo_id: str) -> str:
    """The repo's page on the Hub."""
    return f"{HUB_WEB}/{repo_id}"


def human_size(size: int) -> str:
    """A byte count as the Hub shows it (decimal units): 2.26 GB, 512 kB."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def install_files(config: ModelConfig) -> list[RepoFile]:
    """The files of the pinned revision an install needs: everything but other weight formats, media and git files.

    `*.bin` weights are skipped when safetensors exist (the same weights twice); `original/` holds Meta's
    consolidated checkpoint, `onnx/`/`gguf/` other runtimes' copies.
    """
    paths = [f.path for f in config.mlx.files]
    has_safetensors = any(p.endswith(".safetensors") for p in paths)
    chosen = []
    for repo_file in config.mlx.files:
        path = repo_file.path
        lower = path.lower()
        if path == ".gitattributes" or lower.endswith(_SKIP_SUFFIXES) or lower.startswith(_SKIP_DIRS):
            continue
        if has_safetensors and lower.endswith(".bin") and "model" in lower:
            continue
        chosen.append(repo_file)
    return chosen


# ----------------------------------------------------------------------------------------------- the format
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CatalogFile(_Strict):
    """One file an install downloads: its name inside the model folder, its sha256 and its pinned URL."""

    filename: str
    sha256: str
    uri: str

    @field_validator("filename")
    @classmethod
    def _safe(cls, value: str) -> str:
        problem = path_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256_RE.fullmatch(value):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value!r}")
        return value

    @field_validator("uri")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError(f"uri must be an https URL, got {value!r}")
        return value


class IndexEntry(_Strict):
    """The index fields of an entry (LocalAI's gallery keys plus `config`)."""

    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    license: str | None = None
    icon: str | None = None
    tags: list[str] = Field(default_factory=list)
    urls: list[str] = Field(default_factory=list)
    size: str | None = None
    config: str | dict[str, Any]
    files: list[CatalogFile] = Field(min_length=1)
    config_file: dict[str, Any] | None = None  # LocalAI's key: the model YAML its install writes

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value) or ".." in value:
            raise ValueError(
                f"name {value!r} must be letters, digits and . _ + - (no path separators, no '..')"
            )
        return value

    @field_validator("config")
    @classmethod
    def _config_ref(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, str):
            problem = path_problem(value, "config path")
            if problem:
                raise ValueError(problem)
            if not value.endswith((".yaml", ".yml", ".json")):
                raise ValueError(f"config path {value!r} must name a .yaml, .yml or .json file")
        return value

    @field_validator("icon")
    @classmethod
    def _icon_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("https://"):
            raise ValueError(f"icon must be an https URL, got {value!r}")
        return value

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("https://", "http://")):
                raise ValueError(f"urls must be http(s) URLs, got {url!r}")
        return value


@dataclasses.dataclass
class Entry:
    """A catalog entry: its index fields and its pinned config (`config_ref` is None when inline)."""

    meta: IndexEntry
    config: ModelConfig
    config_ref: str | None
    index_path: Path | None = None  # the catalog index it was read from (None: built, not yet written)

    @property
    def name(self) -> str:
        """The entry's name."""
        return self.meta.name


def describe_location(file: str, line: int | None) -> str:
    """`file:line` (or just file), relative to the working folder when inside it (as CI annotations want)."""
    shown = file
    try:
        relative = os.path.relpath(file)
        if not relative.startswith(".."):
            shown = relative
    except ValueError:  # another drive on Windows
        pass
    shown = Path(shown).as_posix()
    return f"{shown}:{line}" if line else shown
