"""User-facing errors and their exit codes, shared by every command.

Each error prints as one line (`gallery: error: …`) and exits with its own code; the README's table
is generated from EXIT_CODES so the two cannot drift apart.
"""

from __future__ import annotations

# code -> (name, meaning). Codes are stable: scripts and CI jobs depend on them.
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("ok", "success"),
    1: ("internal", "an unexpected internal error (a bug: please report it)"),
    2: ("usage", "bad arguments or an unreadable source spec"),
    3: ("not-found", "the repo does not exist (or is private and you are not authenticated)"),
    4: ("gated", "the repo is gated: accept its terms on the Hub and authenticate (HF_TOKEN or `hf auth login`)"),
    5: ("bad-revision", "the revision (branch, tag or commit) does not exist"),
    6: ("offline-not-cached", "offline (HF_HUB_OFFLINE=1 or no network) and the repo is not in the local cache"),
    7: ("network", "the Hub could not be reached, or kept failing, after retries"),
    8: ("bad-metadata", "a metadata file is malformed JSON or has wrongly typed fields"),
    9: ("no-config", "the repo or folder has no config.json (not a model checkpoint)"),
    10: ("unsupported", "the model is of a kind this project cannot serve (speech, embeddings, image generation, GGUF-only)"),
    11: ("exists", "the output file exists (use --force to replace it) or cannot be written"),
    12: ("strict", "--strict: the chat template is missing or failed its render check"),
    13: ("bad-config", "a config or catalog file is malformed or fails the schema"),
    14: ("validation", "`gallery validate` found problems in the catalog"),
    15: ("drift", "`gallery refresh` found entries that drifted from the Hub"),
    16: ("hash-mismatch", "a downloaded file does not match its pinned sha256"),
    17: ("runtime", "the runtime could not load or run the model"),
    130: ("interrupted", "interrupted (Ctrl-C)"),
}


class GalleryError(Exception):
    """Base of every user-facing error: a one-line message and an exit code."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(GalleryError):
    exit_code = 2


class RepoNotFound(GalleryError):
    exit_code = 3


class GatedRepo(GalleryError):
    exit_code = 4


class RevisionNotFound(GalleryError):
    exit_code = 5


class OfflineNotCached(GalleryError):
    exit_code = 6


class NetworkFailure(GalleryError):
    exit_code = 7


class BadMetadata(GalleryError):
    exit_code = 8


class NoConfig(GalleryError):
    exit_code = 9


class UnsupportedModel(GalleryError):
    exit_code = 10


class OutputExists(GalleryError):
    exit_code = 11


class StrictFailure(GalleryError):
    exit_code = 12


class BadConfig(GalleryError):
    exit_code = 13


class ValidationFailed(GalleryError):
    exit_code = 14


class DriftDetected(GalleryError):
    exit_code = 15


class HashMismatch(GalleryError):
    exit_code = 16


class RuntimeFailure(GalleryError):
    exit_code = 17


def exit_code_table() -> str:
    """The exit codes as a Markdown table (for the README and `gallery --help`)."""
    rows = ["| code | name | meaning |", "|---|---|---|"]
    rows += [f"| {code} | {name} | {meaning} |" for code, (name, meaning) in EXIT_CODES.items()]
    return "\n".join(rows)
