"""Parse the SOURCE argument: a Hub repo in any of the spellings users paste, or a local folder."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from gallery import hub
from gallery.errors import UsageError

# The Hub's repo-id rules: one namespace, one name; letters, digits, - _ . ; no leading/trailing dot or dash.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
MAX_SPEC_CHARS = 4096
_HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where to read a model from: a Hub repo (with an optional revision) or a local folder."""

    repo_id: str | None = None
    revision: str | None = None
    local_path: Path | None = None

    def __str__(self) -> str:
        if self.local_path is not None:
            return str(self.local_path)
        return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)


def _check_repo_id(repo_id: str, original: str) -> str:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise UsageError(
            f"{original!r} is not a Hugging Face repo id (expected org/name) or an existing folder"
        )
    return repo_id


def parse_source(spec: str, revision: str | None = None) -> ModelSource:
    """Parse `org/name`, `hf://org/name`, `huggingface://org/name`, `https://huggingface.co/org/name[/tree/REV]`
    or a local directory. `revision` (from --revision) wins over a revision inside a URL."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("SOURCE is empty: give a repo id like org/name, a Hub URL, or a local folder")
    spec = spec.strip()
    if len(spec) > MAX_SPEC_CHARS:
        raise UsageError(f"SOURCE is {len(spec)} characters long: not a repo id, URL or folder")
    if revision is not None and not revision.strip():
        raise UsageError("--revision is empty")

    path = Path(spec).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise UsageError(f"{spec[:80]!r}…: not a usable path ({exc.strerror})") from None
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") != 1 or exists
    if "://" not in spec and looks_like_path:
        if path.is_dir():
            return ModelSource(local_path=path.resolve(), revision=revision)
        if exists:
            raise UsageError(f"{spec!r} is a file; give a model folder or a repo id")
        if spec.startswith((".", "/", "~")):
            raise UsageError(f"no such file or folder: {spec!r}")

    url_revision: str | None = None
    for scheme in ("hf://", "huggingface://"):
        if spec.startswith(scheme):
            rest = spec[len(scheme) :].strip("/")
            if rest.startswith("models/"):
                rest = rest[len("models/") :]
            rest, _, url_revision_part = rest.partition("@")
            url_revision = url_revision_part or None
            return ModelSource(repo_id=_check_repo_id(rest, spec), revision=revision or url_revision)

    if spec.startswith(("http://", "https://")):
        parsed = urlparse(spec)
        host = (parsed.hostname or "").lower()
        configured = (urlparse(hub.endpoint()).hostname or "").lower()
        if host not in _HUB_HOSTS and host != configured:
            raise UsageError(
                f"{spec!r} is not a Hub URL: its host {host!r} is neither huggingface.co nor the "
                f"configured endpoint ({hub.endpoint()}); give org/name instead"
            )
        parts = [unquote(p) for p in parsed.path.split("/") if p]
        if parts and parts[0] in ("models",):
            parts = parts[1:]
        if parts and parts[0] in ("datasets", "spaces"):
            raise UsageError(f"{spec!r} is a {parts[0][:-1]}, not a model repo")
        if len(parts) < 2:
            raise UsageError(
                f"{spec!r} does not name a model repo (expected https://huggingface.co/org/name)"
            )
        repo_id = f"{parts[0]}/{parts[1]}"
        if len(parts) >= 4 and parts[2] in ("tree", "blob", "resolve", "commit"):
            url_revision = parts[3]
        return ModelSource(repo_id=_check_repo_id(repo_id, spec), revision=revision or url_revision)

    return ModelSource(repo_id=_check_repo_id(spec, spec), revision=revision)
