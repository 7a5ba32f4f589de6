"""The one owner of Hub access: endpoint, offline mode, cache location, timeouts, retries and errors.

Every command that talks to the Hub (import, add, refresh, install, pull, the runtime's on-the-fly import and
weight look-up) goes through here, so the same failure gives the same exit code and message everywhere:
- retries: huggingface_hub's own `http_backoff` (429, 5xx, timeouts and dropped connections; `Retry-After`
  honoured), tuned by GALLERY_HTTP_ATTEMPTS and GALLERY_HTTP_BACKOFF;
- timeouts on every request: HF_HUB_ETAG_TIMEOUT for connecting and for API answers, HF_HUB_DOWNLOAD_TIMEOUT
  for file bodies (huggingface_hub's default client has no timeout at all, so a Hub that accepts the
  connection and never answers would hang forever);
- one translator from huggingface_hub's exceptions to this project's errors (`translate`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from gallery.errors import (
    BadMetadata,
    GalleryError,
    GatedRepo,
    NetworkFailure,
    OfflineNotCached,
    RepoNotFound,
    RevisionNotFound,
    WriteFailed,
    one_line,
)

T = TypeVar("T")
HUB_WEB = "https://huggingface.co"
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_HASH_CHUNK = 4 * 1024 * 1024
# Failures of the local disk, not of the network, wherever they surface (a download that fills the disk).
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_SESSION_LOCK = threading.Lock()
_SESSION_CONFIGURED = False


# ----- settings, read when used (callers and tests may set them late) -----
def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def is_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself reads it once, at import time)."""
    from huggingface_hub import constants

    return _env_bool("HF_HUB_OFFLINE", bool(constants.HF_HUB_OFFLINE))


def endpoint() -> str:
    """The Hub endpoint: HF_ENDPOINT (a mirror, or the test hub) when set, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """The Hugging Face hub cache folder, honouring HF_HUB_CACHE and HF_HOME as set now."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def repo_cache_folder(repo_id: str, cache: Path | None = None) -> Path:
    """The cache folder of a model repo (`models--org--name`)."""
    return (cache or cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def side_cache_dir(kind: str) -> Path:
    """A folder beside the HF cache for what this project keeps about repos (listings, tokenizer heads)."""
    return cache_dir().parent / "mlx-gallery" / kind


def api_timeout() -> float:
    """Seconds to connect, and to wait for an API answer (HF_HUB_ETAG_TIMEOUT, default 10)."""
    return _env_float("HF_HUB_ETAG_TIMEOUT", 10.0)


def download_timeout() -> float:
    """Seconds a file download may stall (HF_HUB_DOWNLOAD_TIMEOUT, default 10)."""
    return _env_float("HF_HUB_DOWNLOAD_TIMEOUT", 10.0)


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def _retry_settings() -> dict[str, float]:
    attempts = max(1, int(_env_float("GALLERY_HTTP_ATTEMPTS", 4)))
    base = _env_float("GALLERY_HTTP_BACKOFF", 0.5)
    return {"max_retries": attempts - 1, "base_wait_time": base, "max_wait_time": max(base, 8.0)}


def configure_session() -> None:
    """Give huggingface_hub's shared HTTP client a timeout (its default client waits forever).

    Uses huggingface_hub's documented hook (set_client_factory) and its own default client, so its request
    hooks and headers stay as they are; only the default timeout changes. Idempotent.
    """
    global _SESSION_CONFIGURED
    with _SESSION_LOCK:
        if _SESSION_CONFIGURED:
            return
        from huggingface_hub.utils import _http

        def factory() -> Any:
            client = _http.default_client_factory()
            client.timeout = _http_module().Timeout(download_timeout(), connect=api_timeout())
            return client

        _http.set_client_factory(factory)
        # Its per-retry warnings would add lines to every command's output; the final failure is reported once.
        logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)
        _SESSION_CONFIGURED = True


def _http_module() -> Any:
    try:  # huggingface_hub 2.x speaks httpx2; 1.x speaks httpx
        import httpx2 as http
    except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
        import httpx as http  # type: ignore[no-redef]
    return http


def token_sent(token: str | bool | None) -> bool:
    """Whether a request made with `token` carries credentials (an explicit one, HF_TOKEN, or a login)."""
    if isinstance(token, str):
        return bool(token)
    if token is False:
        return False
    from huggingface_hub import get_token

    return bool(get_token())


# ----- errors -----
def auth_hint(repo_id: str) -> str:
    """How to get access to a gated repo."""
    return (
        f"{repo_id} is gated: accept its terms at {HUB_WEB}/{repo_id} and authenticate "
        "(set HF_TOKEN to a read token, or run `hf auth login`)"
    )


