"""Installing a catalog entry: its pinned files, downloaded once and verified, where every command finds them.

Two stores, one behaviour:
- the standard Hugging Face cache (the default): huggingface_hub's `snapshot_download` fetches the entry's
  files (`allow_patterns` = exactly those files, `revision` = the pinned commit, several files at once) into
  `models--org--name/snapshots/<commit>/`, where mlx-lm, mlx-vlm, `hf` and every other tool find them too;
- a plain folder (`--models-dir DIR` or $GALLERY_MODELS_DIR, LocalAI's layout): the files in `DIR/<name>/`
  and the entry's config in `DIR/<name>.yaml` (parameters.model pointing at the folder), written last and
  atomically, so an interrupted install never leaves a config that points at half a model.

Either way every file is checked against the catalog's sha256 after the download; a file that is already
there and verifies is not fetched again (so a re-run resumes, an offline install from a complete cache works,
and a second install only re-verifies, without network); a file that does not verify is deleted and the
install fails with exit 16. A download that a killed process left half-written (`*.incomplete`) is removed by
the next successful install; a full disk is exit 18, not a network error.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from catalog.index import Entry, human_size, path_problem, render_config
from gallery.errors import (
    BadConfig,
    HashMismatch,
    NetworkFailure,
    OutputExists,
    UnsupportedModel,
    UsageError,
    WriteFailed,
)
from gallery.hub import cache_dir, download_files, repo_cache_folder, sha256_file
from gallery.yamlio import atomic_write

MODELS_DIR_ENV = "GALLERY_MODELS_DIR"
DOWNLOAD_WORKERS = 8  # files fetched at once (huggingface_hub's own default for snapshot_download)
WEIGHT_SUFFIXES = (".safetensors",)

Store = Literal["hf-cache", "models-dir"]


@dataclasses.dataclass
class InstallResult:
    """What an install did: where the files are, the config it wrote (models dir only), and per-file outcomes."""

    name: str
    store: Store
    folder: Path
    config_path: Path | None
    verified: list[str]  # present and verified, not fetched
    downloaded: list[str]  # fetched and verified
    config_written: bool
    removed_partials: list[str] = dataclasses.field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether the install downloaded or wrote anything."""
        return bool(self.downloaded) or self.config_written


def resolve_models_dir(option: Path | str | None) -> Path | None:
    """--models-dir, else $GALLERY_MODELS_DIR, else None: the Hugging Face cache."""
    chosen = option if option not in (None, "") else os.environ.get(MODELS_DIR_ENV) or None
    return Path(chosen).expanduser().resolve() if chosen is not None else None


def check_models_dir(path: Path | None) -> None:
    """Refuse a models dir that is a file (the one-line error beats a traceback from mkdir)."""
    if path is not None and path.exists() and not path.is_dir():
        raise UsageError(f"--models-dir {path} is not a folder")


# ----------------------------------------------------------------------------------------------- what to fetch
def weight_files(entry: Entry) -> list[str]:
    """The entry's weight files (safetensors): an entry without any cannot run."""
    return [f.filename for f in entry.meta.files if f.filename.lower().endswith(WEIGHT_SUFFIXES)]


def missing_weights_reason(entry: Entry) -> str | None:
    """Why the entry has nothing to run (its pinned files hold no weights), or None when it has weights."""
    if weight_files(entry):
        return None
    source = entry.config.mlx.source
    return (
        f"{entry.name} pins {source.repo}@{(source.revision or '?')[:12]}, whose files hold no .safetensors "
        f"weights ({len(entry.meta.files)} metadata files, {entry.meta.size or 'no size'}): there is nothing to "
        "run; pin a revision or an MLX conversion that has weights (`gallery add REPO`)"
    )


def _pins(entry: Entry) -> tuple[str, str]:
    source = entry.config.mlx.source
    if source.repo is None or source.revision is None:
        raise BadConfig(f"entry {entry.name!r} does not pin a Hub repo at a commit (run `gallery validate`)")
    return source.repo, source.revision


