"""Read what an import needs from a repo: the model info once, then a handful of small files.

Three sources behave the same way for the decision code:
- the Hub (or a mirror at HF_ENDPOINT): one model-info call with file metadata resolves the revision
  to a commit and lists every file with its size and hashes; then the small metadata files are read
  concurrently at that commit (one GET each), checked against that listing (size, git blob id or sha256)
  and only then stored in the standard Hugging Face cache layout, so a later offline import finds them and
  a lying server cannot poison the cache; the listing itself is kept beside the cache, so an offline
  import knows which files it should have had. The head of `tokenizer.json` is read with Range requests
  only when special-token ids must be mapped to text and no smaller file has them;
- the local Hugging Face cache, when offline (HF_HUB_OFFLINE=1) or when the network fails;
- a local folder (regular files inside it only: a symlink out of the folder is never followed), read by
  importers.local.
The snapshot they all return, and the helpers they share, are importers.snapshot's. Weights are never downloaded. Hub access (timeouts, retries, errors) is gallery.hub's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Any

from gallery import hub
from gallery.errors import BadMetadata, GalleryError, NetworkFailure, OfflineNotCached
from importers.local import fetch_local
from importers.snapshot import (
    MAX_METADATA_BYTES,
    FetchStats,
    FileMeta,
    HubFacts,
    RepoSnapshot,
    note_oversized,
    read_file_range,
    read_side,
    require_config,
    side_path,
    wanted_files,
    write_side,
)
from importers.source import COMMIT_RE, ModelSource

__all__ = ["FetchStats", "FileMeta", "HubFacts", "RepoSnapshot", "fetch"]


# ----- the three sources -----
def fetch(
    source: ModelSource, *, token: str | bool | None = None, cache_dir: Path | None = None
) -> RepoSnapshot:
    """Read a source's model info and small metadata files. Raises GalleryError subclasses."""
    if source.local_path is not None:
        return fetch_local(source)
    assert source.repo_id is not None
    if hub.is_offline():
        return _fetch_cached(source, cache_dir, reason="offline mode is on (HF_HUB_OFFLINE)")
    try:
        return _fetch_hub(source, token=token, cache_dir=cache_dir)
    except NetworkFailure as failure:
        # Like huggingface_hub's own downloads: a network failure falls back to what the cache has.
        try:
            snapshot = _fetch_cached(source, cache_dir, reason=f"network failure ({failure})")
        except OfflineNotCached:
            raise failure from None
        return snapshot


def _fetch_hub(source: ModelSource, *, token: str | bool | None, cache_dir: Path | None) -> RepoSnapshot:
    repo_id = source.repo_id
    assert repo_id is not None
    stats = FetchStats(requests=1, round_trips=1)
    info = hub.model_info(repo_id, source.revision, token=token)
    commit = info.sha
    if not commit or not COMMIT_RE.match(commit):
        raise BadMetadata(
            f"the Hub did not return a commit for {repo_id} (got {commit!r})", file="model info"
        )

    listing: dict[str, FileMeta] = {}
    for sibling in info.siblings or []:
        lfs = getattr(sibling, "lfs", None)
        sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
        listing[sibling.rfilename] = FileMeta(
            path=sibling.rfilename, size=sibling.size, blob_id=sibling.blob_id, sha256=sha256
        )
    facts = HubFacts(
        pipeline_tag=info.pipeline_tag,
        library_name=info.library_name,
        tags=list(info.tags or []),
        gated=info.gated if info.gated is not None else False,
        card_data=_card_dict(info.card_data),
    )
    cache = hub.repo_cache_folder(repo_id, cache_dir)
    warnings: list[str] = []
    missing: list[str] = []

    def read_file(path: str) -> tuple[str, bytes | None]:
        meta = listing[path]
        cached = _cached_file(cache, commit, path, meta)
        if cached is not None:
            return path, cached
        if meta.size is not None and meta.size > MAX_METADATA_BYTES:
            note_oversized(path, meta.size, f"{path} of {repo_id}", warnings)
            missing.append(path)
            return path, None
        stats.requests += 1
        try:
            data = hub.read_file(
                repo_id, commit, path, token=token, limit=MAX_METADATA_BYTES, listed_size=meta.size
            )
        except GalleryError as exc:
            if exc.exit_code == 3:  # listed, but the Hub cannot serve it (404): decide without it, and say so
                warnings.append(f"{path} is listed by the Hub but could not be downloaded (404)")
                missing.append(path)
                return path, None
            raise
        stats.bytes_received += len(data)
        problem = hub.matches_listing(data, size=meta.size, blob_id=meta.blob_id, sha256=meta.sha256)
        if problem:
            raise BadMetadata(
                f"{path} of {repo_id}@{commit[:12]} from {hub.endpoint()} does not match the Hub's "
                f"listing ({problem}); it was not stored",
                file=path,
            )
        _store_in_cache(cache, commit, path, meta, data)
        return path, data

    wanted = wanted_files(listing)
    files: dict[str, bytes] = {}
    if wanted:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(wanted))) as pool:
            for path, data in pool.map(read_file, wanted):
                if data is not None:
                    files[path] = data
        stats.round_trips += 1
    _store_ref(cache, source.revision, commit)
    write_side(
        side_path("listings", repo_id, commit), [dataclasses.asdict(meta) for meta in listing.values()]
    )

    def read_range(path: str, start: int, end: int) -> bytes:
        cached_path = _cached_path(cache, commit, path)
        if cached_path is not None:
            return read_file_range(cached_path, start, end)
        stats.requests += 1
        try:
            return hub.read_file(
                repo_id, commit, path, token=token, limit=end - start + 1, byte_range=(start, end)
            )
        except GalleryError as exc:
            if exc.exit_code == 3:
                return b""
            raise

    snapshot = RepoSnapshot(
        source=source,
        origin="hub",
        repo_id=repo_id,
        commit=commit,
        facts=facts,
        listing=listing,
        files=files,
        warnings=warnings,
        missing=missing,
        stats=stats,
        _head_reader=read_range,
    )
    require_config(snapshot)
    return snapshot