def _missing_file(exc: BaseException) -> str | None:
    """The repo path a 404 was for, from the failed request's `/resolve/<revision>/<path>` URL."""
    from urllib.parse import unquote, urlparse

    response = getattr(exc, "response", None)
    url = str(getattr(response, "url", "") or "") if response is not None else ""
    parts = urlparse(url).path.split("/resolve/", 1)
    if len(parts) != 2 or "/" not in parts[1]:
        return None
    return unquote(parts[1].split("/", 1)[1]) or None


def translate(
    exc: BaseException,
    *,
    repo_id: str | None,
    revision: str | None = None,
    what: str | None = None,
    token: str | bool | None = None,
) -> GalleryError:
    """huggingface_hub's (or the network's) exception as one of this project's errors, the same on every command."""
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
    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None and not is_offline():
        # hf_hub_download hides why its metadata request failed behind "not in the local cache": judge the failure
        # itself, so a download fails with the same code and message as every other request.
        return translate(exc.__cause__, repo_id=repo_id, revision=revision, what=what, token=token)
    repo = repo_id or "the repo"
    label = what or repo
    data = {"repo_id": repo_id, "revision": revision, "what": what}
    http = _http_module()
    status = (
        exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    )
    if (
        status == 401
        and not isinstance(exc, GatedRepoError)
        and (token_sent(token) or not isinstance(exc, RepositoryNotFoundError))
    ):
        # The Hub answers 401 both for "no such repo" (anonymous callers) and for a bad token; with a token
        # sent, it is the credentials that were refused.
        return GatedRepo(
            f"{label}: the Hub refused the credentials (HTTP 401): check HF_TOKEN or run `hf auth login`",
            **data,
        )
    if isinstance(exc, GatedRepoError):  # a subclass of RepositoryNotFoundError: test it first
        return GatedRepo(auth_hint(repo), **data)
    if isinstance(exc, RepositoryNotFoundError):
        return RepoNotFound(
            f"repo {repo} not found on {endpoint()} (if it is private, set HF_TOKEN or run `hf auth login`)",
            **data,
        )
    if isinstance(exc, RevisionNotFoundError):
        return RevisionNotFound(f"revision {revision!r} not found in {repo}", **data)
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)) and is_offline():
        return OfflineNotCached(
            f"{label}: offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache", **data
        )
    if isinstance(exc, LocalEntryNotFoundError):
        # huggingface_hub says "not in the local cache" when the Hub could not be reached at all.
        return NetworkFailure(f"{label}: could not reach {endpoint()}", **data)
    if isinstance(exc, EntryNotFoundError):
        missing = _missing_file(exc)
        return RepoNotFound(
            f"{label}: the Hub has no "
            + (f"file {missing!r}" if missing else "such file")
            + f" at this revision of {repo} (HTTP 404)",
            **data,
        )
    if status == 403:
        return GatedRepo(
            f"{label}: access to {repo} is forbidden (HTTP 403): your token cannot read it", **data
        )
    attempts = int(_retry_settings()["max_retries"]) + 1
    if status in RETRY_STATUS:
        return NetworkFailure(
            f"{label}: the Hub kept failing after {attempts} attempts (HTTP {status})", **data
        )
    if status is not None:
        return NetworkFailure(f"{label}: the Hub answered HTTP {status}", **data)
    if isinstance(exc, http.TimeoutException):
        return NetworkFailure(
            f"{label}: the Hub at {endpoint()} did not answer in time after {attempts} attempts "
            f"({type(exc).__name__}; HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT set the limits)",
            **data,
        )
    if isinstance(exc, (http.NetworkError, http.RemoteProtocolError, ConnectionError)):
        return NetworkFailure(
            f"{label}: could not reach {endpoint()} after {attempts} attempts ({type(exc).__name__})", **data
        )
    if isinstance(exc, OSError) and (exc.errno in _WRITE_ERRNOS or exc.filename is not None):
        return WriteFailed.from_os_error(exc.filename or label, exc)
    return NetworkFailure(f"{label}: {type(exc).__name__}: {one_line(exc)[:200]}", **data)


@contextlib.contextmanager
def hub_errors(
    *,
    repo_id: str | None,
    revision: str | None = None,
    what: str | None = None,
    token: str | bool | None = None,
) -> Iterator[None]:
    """Translate any Hub or network failure inside the block (see `translate`)."""
    try:
        yield
    except GalleryError:
        raise
    except Exception as exc:
        raise translate(exc, repo_id=repo_id, revision=revision, what=what, token=token) from None