def _target(folder: Path, filename: str) -> Path:
    problem = path_problem(filename)
    if problem:
        raise BadConfig(f"refusing to install: {problem}")
    return folder / filename


def snapshot_folder(entry: Entry) -> Path:
    """Where the entry's files are in the Hugging Face cache (`…/snapshots/<commit>/`)."""
    repo, revision = _pins(entry)
    return repo_cache_folder(repo) / "snapshots" / revision


def installed_location(entry: Entry, models_dir: Path | None = None) -> Path | None:
    """The folder holding every pinned file of the entry (no hashing: a quick look), or None.

    With a models dir, its `<name>/` folder counts only once the install wrote `<name>.yaml`; the Hugging Face
    cache counts when every file is in the pinned commit's snapshot.
    """
    drafter = entry.config.mlx.drafter
    drafter_files = [f.path for f in drafter.files] if drafter is not None and drafter.repo else []
    if models_dir is not None:
        folder = models_dir / entry.name
        if (
            (models_dir / f"{entry.name}.yaml").is_file()
            and all((folder / f.filename).is_file() for f in entry.meta.files)
            and all((folder / "drafter" / path).is_file() for path in drafter_files)
        ):
            return folder
        return None
    try:
        folder = snapshot_folder(entry)
    except BadConfig:
        return None
    if drafter_files:  # a pinned drafter is part of the install: without it the model does not load as pinned
        assert drafter is not None and drafter.repo is not None and drafter.revision is not None
        pinned = repo_cache_folder(drafter.repo) / "snapshots" / drafter.revision
        if not all((pinned / path).is_file() for path in drafter_files):
            return None
    if entry.meta.files and all((folder / f.filename).is_file() for f in entry.meta.files):
        return folder
    return None


# ----------------------------------------------------------------------------------------------- installing
def install_entry(
    entry: Entry,
    models_dir: Path | None = None,
    *,
    token: str | bool | None = None,
    progress: Callable[[str], None] | None = None,
    max_workers: int = DOWNLOAD_WORKERS,
    tqdm_class: Any = None,
) -> InstallResult:
    """Install an entry into the Hugging Face cache (models_dir None) or into models_dir.

    Raises UnsupportedModel (10) for an entry without weights, HashMismatch (16), WriteFailed (18), the Hub's
    errors (gated 4, network 7, offline 6, …) and BadConfig for an entry that pins no commit.
    """
    say = progress or (lambda message: print(f"gallery: {message}", file=sys.stderr))
    repo, revision = _pins(entry)
    reason = missing_weights_reason(entry)
    if reason:
        raise UnsupportedModel(reason)
    if models_dir is None:
        store: Store = "hf-cache"
        folder = snapshot_folder(entry)
        config_path = None
    else:
        store = "models-dir"
        folder = models_dir / entry.name
        config_path = models_dir / f"{entry.name}.yaml"
        if config_path.exists() and not config_path.is_file():
            raise OutputExists(f"{config_path} exists and is not a file", path=config_path)
        if folder.exists() and not folder.is_dir():
            raise OutputExists(f"{folder} exists and is not a folder", path=folder)
    expected = {f.filename: f.sha256 for f in entry.meta.files}
    sizes = {f.path: f.size or 0 for f in entry.config.mlx.files}
    created = models_dir is not None and not folder.exists()
    verified, downloaded = _fetch_verified(
        entry.name,
        repo,
        revision,
        expected,
        sizes,
        folder,
        store,
        created,
        say,
        token,
        max_workers,
        tqdm_class,
    )
    removed = _remove_stale_partials(repo, list(expected), store, folder)
    drafter = entry.config.mlx.drafter
    drafter_folder: Path | None = None
    if drafter is not None and drafter.repo is not None and drafter.revision is not None:
        # The pinned drafter goes through the same checks: every file against its sha256, nothing partial left.
        drafter_folder = (
            folder / "drafter"
            if models_dir is not None
            else repo_cache_folder(drafter.repo) / "snapshots" / drafter.revision
        )
        pins = {f.path: f.sha256 or "" for f in drafter.files}
        found, fetched = _fetch_verified(
            entry.name,
            drafter.repo,
            drafter.revision,
            pins,
            {f.path: f.size or 0 for f in drafter.files},
            drafter_folder,
            store,
            False,
            say,
            token,
            max_workers,
            tqdm_class,
        )
        verified += [f"drafter/{name}" for name in found]
        downloaded += [f"drafter/{name}" for name in fetched]
        removed += _remove_stale_partials(drafter.repo, list(pins), store, drafter_folder)

    written = False
    if config_path is not None and models_dir is not None:
        installed = entry.config.model_copy(deep=True)
        installed.parameters.model = str(folder.resolve())
        if installed.mlx.drafter is not None and drafter_folder is not None:
            installed.mlx.drafter.local_path = str(drafter_folder.resolve())
        text = render_config(installed)
        current = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
        written = current != text
        if written:
            atomic_write(config_path, text)
    return InstallResult(entry.name, store, folder, config_path, verified, downloaded, written, removed)