def _card_dict(card_data: Any) -> dict[str, Any]:
    if card_data is None:
        return {}
    if isinstance(card_data, dict):
        return dict(card_data)
    to_dict = getattr(card_data, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


def _file_size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def _cached_path(cache: Path, commit: str, path: str) -> Path | None:
    candidate = cache / "snapshots" / commit / path
    return candidate if candidate.is_file() else None


def _cached_file(cache: Path, commit: str, path: str, meta: FileMeta | None = None) -> bytes | None:
    """A file from the cache at a commit; with `meta`, only when it matches the listing (else it is re-read)."""
    found = _cached_path(cache, commit, path)
    if found is None:
        return None
    try:
        if found.stat().st_size > MAX_METADATA_BYTES:
            return None
        data = found.read_bytes()
    except OSError:
        return None
    if meta is not None and hub.matches_listing(
        data, size=meta.size, blob_id=meta.blob_id, sha256=meta.sha256
    ):
        return None
    return data


def _store_in_cache(cache: Path, commit: str, path: str, meta: FileMeta, data: bytes) -> None:
    """Store a verified file in the Hugging Face cache layout (blobs/, snapshots/<commit>/).

    Best effort: a read-only or full cache never fails an import.
    """
    etag = meta.etag
    if not etag:
        return
    try:
        blob = cache / "blobs" / etag
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_name(f"{etag}.{os.getpid()}.incomplete")
            tmp.write_bytes(data)
            os.replace(tmp, blob)
        link = cache / "snapshots" / commit / path
        if link.is_symlink() or link.exists():
            link.unlink()  # a stale or mismatching entry (it failed the listing check) is replaced
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(os.path.relpath(blob, link.parent), link)
        except OSError:
            tmp_copy = link.with_name(link.name + f".{os.getpid()}.incomplete")
            tmp_copy.write_bytes(data)
            os.replace(tmp_copy, link)
    except OSError:
        pass


def _store_ref(cache: Path, revision: str | None, commit: str) -> None:
    ref = revision or "main"
    if COMMIT_RE.match(ref) or not (cache / "snapshots" / commit).is_dir():
        return
    try:
        ref_path = cache / "refs" / ref
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref_path.with_name(ref_path.name + f".{os.getpid()}.incomplete")
        tmp.write_text(commit)
        os.replace(tmp, ref_path)
    except OSError:
        pass


def _fetch_cached(source: ModelSource, cache_dir: Path | None, *, reason: str) -> RepoSnapshot:
    """Read a repo from the local Hugging Face cache only (no network)."""
    repo_id = source.repo_id
    assert repo_id is not None
    cache = hub.repo_cache_folder(repo_id, cache_dir)
    revision = source.revision or "main"
    commit: str | None = revision if COMMIT_RE.match(revision) else None
    if commit is None:
        ref = cache / "refs" / revision
        if ref.is_file():
            commit = ref.read_text().strip()
    snapshot_dir = cache / "snapshots" / commit if commit else None
    if commit is None or snapshot_dir is None or not snapshot_dir.is_dir():
        raise OfflineNotCached(
            f"{reason}, and {repo_id}@{revision} is not in the local cache ({cache}); "
            "run the import once with network access, or unset HF_HUB_OFFLINE",
            repo_id=repo_id,
            revision=revision,
        )
    recorded = read_side(side_path("listings", repo_id, commit))
    listing = _cached_listing(repo_id, commit, cache_dir, snapshot_dir, recorded)
    files: dict[str, bytes] = {}
    missing: list[str] = []
    warnings = [
        f"{reason}: read {repo_id}@{commit[:12]} from the local cache; Hub facts (pipeline tag, tags, "
        "license) and hashes of files not in the cache are unavailable"
    ]
    oversized: list[str] = []
    for path in wanted_files(listing):
        found = _cached_path(cache, commit, path)
        size = _file_size(found)
        if found is not None and size > MAX_METADATA_BYTES:
            note_oversized(path, size, str(found), warnings)
            oversized.append(path)
            continue
        data = _cached_file(cache, commit, path)
        if data is not None:
            files[path] = data
        else:
            missing.append(path)
    if missing:
        warnings.append(
            f"offline import without {', '.join(missing)}: the Hub lists "
            f"{'it' if len(missing) == 1 else 'them'} but the local cache does not have "
            f"{'it' if len(missing) == 1 else 'them'}, so decisions that depend on "
            f"{'it' if len(missing) == 1 else 'them'} may be incomplete (import once online to fix)"
        )
    elif recorded is None:
        warnings.append(
            "the Hub's file listing for this commit is not in the local cache: files the cache lacks "
            "cannot be named (import once online to record it)"
        )

    def read_range(path: str, start: int, end: int) -> bytes:
        found = _cached_path(cache, commit, path)
        if found is None:
            raise OfflineNotCached(
                f"{reason}, and {path} of {repo_id} is not in the local cache",
                repo_id=repo_id,
                revision=commit,
            )
        return read_file_range(found, start, end)

    snapshot = RepoSnapshot(
        source=source,
        origin="cache",
        repo_id=repo_id,
        commit=commit,
        facts=None,
        listing=listing,
        files=files,
        warnings=warnings,
        missing=missing + oversized,
        _head_reader=read_range,
    )
    require_config(snapshot)
    return snapshot


def _cached_listing(
    repo_id: str, commit: str, cache_dir: Path | None, snapshot_dir: Path, recorded: Any
) -> dict[str, FileMeta]:
    """The file listing of a cached commit: the one recorded at import, else snapshot_download's, else the folder."""
    import huggingface_hub

    listing: dict[str, FileMeta] = {}
    if isinstance(recorded, list):
        for item in recorded:
            if isinstance(item, dict) and isinstance(item.get("path"), str):
                listing[item["path"]] = FileMeta(
                    path=item["path"],
                    size=item.get("size"),
                    blob_id=item.get("blob_id"),
                    sha256=item.get("sha256"),
                )
    else:
        try:  # snapshot_download records the full tree listing; use it when present
            for entry in huggingface_hub.get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir):
                lfs = getattr(entry, "lfs", None)
                listing[entry.path] = FileMeta(
                    path=entry.path,
                    size=entry.size,
                    blob_id=getattr(entry, "blob_id", None),
                    sha256=getattr(lfs, "sha256", None) if lfs is not None else None,
                )
        except Exception:  # no recorded tree (or an older huggingface_hub): list the snapshot folder instead
            listing = {}
    for file in sorted(snapshot_dir.rglob("*")):
        if file.is_file():
            rel = file.relative_to(snapshot_dir).as_posix()
            if rel not in listing:
                blob = file.resolve()
                etag = blob.name if blob.parent.name == "blobs" else None
                sha256 = etag if etag and len(etag) == 64 else None
                blob_id = etag if etag and len(etag) == 40 else None
                listing[rel] = FileMeta(path=rel, size=file.stat().st_size, blob_id=blob_id, sha256=sha256)
    return listing
