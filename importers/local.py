"""Read a local model folder for an import: regular files inside it only, bounded in depth and count."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gallery.errors import BadMetadata, NoConfig, UsageError
from importers.snapshot import (
    MAX_METADATA_BYTES,
    FileMeta,
    RepoSnapshot,
    note_oversized,
    read_file_range,
    require_config,
    wanted_files,
)
from importers.source import COMMIT_RE, ModelSource

# A model folder is flat or one or two levels deep; a walk that finds more is not a model folder.
MAX_LOCAL_FILES = 20_000
MAX_LOCAL_DEPTH = 4


def fetch_local(source: ModelSource) -> RepoSnapshot:
    """Read a local model folder: regular files inside it only. A folder inside the HF cache keeps its repo id."""
    folder = source.local_path
    assert folder is not None
    repo_id, commit = _cache_identity(folder)
    # Files of an HF cache snapshot are symlinks into the repo's blobs/: those may be followed, nothing else.
    allowed_root = folder.parent.parent if repo_id else folder
    if not any((folder / name).is_file() for name in ("config.json", "model_index.json")) and not any(
        folder.glob("*.gguf")
    ):
        raise NoConfig(f"{folder} has no config.json: not a transformers/MLX model folder")
    listing: dict[str, FileMeta] = {}
    warnings: list[str] = []
    for rel, size in _walk_local(folder, allowed_root, warnings):
        listing[rel] = FileMeta(path=rel, size=size)
    files: dict[str, bytes] = {}
    missing: list[str] = []
    for path in wanted_files(listing):
        size = listing[path].size or 0
        if size > MAX_METADATA_BYTES:
            note_oversized(path, size, str(folder / path), warnings)
            missing.append(path)
            continue
        try:
            files[path] = (folder / path).read_bytes()
        except OSError as exc:
            raise BadMetadata(f"{folder / path}: cannot read ({exc.strerror})", file=path) from None

    def read_range(path: str, start: int, end: int) -> bytes:
        return read_file_range(folder / path, start, end)

    snapshot = RepoSnapshot(
        source=source,
        origin="local",
        repo_id=repo_id,
        commit=commit,
        facts=None,
        listing=listing,
        files=files,
        warnings=warnings,
        missing=missing,
        _head_reader=read_range,
    )
    require_config(snapshot)
    return snapshot


def _walk_local(folder: Path, allowed_root: Path, warnings: list[str]) -> list[tuple[str, int]]:
    """(relative path, size) of every regular file in a model folder, bounded in depth and count.

    Hidden entries are skipped; symlinks are followed only when they resolve inside `allowed_root`;
    devices, FIFOs and sockets are skipped. A walk that finds more than MAX_LOCAL_FILES files is refused:
    that is not a model folder (e.g. `/`).
    """
    root = allowed_root.resolve()
    found: list[tuple[str, int]] = []
    skipped: list[str] = []
    stack: list[tuple[Path, int]] = [(folder, 0)]
    while stack:
        current, depth = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            rel = path.relative_to(folder).as_posix()
            try:
                if entry.is_symlink():
                    target = path.resolve()
                    if target != root and root not in target.parents:
                        skipped.append(f"{rel} (a link out of the folder)")
                        continue
                info = path.stat()
            except (OSError, RuntimeError):
                continue
            if stat.S_ISDIR(info.st_mode):
                if depth + 1 < MAX_LOCAL_DEPTH and not entry.is_symlink():
                    stack.append((path, depth + 1))
                continue
            if not stat.S_ISREG(info.st_mode):
                skipped.append(f"{rel} (not a regular file)")
                continue
            found.append((rel, info.st_size))
            if len(found) > MAX_LOCAL_FILES:
                raise UsageError(f"{folder} holds more than {MAX_LOCAL_FILES} files: not a model folder")
    if skipped:
        warnings.append(f"ignored in {folder}: {', '.join(skipped[:5])}" + (" …" if len(skipped) > 5 else ""))
    return sorted(found)


def _cache_identity(folder: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) when folder is `…/models--org--name/snapshots/<commit>`, else (None, None)."""
    parent = folder.parent
    if (
        parent.name == "snapshots"
        and COMMIT_RE.match(folder.name)
        and parent.parent.name.startswith("models--")
    ):
        parts = parent.parent.name[len("models--") :].split("--")
        if len(parts) == 2:
            return f"{parts[0]}/{parts[1]}", folder.name
    return None, None