def _fetch_verified(
    name: str,
    repo: str,
    revision: str,
    expected: dict[str, str],
    sizes: dict[str, int],
    folder: Path,
    store: Store,
    created: bool,
    say: Callable[[str], None],
    token: str | bool | None,
    max_workers: int,
    tqdm_class: Any,
) -> tuple[list[str], list[str]]:
    """Make every expected file of repo@revision present in folder and verified: (already there, downloaded).

    A file that does not verify is removed (HashMismatch, 16); `created` folders left without any file are removed.
    """
    models_dir = store == "models-dir"
    targets = {file: _target(folder, file) for file in expected}
    verified: list[str] = []
    missing: list[str] = []
    for file, target in targets.items():
        if target.is_file() and sha256_file(target) == expected[file]:
            verified.append(file)
            continue
        if target.exists() or target.is_symlink():
            say(f"{file}: present but its sha256 does not match the catalog: downloading it again")
            _remove_file(target, store, folder)
        missing.append(file)
    if verified:
        say(f"{len(verified)} of {len(expected)} files already present, sha256 verified")

    if missing:
        total = sum(sizes.get(file, 0) for file in missing)
        say(
            f"downloading {len(missing)} file(s) ({human_size(total) if total else 'size unknown'}) of "
            f"{repo}@{revision[:12]}" + (f" into {folder}" if models_dir else " into the HF cache")
        )
        try:
            download_files(
                repo,
                missing,
                revision,
                local_dir=folder if models_dir else None,
                token=token,
                max_workers=max_workers,
                tqdm_class=tqdm_class,
            )
        except BaseException:
            if created and not _has_model_files(folder):  # nothing installed (a gated repo…): no empty folder
                shutil.rmtree(folder, ignore_errors=True)
            raise
    downloaded: list[str] = []
    for file in missing:
        target = targets[file]
        if not target.is_file():
            raise NetworkFailure(
                f"{repo}/{file}: the Hub sent no file for it at {revision[:12]}", repo_id=repo
            )
        actual = sha256_file(target)
        if actual != expected[file]:
            _remove_file(target, store, folder)
            raise HashMismatch(
                f"{name}: {file} from {repo}@{revision[:12]} has sha256 {actual}, but the catalog pins "
                f"{expected[file]}; the file was removed. The entry is stale or the download was tampered with "
                f"(run `gallery refresh {name}`)",
                file=file,
                expected=expected[file],
                actual=actual,
            )
        downloaded.append(file)
    return verified, downloaded


