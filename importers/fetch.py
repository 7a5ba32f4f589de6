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
- a local folder (regular files inside it only: a symlink out of the folder is never followed).
Weights are never downloaded. Hub access (timeouts, retries, errors) is gallery.hub's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import json
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from gallery import hub
from gallery.errors import BadMetadata, GalleryError, NetworkFailure, NoConfig, OfflineNotCached, UsageError
from importers.source import COMMIT_RE, ModelSource

# The small files an import reads. Everything else (weights, tokenizer.json, vocab files) is only listed.
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "model.safetensors.index.json",
    "model_index.json",
    "params.json",
)
METADATA_PATTERNS = ("additional_chat_templates/*.jinja",)
MAX_METADATA_BYTES = 16 * 1024 * 1024
TOKENIZER_JSON = "tokenizer.json"
MAX_TOKENIZER_HEAD_BYTES = 16 * 1024 * 1024
_FIRST_HEAD_CHUNK = 64 * 1024
# A model folder is flat or one or two levels deep; a walk that finds more is not a model folder.
MAX_LOCAL_FILES = 20_000
MAX_LOCAL_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class FileMeta:
    """One file of the pinned revision, as the Hub (or the cache, or the disk) lists it."""

    path: str
    size: int | None = None
    blob_id: str | None = None
    sha256: str | None = None

    @property
    def etag(self) -> str | None:
        """The name the Hugging Face cache stores the file's blob under."""
        return self.sha256 or self.blob_id


@dataclasses.dataclass
class HubFacts:
    """The model-info fields no file holds."""

    pipeline_tag: str | None = None
    library_name: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    gated: str | bool = False
    card_data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FetchStats:
    """What an import cost: requests sent, bytes received, and sequential round trips."""

    requests: int = 0
    bytes_received: int = 0
    round_trips: int = 0


@dataclasses.dataclass
class RepoSnapshot:
    """Everything read from one repo at one commit."""

    source: ModelSource
    origin: Literal["hub", "cache", "local"]
    repo_id: str | None
    commit: str | None
    facts: HubFacts | None
    listing: dict[str, FileMeta]
    files: dict[str, bytes]
    warnings: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(
        default_factory=list
    )  # expected metadata files that could not be read
    stats: FetchStats = dataclasses.field(default_factory=FetchStats)
    _head_reader: Callable[[str, int, int], bytes] | None = None
    _added_tokens: list[dict[str, Any]] | None = None
    _added_tokens_read: bool = False

    def text(self, path: str) -> str | None:
        """A read file as text (UTF-8, a BOM tolerated), or None when it was not read."""
        raw = self.files.get(path)
        return None if raw is None else raw.decode("utf-8-sig", errors="replace")

    def tokenizer_added_tokens(self) -> list[dict[str, Any]] | None:
        """The `added_tokens` list from the head of tokenizer.json (read lazily, once, with Range requests).

        Returns None when the repo has no tokenizer.json or its head cannot be parsed.
        """
        if self._added_tokens_read:
            return self._added_tokens
        self._added_tokens_read = True
        side = _side_path("added-tokens", self.repo_id, self.commit)
        cached = _read_side(side)
        if isinstance(cached, list):
            self._added_tokens = cached
            return self._added_tokens
        if TOKENIZER_JSON not in self.listing or self._head_reader is None:
            return None
        self.stats.round_trips += 1
        try:
            self._added_tokens = _read_added_tokens(self._head_reader, self.listing[TOKENIZER_JSON].size)
        except GalleryError:
            raise
        except (OSError, ValueError) as exc:
            self.warnings.append(f"could not read the special tokens at the head of tokenizer.json: {exc}")
        if self._added_tokens is not None:
            _write_side(
                side,
                [
                    {"id": t.get("id"), "content": t.get("content"), "special": t.get("special")}
                    for t in self._added_tokens
                ],
            )
        return self._added_tokens


# ----- the side cache: what this project keeps per repo and commit beside the HF cache -----
def _side_path(kind: str, repo_id: str | None, commit: str | None) -> Path | None:
    """Where `kind` data about a repo at a commit is kept.

    The Hugging Face cache holds only whole files (a truncated tokenizer.json there would break loaders) and
    no listings, so the few kilobytes read with Range requests and the Hub's file listing are kept beside
    it, keyed by the commit, which pins their content. This is what lets an offline import of a cached repo
    map ids to text and know which files it is missing.
    """
    if not repo_id or not commit:
        return None
    return hub.side_cache_dir(kind) / ("models--" + repo_id.replace("/", "--")) / f"{commit}.json"