# ----- requests -----
def request(method: str, url: str, *, headers: dict[str, str] | None = None, stream: bool = False) -> Any:
    """One HTTP request with huggingface_hub's backoff and this module's timeouts; raises HfHubHTTPError.

    With stream=True the caller gets a context manager yielding the response (read the body in chunks).
    """
    from huggingface_hub.utils import hf_raise_for_status, http_backoff, http_stream_backoff

    configure_session()
    # An API answer (model info, a HEAD) waits HF_HUB_ETAG_TIMEOUT; only a streamed file body gets the download's.
    read = download_timeout() if stream else api_timeout()
    timeout = _http_module().Timeout(read, connect=api_timeout())
    kwargs: dict[str, Any] = {
        "headers": headers or {},
        "timeout": timeout,
        "follow_redirects": True,
        "retry_on_status_codes": RETRY_STATUS,
        **_retry_settings(),
    }
    if stream:
        return http_stream_backoff(method, url, **kwargs)  # type: ignore[arg-type]
    response = http_backoff(method, url, **kwargs)  # type: ignore[arg-type]
    hf_raise_for_status(response)
    return response


def model_info(repo_id: str, revision: str | None, *, token: str | bool | None) -> Any:
    """The model info (files with sizes and hashes; the revision resolved to a commit), as huggingface_hub's ModelInfo.

    Raises this project's errors: not found, gated, bad revision, network (after retries), or BadMetadata
    when the Hub's answer is not model info at all.
    """
    from huggingface_hub import ModelInfo
    from huggingface_hub.utils import build_hf_headers

    path = f"{endpoint()}/api/models/{repo_id}"
    if revision is not None:
        path += f"/revision/{quote(revision, safe='')}"
    with hub_errors(repo_id=repo_id, revision=revision, what=f"model info for {repo_id}", token=token):
        response = request("GET", path + "?blobs=true", headers=build_hf_headers(token=token))
    try:
        data = response.json()
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}")
        _check_listing(data)
        return ModelInfo(**data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BadMetadata(
            f"the Hub's model info for {repo_id} is not valid ({type(exc).__name__}: {one_line(exc)[:120]})",
            file="model info",
        ) from None


def safe_repo_path(path: object) -> bool:
    """Whether a file name from a listing is a plain relative path inside the repo (no `..`, no absolute or
    empty parts, no backslashes or NULs): a listing that names anything else must never reach the disk."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _check_listing(data: dict[str, Any]) -> None:
    """The model-info fields an import relies on, with the types it relies on (huggingface_hub's ModelInfo
    takes whatever it is given); raises TypeError or ValueError naming the first that is wrong."""
    if not isinstance(data.get("sha"), (str, type(None))):
        raise TypeError(f"sha is {type(data['sha']).__name__}, not a string")
    siblings = data.get("siblings")
    if siblings is None:
        return
    if not isinstance(siblings, list):
        raise TypeError(f"siblings is {type(siblings).__name__}, not a list")
    for sibling in siblings:
        if not isinstance(sibling, dict) or not isinstance(sibling.get("rfilename"), str):
            raise TypeError("a siblings entry has no rfilename string")
        if not safe_repo_path(sibling["rfilename"]):
            raise ValueError(f"unsafe file name {sibling['rfilename'][:80]!r} in siblings")
        size, blob, lfs = sibling.get("size"), sibling.get("blobId"), sibling.get("lfs")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise TypeError(f"size of {sibling['rfilename']!r} is not a byte count")
        if blob is not None and not isinstance(blob, str):
            raise TypeError(f"blobId of {sibling['rfilename']!r} is not a string")
        if lfs is not None and not (isinstance(lfs, dict) and isinstance(lfs.get("sha256", ""), str)):
            raise TypeError(f"lfs of {sibling['rfilename']!r} is not an object with a sha256 string")


def resolve_url(repo_id: str, revision: str, path: str) -> str:
    """The /resolve URL of a repo file at a revision."""
    return f"{endpoint()}/{repo_id}/resolve/{revision}/{quote(path, safe='/')}"


def read_file(
    repo_id: str,
    revision: str,
    path: str,
    *,
    token: str | bool | None,
    limit: int,
    byte_range: tuple[int, int] | None = None,
    listed_size: int | None = None,
) -> bytes:
    """Read a repo file (or an inclusive byte range of it), refusing bodies larger than `limit` bytes, or than
    `listed_size` (the size the Hub's listing gives the file) when that is known.

    The body is read in chunks and cut off at the first byte too many, so a server that sends more than it
    listed (a 200 MB or HTML "config.json") costs at most that many bytes. Raises BadMetadata when over.
    """
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    headers = build_hf_headers(token=token)
    if byte_range is not None:
        headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
    chunks: list[bytes] = []
    size = 0
    with (
        hub_errors(repo_id=repo_id, revision=revision, what=f"{path} of {repo_id}", token=token),
        request("GET", resolve_url(repo_id, revision, path), headers=headers, stream=True) as response,
    ):
        hf_raise_for_status(response)
        for chunk in response.iter_bytes():
            size += len(chunk)
            if listed_size is not None and size > listed_size:
                raise BadMetadata(
                    f"{path} of {repo_id}@{revision[:12]} from {endpoint()} does not match the Hub's listing "
                    f"(more than the {listed_size} bytes listed); it was not stored",
                    file=path,
                )
            if size > limit:
                raise BadMetadata(
                    f"{path} of {repo_id} is larger than the {limit}-byte limit for a metadata file",
                    file=path,
                )
            chunks.append(chunk)
    return b"".join(chunks)


def _with_retries(
    download: Callable[[], T], *, repo_id: str, revision: str, what: str, token: str | bool | None
) -> T:
    """Run a huggingface_hub download with this module's errors and retry budget.

    huggingface_hub retries its metadata requests but not a 5xx or a dropped connection on a file body: such
    a failure is retried here (a file already fetched is not fetched again), with the same budget as every
    other request.
    """
    configure_session()
    settings = _retry_settings()
    wait = settings["base_wait_time"]
    attempt = 0
    while True:
        try:
            return download()
        except GalleryError:
            raise
        except Exception as exc:
            failure = translate(exc, repo_id=repo_id, revision=revision, what=what, token=token)
            attempt += 1
            if not isinstance(failure, NetworkFailure) or attempt > settings["max_retries"]:
                raise failure from None
            # A Retry-After is waited out the way huggingface_hub's http_backoff waits it out (its seconds, plus one).
            retry_after = _retry_after(exc)
            time.sleep(retry_after + 1.0 if retry_after is not None else wait)
            wait = min(wait * 2, settings["max_wait_time"])


def download_file(
    repo_id: str,
    filename: str,
    revision: str,
    *,
    local_dir: Path | None = None,
    cache: Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """Download one file at a pinned commit (into local_dir, or the Hugging Face cache); returns its path."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import build_hf_headers

    configure_session()
    if (
        local_dir is None
    ):  # already in the cache at this commit: no request at all, as hf_hub_download would do
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
    # hf_hub_download's own metadata request is not retried, and its one retry of a 429 or 5xx comes at once,
    # without waiting out a Retry-After: ask first through request(), which retries like every other request.
    with hub_errors(repo_id=repo_id, revision=revision, what=f"{repo_id}/{filename}", token=token):
        request("HEAD", resolve_url(repo_id, revision, filename), headers=build_hf_headers(token=token))

    def download() -> Path:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                local_dir=local_dir,
                cache_dir=cache,
                token=token,
                endpoint=endpoint(),
            )
        )

    return _with_retries(
        download, repo_id=repo_id, revision=revision, what=f"{repo_id}/{filename}", token=token
    )