def _has_model_files(folder: Path) -> bool:
    """Whether a models-dir folder holds any model file (huggingface_hub's own .cache/ does not count)."""
    return any(p.is_file() and ".cache" not in p.relative_to(folder).parts for p in folder.rglob("*"))


def _remove_file(target: Path, store: Store, folder: Path) -> None:
    """Delete an installed file that failed its check (in the cache: the snapshot link and its blob)."""
    try:
        if store == "hf-cache":
            blob = target.resolve()
            target.unlink(missing_ok=True)
            if blob != target and blob.parent.name == "blobs":
                blob.unlink(missing_ok=True)
            return
        target.unlink(missing_ok=True)
        relative = target.relative_to(folder).as_posix()
        (folder / ".cache" / "huggingface" / "download" / f"{relative}.metadata").unlink(missing_ok=True)
    except OSError as exc:
        raise WriteFailed.from_os_error(target, exc) from None


def _remove_stale_partials(repo: str, names: list[str], store: Store, folder: Path) -> list[str]:
    """Delete half-written downloads (`*.incomplete`) whose download lock nobody holds.

    huggingface_hub writes each download to `<etag>.<random>.incomplete` (cache) or
    `<hash>.<etag>.<random>.incomplete` (local folder) and deletes it on any error it sees, but a killed process
    leaves it behind for good. The lock it downloads under tells a dead download from a running one.
    """
    from filelock import FileLock, Timeout

    candidates: list[tuple[Path, Path]] = []  # (partial, the lock its download holds)
    if store == "hf-cache":
        blobs = repo_cache_folder(repo) / "blobs"
        locks = cache_dir() / ".locks" / repo_cache_folder(repo).name
        for partial in blobs.glob("*.incomplete") if blobs.is_dir() else []:
            candidates.append((partial, locks / f"{partial.name.split('.')[0]}.lock"))
    else:
        from huggingface_hub._local_folder import get_local_download_paths

        for name in names:
            paths = get_local_download_paths(folder, name)
            prefix = paths.incomplete_path("etag").name.split(".")[0]
            for partial in paths.metadata_path.parent.glob(f"{prefix}.*.incomplete"):
                candidates.append((partial, paths.lock_path))
    removed: list[str] = []
    for partial, lock in candidates:
        try:
            with FileLock(str(lock), timeout=0):
                partial.unlink(missing_ok=True)
            removed.append(partial.name)
        except (Timeout, OSError):  # another process is downloading it right now (or it is gone)
            continue
    return removed


# ----------------------------------------------------------------------------------------------- removing
def remove_installed(entry: Entry, models_dir: Path | None = None) -> list[Path]:
    """Delete an installed entry's files (and, in a models dir, its config); returns what was removed.

    In the Hugging Face cache this is huggingface_hub's own revision delete (`scan_cache_dir().delete_revisions`),
    which keeps blobs another revision still uses.
    """
    removed: list[Path] = []
    if models_dir is not None:
        folder, config = models_dir / entry.name, models_dir / f"{entry.name}.yaml"
        try:
            if folder.is_dir():
                shutil.rmtree(folder)
                removed.append(folder)
            if config.is_file():
                config.unlink()
                removed.append(config)
        except OSError as exc:
            raise WriteFailed.from_os_error(exc.filename or folder, exc) from None
        return removed
    from huggingface_hub import scan_cache_dir

    repo, revision = _pins(entry)
    folder = snapshot_folder(entry)
    if not folder.is_dir():
        return removed
    try:
        strategy = scan_cache_dir(cache_dir()).delete_revisions(revision)
        strategy.execute()
    except OSError as exc:
        raise WriteFailed.from_os_error(exc.filename or folder, exc) from None
    removed.append(folder)
    repo_folder = repo_cache_folder(repo)
    if repo_folder.is_dir() and not any((repo_folder / "snapshots").glob("*")):
        shutil.rmtree(
            repo_folder, ignore_errors=True
        )  # the last revision: drop refs and the empty repo folder
    return removed
