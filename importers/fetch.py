"""Read what an import needs from a repo: the model info once, then a handful of small files.

Three sources behave the same way for the decision code:
- the Hub (or a mirror at HF_ENDPOINT): one model-info call with file metadata resolves the revision
  to a commit and lists every file with its size and hashes; then the small metadata files are read
  concurrently at that commit (one GET each, no HEAD), and stored in the standard Hugging Face cache
  layout so a later offline import finds them; the head of `tokenizer.json` is read with Range
  requests only when special-token ids must be mapped to text and no smaller file has them;
- the local Hugging Face cache, when offline (HF_HUB_OFFLINE=1) or when the network fails;
- a local folder.
Weights are never downloaded. Retries: 429, 5xx and timeouts are retried with backoff; other 4xx stop.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import json
import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import huggingface_hub
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from gallery.errors import (
    GalleryError,
    GatedRepo,
    NetworkFailure,
    NoConfig,
    OfflineNotCached,
    RepoNotFound,
    RevisionNotFound,
)
from importers.source import COMMIT_RE, ModelSource

try:  # huggingface_hub 2.x speaks httpx2; 1.x speaks httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http  # type: ignore[no-redef]

T = TypeVar("T")

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
    "model.safetensors.index.json",
    "model_index.json",
    "params.json",
)
METADATA_PATTERNS = ("additional_chat_templates/*.jinja",)
MAX_METADATA_BYTES = 16 * 1024 * 1024
TOKENIZER_JSON = "tokenizer.json"
MAX_TOKENIZER_HEAD_BYTES = 16 * 1024 * 1024
_FIRST_HEAD_CHUNK = 64 * 1024

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".npz", ".model")


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
        side = _side_cache_path(self.repo_id, self.commit)
        if side is not None and side.is_file():
            try:
                cached = json.loads(side.read_text(encoding="utf-8"))
                if isinstance(cached, list):
                    self._added_tokens = cached
                    return self._added_tokens
            except (OSError, ValueError):
                pass
        if TOKENIZER_JSON not in self.listing or self._head_reader is None:
            return None
        self.stats.round_trips += 1
        try:
            self._added_tokens = _read_added_tokens(self._head_reader, self.listing[TOKENIZER_JSON].size)
        except GalleryError:
            raise
        except (OSError, ValueError) as exc:
            self.warnings.append(f"could not read the special tokens at the head of tokenizer.json: {exc}")
        if self._added_tokens is not None and side is not None:
            _write_side_cache(side, self._added_tokens)
        return self._added_tokens


def _side_cache_path(repo_id: str | None, commit: str | None) -> Path | None:
    """Where the added tokens read from a repo's tokenizer.json head are kept, per repo and commit.

    The Hugging Face cache can only hold whole files (a truncated tokenizer.json there would break
    loaders), so the few kilobytes read with Range requests are kept beside it, keyed by the commit,
    which pins the content. This is what lets an offline import of a cached repo map ids to text.
    """
    if not repo_id or not commit:
        return None
    return hub_cache_dir().parent / "mlx-gallery" / "added-tokens" / ("models--" + repo_id.replace("/", "--")) / f"{commit}.json"


def _write_side_cache(path: Path, tokens: list[dict[str, Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps([{"id": t.get("id"), "content": t.get("content")} for t in tokens]), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # best effort: a read-only cache never fails an import


def _read_added_tokens(read_range: Callable[[str, int, int], bytes], size: int | None) -> list[dict[str, Any]] | None:
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


def is_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but re-read now (tests and callers may set it late)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> str:
    """The Hub endpoint: HF_ENDPOINT when set (a mirror, or the test hub), else huggingface_hub's default."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, honouring HF_HUB_CACHE and HF_HOME as set now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def repo_cache_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    """The cache folder of a model repo (`models--org--name`)."""
    return (cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def _wanted(paths: Iterable[str]) -> list[str]:
    wanted = []
    for path in paths:
        if path in METADATA_FILES or any(fnmatch.fnmatch(path, pattern) for pattern in METADATA_PATTERNS):
            wanted.append(path)
    return sorted(wanted)


class _Retrier:
    """Retry policy: 429/5xx/timeouts/connection errors back off and retry; other errors stop at once."""

    def __init__(self, attempts: int | None = None, base_delay: float | None = None) -> None:
        self.attempts = attempts or int(os.environ.get("GALLERY_HTTP_ATTEMPTS", "4"))
        self.base_delay = base_delay if base_delay is not None else float(os.environ.get("GALLERY_HTTP_BACKOFF", "0.5"))

    def run(self, what: str, call: Callable[[], T]) -> T:
        last: BaseException | None = None
        for attempt in range(self.attempts):
            try:
                return call()
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else None
                if status not in RETRY_STATUS:
                    raise
                last = exc
                delay = _retry_after(exc) if status == 429 else None
            except (_http.TimeoutException, _http.NetworkError, _http.RemoteProtocolError) as exc:
                last = exc
                delay = None
            if attempt + 1 < self.attempts:
                wait = delay if delay is not None else self.base_delay * (2**attempt) * (0.5 + random.random())
                time.sleep(min(wait, 10.0))
        raise NetworkFailure(f"{what}: the Hub kept failing after {self.attempts} attempts ({_describe(last)})")


def _retry_after(exc: HfHubHTTPError) -> float | None:
    try:
        value = exc.response.headers.get("Retry-After") if exc.response is not None else None
        return float(value) if value is not None else None
    except ValueError:
        return None


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__ if exc else "unknown error"


def _hub_error(exc: Exception, repo_id: str, revision: str | None) -> GalleryError:
    """Translate huggingface_hub's errors into one-line errors that say what to do next."""
    if isinstance(exc, GatedRepoError):  # a subclass of RepositoryNotFoundError: check it first
        return GatedRepo(
            f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and authenticate "
            "(set HF_TOKEN or run `hf auth login`)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return RepoNotFound(
            f"repo {repo_id} not found on {hub_endpoint()} (if it is private, set HF_TOKEN or run `hf auth login`)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return RevisionNotFound(f"revision {revision!r} not found in {repo_id}")
    if isinstance(exc, OfflineModeIsEnabled):
        return OfflineNotCached(f"offline mode is on and {repo_id} is not in the local cache")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 403:
            return GatedRepo(f"access to {repo_id} is forbidden (HTTP 403): check that your token can read it")
        return NetworkFailure(f"the Hub answered HTTP {status} for {repo_id}")
    return NetworkFailure(f"could not reach {hub_endpoint()}: {type(exc).__name__}")


def fetch(source: ModelSource, *, token: str | bool | None = None, cache_dir: Path | None = None) -> RepoSnapshot:
    """Read a source's model info and small metadata files. Raises GalleryError subclasses."""
    if source.local_path is not None:
        return _fetch_local(source)
    assert source.repo_id is not None
    if is_offline():
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
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    retrier = _Retrier()
    stats = FetchStats()

    def call_info() -> Any:
        stats.requests += 1
        return api.model_info(repo_id, revision=source.revision, files_metadata=True)

    try:
        info = retrier.run(f"model info for {repo_id}", call_info)
    except GalleryError:
        raise
    except Exception as exc:
        raise _hub_error(exc, repo_id, source.revision) from None
    stats.round_trips += 1
    commit = info.sha
    if not commit or not COMMIT_RE.match(commit):
        raise NetworkFailure(f"the Hub did not return a commit for {repo_id} (got {commit!r})")

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
    headers = build_hf_headers(token=token)
    session = get_session()
    cache = repo_cache_folder(repo_id, cache_dir)
    warnings: list[str] = []

    def url_of(path: str) -> str:
        return f"{endpoint}/{repo_id}/resolve/{commit}/{_quote_path(path)}"

    def get(path: str, extra: dict[str, str] | None = None) -> bytes:
        def call() -> bytes:
            stats.requests += 1
            response = session.get(url_of(path), headers={**headers, **(extra or {})}, follow_redirects=True)
            hf_raise_for_status(response)
            return response.content

        try:
            data = retrier.run(f"{path} of {repo_id}", call)
        except GalleryError:
            raise
        except EntryNotFoundError:
            raise
        except Exception as exc:
            raise _hub_error(exc, repo_id, source.revision) from None
        stats.bytes_received += len(data)
        return data

    def read_file(path: str) -> tuple[str, bytes | None]:
        meta = listing[path]
        cached = _cached_file(cache, commit, path)
        if cached is not None:
            return path, cached
        if meta.size is not None and meta.size > MAX_METADATA_BYTES:
            warnings.append(f"{path} is {meta.size} bytes, over the {MAX_METADATA_BYTES}-byte limit: not read")
            return path, None
        try:
            data = get(path)
        except EntryNotFoundError:
            warnings.append(f"{path} is listed by the Hub but could not be downloaded (404)")
            return path, None
        _store_in_cache(cache, commit, source.revision, path, meta, data)
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

    def read_range(path: str, start: int, end: int) -> bytes:
        cached_path = _cached_path(cache, commit, path)
        if cached_path is not None:
            return _read_file_range(cached_path, start, end)
        try:
            return get(path, {"Range": f"bytes={start}-{end}"})
        except EntryNotFoundError:
            return b""

    snapshot = RepoSnapshot(
        source=source,
        origin="hub",
        repo_id=repo_id,
        commit=commit,
        facts=facts,
        listing=listing,
        files=files,
        warnings=warnings,
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


def _quote_path(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def _cached_path(cache: Path, commit: str, path: str) -> Path | None:
    candidate = cache / "snapshots" / commit / path
    return candidate if candidate.is_file() else None


def _cached_file(cache: Path, commit: str, path: str) -> bytes | None:
    found = _cached_path(cache, commit, path)
    if found is None:
        return None
    try:
        return found.read_bytes()
    except OSError:
        return None


def _store_in_cache(cache: Path, commit: str, revision: str | None, path: str, meta: FileMeta, data: bytes) -> None:
    """Store a downloaded file in the Hugging Face cache layout (blobs/, snapshots/<commit>/).

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
        if link.exists():
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        relative = os.path.relpath(blob, link.parent)
        try:
            os.symlink(relative, link)
        except OSError:
            tmp_copy = link.with_name(link.name + ".incomplete")
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
        tmp = ref_path.with_name(ref_path.name + ".incomplete")
        tmp.write_text(commit)
        os.replace(tmp, ref_path)
    except OSError:
        pass


def _fetch_cached(source: ModelSource, cache_dir: Path | None, *, reason: str) -> RepoSnapshot:
    """Read a repo from the local Hugging Face cache only (no network)."""
    repo_id = source.repo_id
    assert repo_id is not None
    cache = repo_cache_folder(repo_id, cache_dir)
    revision = source.revision or "main"
    commit: str | None = revision if COMMIT_RE.match(revision) else None
    if commit is None:
        ref = cache / "refs" / revision
        if ref.is_file():
            commit = ref.read_text().strip()
    snapshot_dir = cache / "snapshots" / commit if commit else None
    if snapshot_dir is None or not snapshot_dir.is_dir():
        raise OfflineNotCached(
            f"{reason}, and {repo_id}@{revision} is not in the local cache ({cache}); "
            "run the import once with network access, or unset HF_HUB_OFFLINE"
        )
    listing = _cached_listing(repo_id, commit, cache_dir, snapshot_dir)
    files: dict[str, bytes] = {}
    for path in _wanted(listing):
        data = _cached_file(cache, commit, path)
        if data is not None and len(data) <= MAX_METADATA_BYTES:
            files[path] = data

    def read_range(path: str, start: int, end: int) -> bytes:
        found = _cached_path(cache, commit, path)
        if found is None:
            raise OfflineNotCached(f"{reason}, and {path} of {repo_id} is not in the local cache")
        with open(found, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start + 1)

    snapshot = RepoSnapshot(
        source=source,
        origin="cache",
        repo_id=repo_id,
        commit=commit,
        facts=None,
        listing=listing,
        files=files,
        warnings=[f"{reason}: read {repo_id}@{commit[:12]} from the local cache; Hub facts (pipeline tag, tags, "
                  "license) and hashes of files not in the cache are unavailable"],
        _head_reader=read_range,
    )
    _require_config(snapshot)
    return snapshot


def _cached_listing(repo_id: str, commit: str, cache_dir: Path | None, snapshot_dir: Path) -> dict[str, FileMeta]:
    listing: dict[str, FileMeta] = {}
    try:  # snapshot_download records the full tree listing; use it when present
        for entry in huggingface_hub.get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir):
            lfs = getattr(entry, "lfs", None)
            listing[entry.path] = FileMeta(
                path=entry.path, size=entry.size, blob_id=getattr(entry, "blob_id", None),
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
    """Read a local model folder. A folder inside the HF cache keeps its repo id and commit."""
    folder = source.local_path
    assert folder is not None
    listing: dict[str, FileMeta] = {}
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder).as_posix()
        if file.is_file() and not any(part.startswith(".") for part in Path(rel).parts):
            listing[rel] = FileMeta(path=rel, size=file.stat().st_size)
    files: dict[str, bytes] = {}
    warnings: list[str] = []
    for path in _wanted(listing):
        size = listing[path].size or 0
        if size > MAX_METADATA_BYTES:
            warnings.append(f"{path} is {size} bytes, over the {MAX_METADATA_BYTES}-byte limit: not read")
            continue
        files[path] = (folder / path).read_bytes()
    repo_id, commit = _cache_identity(folder)

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
        _head_reader=read_range,
    )
    _require_config(snapshot)
    return snapshot


def _read_file_range(path: str | Path, start: int, end: int) -> bytes:
    """Bytes start..end (inclusive, as in an HTTP Range) of a local file."""
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(end - start + 1)


def _cache_identity(folder: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) when folder is `…/models--org--name/snapshots/<commit>`, else (None, None)."""
    parent = folder.parent
    if parent.name == "snapshots" and COMMIT_RE.match(folder.name) and parent.parent.name.startswith("models--"):
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
    return None if _allows_missing_config(snapshot) else _raise_no_config(where, snapshot)


def _allows_missing_config(snapshot: RepoSnapshot) -> bool:
    # Repos without config.json that are still recognisable (GGUF-only, diffusers) get a better error
    # from the backend decision ("unsupported: …") than "no config.json".
    paths = list(snapshot.listing)
    return "model_index.json" in paths or any(path.endswith(".gguf") for path in paths)


def _raise_no_config(where: object, snapshot: RepoSnapshot) -> None:
    hint = ""
    if snapshot.facts and snapshot.facts.pipeline_tag:
        hint = f" (Hub pipeline tag: {snapshot.facts.pipeline_tag})"
    raise NoConfig(f"{where} has no config.json: not a transformers/MLX model checkpoint{hint}")