def download_files(
    repo_id: str,
    filenames: list[str],
    revision: str,
    *,
    local_dir: Path | None = None,
    token: str | bool | None = None,
    max_workers: int = 8,
    tqdm_class: Any = None,
) -> Path:
    """Download exactly these files at a pinned commit, several at once (huggingface_hub's snapshot_download),
    into local_dir or the Hugging Face cache; returns the folder they are in. `tqdm_class` draws every
    progress bar of the download (None: huggingface_hub's own, unless disabled)."""
    import glob

    from huggingface_hub import snapshot_download

    # allow_patterns are fnmatch patterns and file names may hold [ ] * ?: escape them to mean just the file.
    patterns = [glob.escape(name) for name in filenames]

    def download() -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                max_workers=max_workers,
                token=token,
                endpoint=endpoint(),
                cache_dir=None if local_dir is not None else cache_dir(),
                local_dir=local_dir,
                tqdm_class=tqdm_class,
            )
        )

    what = f"the files of {repo_id}@{revision[:12]}"
    return _with_retries(download, repo_id=repo_id, revision=revision, what=what, token=token)


def _retry_after(exc: BaseException | None) -> float | None:
    """The Retry-After seconds of the HTTP answer behind an exception (or its causes), when it gives one."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        value = response.headers.get("Retry-After") if response is not None else None
        if isinstance(value, str) and value.strip().isdigit():
            return float(value.strip())
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


# ----- hashes -----
def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks (weights are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_id(data: bytes) -> str:
    """The git blob SHA-1 of a file's bytes: what the Hub lists as `blob_id` for a small (non-LFS) file."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data, usedforsecurity=False).hexdigest()


def matches_listing(data: bytes, *, size: int | None, blob_id: str | None, sha256: str | None) -> str | None:
    """Why downloaded bytes do not match the Hub's listing of the file, or None when they do."""
    if size is not None and len(data) != size:
        return f"{len(data)} bytes, but the Hub lists {size}"
    if sha256 is not None:
        if hashlib.sha256(data).hexdigest() != sha256:
            return "its sha256 differs from the Hub's listing"
    elif blob_id is not None and len(blob_id) == 40 and git_blob_id(data) != blob_id:
        return "its git blob id differs from the Hub's listing"
    return None
