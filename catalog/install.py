"""`gallery install`: download an entry's pinned files, verify every sha256, then write its config.

    <models-dir>/<name>/…      the files, at the pinned commit, each verified against the catalog's sha256
    <models-dir>/<name>.yaml   the entry's config with parameters.model pointing at that folder

The config is written last, atomically, and only after every file verified: an interrupted or failed install
never leaves a config behind, so nothing tries to load a half-downloaded model. A file that is already
present and verifies is not fetched again (so a re-run resumes after the last verified file, and a second
install only re-verifies); a file that does not verify is deleted, and its download fails with exit 16.
Downloads go through huggingface_hub (`hf_hub_download(..., revision=<commit>, local_dir=…)`, with its
progress bars and its copy-from-cache when the file is already in the Hugging Face cache).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from catalog.index import Entry, path_problem, render_config
from gallery.errors import BadConfig, HashMismatch, OutputExists, UsageError, WriteFailed
from gallery.hub import download_file, sha256_file
from gallery.yamlio import atomic_write

MODELS_DIR_ENV = "GALLERY_MODELS_DIR"
DEFAULT_MODELS_DIR = "models"


@dataclasses.dataclass
class InstallResult:
    """What an install did: the folder, the config file, and per-file outcomes."""

    name: str
    folder: Path
    config_path: Path
    verified: list[str]  # present and verified, not fetched
    downloaded: list[str]  # fetched and verified
    config_written: bool

    @property
    def changed(self) -> bool:
        """Whether the install downloaded or wrote anything."""
        return bool(self.downloaded) or self.config_written


def resolve_models_dir(option: Path | str | None) -> Path:
    """--models-dir, else $GALLERY_MODELS_DIR, else ./models (LocalAI's default)."""
    chosen = option if option not in (None, "") else os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR
    return Path(chosen).expanduser().resolve()


def _remove_download(folder: Path, filename: str) -> None:
    """Delete a file and huggingface_hub's local-dir metadata for it (so it is not trusted next time)."""
    (folder / filename).unlink(missing_ok=True)
    meta = folder / ".cache" / "huggingface" / "download" / f"{filename}.metadata"
    meta.unlink(missing_ok=True)


def _target(folder: Path, filename: str) -> Path:
    problem = path_problem(filename)
    if problem:
        raise BadConfig(f"refusing to install: {problem}")
    target = (folder / filename).resolve()
    if folder.resolve() not in target.parents:
        raise BadConfig(f"refusing to install: {filename!r} resolves outside {folder}")
    return target


def _fetch_all(
    entry: Entry,
    folder: Path,
    repo: str,
    revision: str,
    token: str | bool | None,
    say: Callable[[str], None],
    verified: list[str],
    downloaded: list[str],
) -> None:
    """Verify or download every file of the entry, in order; fills `verified` and `downloaded` as it goes."""
    total = len(entry.meta.files)
    for number, file in enumerate(entry.meta.files, start=1):
        target = _target(folder, file.filename)
        label = f"[{number}/{total}] {file.filename}"
        if target.is_file():
            if sha256_file(target) == file.sha256:
                verified.append(file.filename)
                say(f"{label}: present, sha256 verified")
                continue
            say(f"{label}: present but its sha256 does not match: downloading again")
            _remove_download(folder, file.filename)
        say(f"{label}: downloading {repo}@{revision[:12]}")
        path = download_file(repo, file.filename, revision, local_dir=folder, token=token)
        actual = sha256_file(path)
        if actual != file.sha256:
            _remove_download(folder, file.filename)
            raise HashMismatch(
                f"{entry.name}: {file.filename} from {repo}@{revision[:12]} has sha256 {actual}, but the catalog pins "
                f"{file.sha256}; the file was removed. The entry is stale or the download was tampered with "
                f"(run `gallery refresh {entry.name}`)",
                file=file.filename,
                expected=file.sha256,
                actual=actual,
            )
        downloaded.append(file.filename)
        say(f"{label}: downloaded, sha256 verified")


def install_entry(
    entry: Entry,
    models_dir: Path,
    *,
    token: str | bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> InstallResult:
    """Install an entry into models_dir. Raises HashMismatch (16), network/auth errors, or BadConfig."""
    say = progress or (lambda message: print(f"gallery: {message}", file=sys.stderr))
    config = entry.config
    repo, revision = config.mlx.source.repo, config.mlx.source.revision
    if repo is None or revision is None:
        raise BadConfig(f"entry {entry.name!r} does not pin a Hub repo at a commit (run `gallery validate`)")
    folder = models_dir / entry.name
    config_path = models_dir / f"{entry.name}.yaml"
    if config_path.exists() and not config_path.is_file():
        raise OutputExists(f"{config_path} exists and is not a file", path=config_path)
    if folder.exists() and not folder.is_dir():
        raise OutputExists(f"{folder} exists and is not a folder", path=folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteFailed.from_os_error(folder, exc) from None

    verified: list[str] = []
    downloaded: list[str] = []
    try:
        _fetch_all(entry, folder, repo, revision, token, say, verified, downloaded)
    except BaseException:
        if created and not verified and not downloaded:
            # Nothing was installed (e.g. a gated repo): leave no empty folder behind.
            shutil.rmtree(folder, ignore_errors=True)
        raise

    installed = config.model_copy(deep=True)
    installed.parameters.model = str(folder.resolve())
    text = render_config(installed)
    current = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    written = current != text
    if written:
        atomic_write(config_path, text)
    return InstallResult(entry.name, folder, config_path, verified, downloaded, written)


def check_models_dir(path: Path) -> None:
    """Refuse a models dir that is a file (the one-line error beats a traceback from mkdir)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--models-dir {path} is not a folder")