def _read_side(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_side(path: Path | None, data: Any) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # best effort: a read-only cache never fails an import


def _read_added_tokens(
    read_range: Callable[[str, int, int], bytes], size: int | None
) -> list[dict[str, Any]] | None:
    """Read `added_tokens` from the start of tokenizer.json, growing the read until the array closes."""
    want = _FIRST_HEAD_CHUNK
    buffer = b""
    while True:
        end = want if size is None else min(want, size)
        if end > len(buffer):
            buffer += read_range(TOKENIZER_JSON, len(buffer), end - 1)
        parsed = _parse_added_tokens(buffer)
        if parsed is not None:
            return parsed
        if (size is not None and len(buffer) >= size) or len(buffer) < end:
            return None  # whole file read, or the server sent less than asked: no added_tokens array
        if want >= MAX_TOKENIZER_HEAD_BYTES:
            raise ValueError(f"added_tokens not found in the first {MAX_TOKENIZER_HEAD_BYTES} bytes")
        want *= 4


def _parse_added_tokens(head: bytes) -> list[dict[str, Any]] | None:
    text = head.decode("utf-8", errors="ignore")
    key = text.find('"added_tokens"')
    if key < 0:
        return None
    start = text.find("[", key)
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None  # array not complete yet
    if not isinstance(value, list):
        raise ValueError("tokenizer.json added_tokens is not a list")
    return [item for item in value if isinstance(item, dict)]


def _wanted(paths: Iterable[str]) -> list[str]:
    wanted = []
    for path in paths:
        if not hub.safe_repo_path(path):  # `*` matches `/`: `additional_chat_templates/../../x.jinja` never
            continue
        if path in METADATA_FILES or any(fnmatch.fnmatch(path, pattern) for pattern in METADATA_PATTERNS):
            wanted.append(path)
    return sorted(wanted)


# ----- the three sources -----
def fetch(
    source: ModelSource, *, token: str | bool | None = None, cache_dir: Path | None = None
) -> RepoSnapshot:
    """Read a source's model info and small metadata files. Raises GalleryError subclasses."""
    if source.local_path is not None:
        return _fetch_local(source)
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
            _oversized(path, meta.size, f"{path} of {repo_id}", warnings)
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

    wanted = _wanted(listing)
    files: dict[str, bytes] = {}
    if wanted:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(wanted))) as pool:
            for path, data in pool.map(read_file, wanted):
                if data is not None:
                    files[path] = data
        stats.round_trips += 1
    _store_ref(cache, source.revision, commit)
    _write_side(
        _side_path("listings", repo_id, commit), [dataclasses.asdict(meta) for meta in listing.values()]
    )

    def read_range(path: str, start: int, end: int) -> bytes:
        cached_path = _cached_path(cache, commit, path)
        if cached_path is not None:
            return _read_file_range(cached_path, start, end)
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
    _require_config(snapshot)
    return snapshot


def _card_dict(card_data: Any) -> dict[str, Any]:
    if card_data is None:
        return {}
    if isinstance(card_data, dict):
        return dict(card_data)
    to_dict = getattr(card_data, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


def _oversized(path: str, size: int, where: str, warnings: list[str]) -> None:
    """A metadata file over the size limit: an error for config.json (nothing can be decided without it), else a
    warning (the decisions that need it say what they lack)."""
    message = f"{where} is {size} bytes, over the {MAX_METADATA_BYTES}-byte limit for a metadata file"
    if path == "config.json":
        raise BadMetadata(message, file=path)
    warnings.append(f"{message}: not read")


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
    recorded = _read_side(_side_path("listings", repo_id, commit))
    listing = _cached_listing(repo_id, commit, cache_dir, snapshot_dir, recorded)
    files: dict[str, bytes] = {}
    missing: list[str] = []
    warnings = [
        f"{reason}: read {repo_id}@{commit[:12]} from the local cache; Hub facts (pipeline tag, tags, "
        "license) and hashes of files not in the cache are unavailable"
    ]
    oversized: list[str] = []
    for path in _wanted(listing):
        found = _cached_path(cache, commit, path)
        size = _file_size(found)
        if found is not None and size > MAX_METADATA_BYTES:
            _oversized(path, size, str(found), warnings)
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
        return _read_file_range(found, start, end)

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
    _require_config(snapshot)
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


def _fetch_local(source: ModelSource) -> RepoSnapshot:
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
    for path in _wanted(listing):
        size = listing[path].size or 0
        if size > MAX_METADATA_BYTES:
            _oversized(path, size, str(folder / path), warnings)
            missing.append(path)
            continue
        try:
            files[path] = (folder / path).read_bytes()
        except OSError as exc:
            raise BadMetadata(f"{folder / path}: cannot read ({exc.strerror})", file=path) from None

    def read_range(path: str, start: int, end: int) -> bytes:
        return _read_file_range(folder / path, start, end)

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
    _require_config(snapshot)
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


def _read_file_range(path: str | Path, start: int, end: int) -> bytes:
    """Bytes start..end (inclusive, as in an HTTP Range) of a local file."""
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(end - start + 1)


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


def _require_config(snapshot: RepoSnapshot) -> None:
    if "config.json" in snapshot.files:
        return
    where = snapshot.source.local_path or f"{snapshot.repo_id}@{(snapshot.commit or '')[:12]}"
    if "config.json" in snapshot.listing:
        raise NoConfig(f"config.json of {where} is listed but could not be read")
    # Repos without config.json that are still recognisable (GGUF-only, diffusers) get a better error
    # from the backend decision ("unsupported: …") than "no config.json".
    paths = list(snapshot.listing)
    if "model_index.json" in paths or any(path.endswith(".gguf") for path in paths):
        return
    hint = ""
    if snapshot.facts and snapshot.facts.pipeline_tag:
        hint = f" (Hub pipeline tag: {snapshot.facts.pipeline_tag})"
    raise NoConfig(f"{where} has no config.json: not a transformers/MLX model checkpoint{hint}")
