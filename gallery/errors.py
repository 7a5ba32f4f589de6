"""User-facing errors: each carries its data as attributes and knows its exit code.

Every error prints as one line (`gallery: error: …`) and exits with its class's code; the README's table
is generated from EXIT_CODES so the two cannot drift apart. Errors are built from data (a file and line,
a repo id, a revision) and their message is formatted from it, so no caller ever parses a message back:
the catalog reads `BadConfig.line`, the runtime maps classes to gRPC and JSON-RPC codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

# code -> (name, meaning). Codes are stable: scripts and CI jobs depend on them.
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("ok", "success"),
    1: ("internal", "an unexpected internal error (a bug: please report it)"),
    2: ("usage", "bad arguments, an unreadable source spec, or a request the runtime cannot honour"),
    3: ("not-found", "the repo does not exist (or is private and you are not authenticated)"),
    4: (
        "gated",
        "the repo is gated or the Hub refused the credentials: accept its terms on the Hub and "
        "authenticate (HF_TOKEN or `hf auth login`)",
    ),
    5: ("bad-revision", "the revision (branch, tag or commit) does not exist"),
    6: (
        "offline-not-cached",
        "offline (HF_HUB_OFFLINE=1 or no network) and the repo is not in the local cache",
    ),
    7: ("network", "the Hub could not be reached, timed out, or kept failing, after retries"),
    8: (
        "bad-metadata",
        "a metadata file is malformed JSON, has wrongly typed fields, or does not match the Hub's listing",
    ),
    9: ("no-config", "the repo or folder has no config.json (not a model checkpoint)"),
    10: (
        "unsupported",
        "the model is of a kind this project cannot serve (speech, embeddings, retrieval, segmentation, classification, image generation, GGUF-only)",
    ),
    11: ("exists", "the output file exists (use --force to replace it)"),
    12: (
        "strict",
        "--strict: the chat template is missing or failed its render check, or an expected file is missing",
    ),
    13: ("bad-config", "a config or catalog file is malformed or fails the schema"),
    14: ("validation", "`gallery validate` found problems in the catalog"),
    15: ("drift", "`gallery refresh` found entries that drifted from the Hub"),
    16: ("hash-mismatch", "a downloaded file does not match its pinned sha256"),
    17: ("runtime", "the runtime could not load or run the model"),
    18: (
        "write-failed",
        "a file could not be written (disk full, permissions, read-only file system, missing folder)",
    ),
    130: ("interrupted", "interrupted (Ctrl-C)"),
}


def one_line(text: object) -> str:
    """Text with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class GalleryError(Exception):
    """Base of every user-facing error: a one-line message and an exit code."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    @property
    def message(self) -> str:
        """The one-line message."""
        return str(self)


class UsageError(GalleryError):
    """Bad arguments or an unreadable source spec."""

    exit_code = 2


class RequestError(UsageError):
    """A malformed generation request (bad field, value out of range, oversized, media it cannot take).

    `field` names the request field at fault when there is one, so interfaces can report it.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# ----- the Hub -----
class HubError(GalleryError):
    """A failure talking to the Hub about one repo; `what` says which request failed."""

    def __init__(
        self,
        message: str,
        *,
        repo_id: str | None = None,
        revision: str | None = None,
        what: str | None = None,
    ) -> None:
        super().__init__(message)
        self.repo_id, self.revision, self.what = repo_id, revision, what


class RepoNotFound(HubError):
    """The repo (or the file) does not exist, or is private and no valid token was sent."""

    exit_code = 3


class ModelNotFound(GalleryError):
    """A model spec that names no config file, catalog entry, model folder or Hub repo."""

    exit_code = 3

    def __init__(self, message: str, *, spec: str | None = None) -> None:
        super().__init__(message)
        self.spec = spec


class GatedRepo(HubError):
    """The repo is gated, or the Hub refused the credentials (401/403)."""

    exit_code = 4


class RevisionNotFound(HubError):
    """The branch, tag or commit does not exist."""

    exit_code = 5


class OfflineNotCached(HubError):
    """Offline, and what is needed is not in the local cache."""

    exit_code = 6


class NetworkFailure(HubError):
    """The Hub could not be reached, timed out, or kept failing after retries."""

    exit_code = 7


class BadMetadata(GalleryError):
    """A metadata file is malformed, wrongly typed, too large, or disagrees with the Hub's listing."""

    exit_code = 8

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class NoConfig(GalleryError):
    """Not a model checkpoint: no config.json."""

    exit_code = 9


class UnsupportedModel(GalleryError):
    """A kind of model this project cannot serve."""

    exit_code = 10


class OutputExists(GalleryError):
    """The output file exists and --force was not given."""

    exit_code = 11

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = str(path) if path is not None else None


class StrictFailure(GalleryError):
    """--strict refused a missing or broken template, or a missing expected file."""

    exit_code = 12


class BadConfig(GalleryError):
    """A config or catalog file that cannot be read or fails the schema.

    Built from where the problem is (`file`, `line`, `field`) and what it is (`problem`); the message is
    `file:line: field: problem`, and callers that need the parts read the attributes.
    """

    exit_code = 13

    def __init__(
        self,
        problem: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.problem = one_line(problem)
        where = f"{self.file}:{line}" if self.file and line else self.file
        super().__init__(": ".join(part for part in (where, field, self.problem) if part))


class ValidationFailed(GalleryError):
    """`gallery validate` (or a check before a catalog write) found problems."""

    exit_code = 14


class DriftDetected(GalleryError):
    """`gallery refresh` found entries that drifted from the Hub."""

    exit_code = 15


class HashMismatch(GalleryError):
    """A downloaded file does not match its pinned sha256."""

    exit_code = 16

    def __init__(
        self, message: str, *, file: str | None = None, expected: str | None = None, actual: str | None = None
    ) -> None:
        super().__init__(message)
        self.file, self.expected, self.actual = file, expected, actual


class RuntimeFailure(GalleryError):
    """The runtime could not load or run the model."""

    exit_code = 17


class WriteFailed(GalleryError):
    """A file could not be written; `path` is the file and `reason` the operating system's reason."""

    exit_code = 18

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), one_line(reason)
        super().__init__(f"cannot write {self.path}: {self.reason}")

    @classmethod
    def from_os_error(cls, path: str | Path, exc: OSError) -> WriteFailed:
        """The error for an OSError raised while writing `path`."""
        return cls(path, exc.strerror or type(exc).__name__)


def exit_code_table() -> str:
    """The exit codes as a Markdown table (for the README and `gallery --help`)."""
    rows = ["| code | name | meaning |", "|---|---|---|"]
    rows += [f"| {code} | {name} | {meaning} |" for code, (name, meaning) in EXIT_CODES.items()]
    return "\n".join(rows)
