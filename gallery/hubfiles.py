"""Download single repo files at a pinned commit through huggingface_hub, hash them, and turn the client's
errors into one-line errors that say what to do next (shared by `gallery add`, `refresh` and `install`)."""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gallery.errors import (
    GalleryError,
    GatedRepo,
    NetworkFailure,
    OfflineNotCached,
    RepoNotFound,
    RevisionNotFound,
)

T = TypeVar("T")

HUB_WEB = "https://huggingface.co"
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_HASH_CHUNK = 4 * 1024 * 1024


def hub_endpoint() -> str:
    """The Hub endpoint as set now: HF_ENDPOINT (a mirror, or the test hub) or huggingface.co.

    huggingface_hub reads HF_ENDPOINT once at import time; reading it per call lets tests and wrappers set it late.
    """
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself reads it at import time)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks (weights are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def auth_hint(repo_id: str) -> str:
    """How to authenticate for a gated repo."""
    return (f"{repo_id} is gated: accept its terms at {HUB_WEB}/{repo_id} and authenticate "
            "(set HF_TOKEN to a read token, or run `hf auth login`)")


def translate_hub_error(exc: BaseException, repo_id: str, what: str) -> GalleryError:
    """A huggingface_hub (or network) exception as a one-line GalleryError with the right exit code."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GalleryError):
        return exc
    if isinstance(exc, GatedRepoError):  # a subclass of RepositoryNotFoundError: test it first
        return GatedRepo(auth_hint(repo_id))
    if isinstance(exc, RepositoryNotFoundError):
        return RepoNotFound(f"repo {repo_id} not found on {hub_endpoint()} "
                            "(if it is private, set HF_TOKEN or run `hf auth login`)")
    if isinstance(exc, RevisionNotFoundError):
        return RevisionNotFound(f"{what}: the pinned revision no longer exists in {repo_id} "
                                "(run `gallery refresh` to re-pin the entry)")
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)) and is_offline():
        return OfflineNotCached(f"{what}: offline mode is on (HF_HUB_OFFLINE) and the file is not cached")
    if isinstance(exc, LocalEntryNotFoundError):
        # huggingface_hub says "not in the local cache" when the Hub could not be reached at all.
        return NetworkFailure(f"{what}: could not reach {hub_endpoint()}")
    if isinstance(exc, EntryNotFoundError):
        return RepoNotFound(f"{what}: the Hub cannot serve this file at the pinned revision of {repo_id} (HTTP 404); "
                            "if a catalog entry pins it, `gallery refresh` re-pins the entry")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return GatedRepo(f"{what}: the Hub refused the credentials (HTTP 401): check HF_TOKEN "
                             "or run `hf auth login`")
        if status == 403:
            return GatedRepo(f"{what}: access to {repo_id} is forbidden (HTTP 403): your token cannot read it")
        return NetworkFailure(f"{what}: the Hub answered HTTP {status}")
    if isinstance(exc, OSError):
        return NetworkFailure(f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    return NetworkFailure(f"{what}: {type(exc).__name__}")


def _retryable(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        import httpx2 as http
    except ImportError:  # pragma: no cover - huggingface_hub 1.x speaks httpx
        import httpx as http  # type: ignore[no-redef]

    if isinstance(exc, HfHubHTTPError):
        return exc.response is not None and exc.response.status_code in _RETRY_STATUS
    return isinstance(exc, (http.TimeoutException, http.NetworkError, http.RemoteProtocolError))


def with_retries(what: str, repo_id: str, call: Callable[[], T]) -> T:
    """Run call; retry 408/429/5xx and dropped connections with backoff; translate the final error.

    GALLERY_HTTP_ATTEMPTS (default 4) and GALLERY_HTTP_BACKOFF (seconds, default 0.5) tune it, as for imports.
    """
    attempts = max(1, int(os.environ.get("GALLERY_HTTP_ATTEMPTS", "4")))
    base = float(os.environ.get("GALLERY_HTTP_BACKOFF", "0.5"))
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if not _retryable(exc) or attempt + 1 == attempts:
                raise translate_hub_error(exc, repo_id, what) from None
            time.sleep(min(base * (2**attempt) * (0.5 + random.random()), 10.0))
    raise AssertionError("unreachable")  # pragma: no cover


def download_file(
    repo_id: str,
    filename: str,
    revision: str,
    *,
    local_dir: Path | None = None,
    cache_dir: Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """Download one file at a pinned commit (into local_dir, or the Hugging Face cache) and return its path."""
    from huggingface_hub import hf_hub_download

    def call() -> Path:
        return Path(hf_hub_download(
            repo_id, filename, revision=revision, local_dir=local_dir, cache_dir=cache_dir,
            token=token, endpoint=hub_endpoint(),
        ))

    return with_retries(f"{repo_id}/{filename}", repo_id, call)
