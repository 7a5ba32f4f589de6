"""What an import read from a repo at one commit (RepoSnapshot), and the helpers every source shares: which
files are metadata, size limits, the side cache beside the Hugging Face cache, the lazy reads of a file's head
(tokenizer.json's special tokens, the model card).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from gallery import hub
from gallery.errors import BadMetadata, GalleryError, NoConfig
from importers.source import ModelSource

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
CARD_FILE = "README.md"
MAX_CARD_BYTES = 64 * 1024


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
    _card: str | None = None
    _card_read: bool = False

    def text(self, path: str) -> str | None:
        """A read file as text (UTF-8, a BOM tolerated), or None when it was not read."""
        raw = self.files.get(path)
        return None if raw is None else raw.decode("utf-8-sig", errors="replace")

    def card_text(self) -> str | None:
        """The head of the model card (README.md, first MAX_CARD_BYTES), read lazily once; None without one.

        Only weak evidence reads it (a decision that found nothing stronger), so most imports never fetch it.
        """
        if self._card_read:
            return self._card
        self._card_read = True
        if CARD_FILE not in self.listing or self._head_reader is None:
            return None
        size = self.listing[CARD_FILE].size
        end = MAX_CARD_BYTES if size is None else min(MAX_CARD_BYTES, size)
        if end <= 0:
            return None
        self.stats.round_trips += 1
        try:
            head = self._head_reader(CARD_FILE, 0, end - 1)
        except (GalleryError, OSError) as exc:  # a card is never worth failing an import over
            self.warnings.append(f"could not read the model card ({CARD_FILE}): {exc}")
            return None
        self._card = head.decode("utf-8", errors="replace")
        return self._card

    def tokenizer_added_tokens(self) -> list[dict[str, Any]] | None:
        """The `added_tokens` list from the head of tokenizer.json (read lazily, once, with Range requests).

        Returns None when the repo has no tokenizer.json or its head cannot be parsed.
        """
        if self._added_tokens_read:
            return self._added_tokens
        self._added_tokens_read = True
        side = side_path("added-tokens", self.repo_id, self.commit)
        cached = read_side(side)
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
            write_side(
                side,
                [
                    {"id": t.get("id"), "content": t.get("content"), "special": t.get("special")}
                    for t in self._added_tokens
                ],
            )
        return self._added_tokens


# ----- the side cache: what this project keeps per repo and commit beside the HF cache -----
def side_path(kind: str, repo_id: str | None, commit: str | None) -> Path | None:
    """Where `kind` data about a repo at a commit is kept.

    The Hugging Face cache holds only whole files (a truncated tokenizer.json there would break loaders) and
    no listings, so the few kilobytes read with Range requests and the Hub's file listing are kept beside
    it, keyed by the commit, which pins their content. This is what lets an offline import of a cached repo
    map ids to text and know which files it is missing.
    """
    if not repo_id or not commit:
        return None
    return hub.side_cache_dir(kind) / ("models--" + repo_id.replace("/", "--")) / f"{commit}.json"


def read_side(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_side(path: Path | None, data: Any) -> None:
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


def wanted_files(paths: Iterable[str]) -> list[str]:
    wanted = []
    for path in paths:
        if not hub.safe_repo_path(path):  # `*` matches `/`: `additional_chat_templates/../../x.jinja` never
            continue
        if path in METADATA_FILES or any(fnmatch.fnmatch(path, pattern) for pattern in METADATA_PATTERNS):
            wanted.append(path)
    return sorted(wanted)


def note_oversized(path: str, size: int, where: str, warnings: list[str]) -> None:
    """A metadata file over the size limit: an error for config.json (nothing can be decided without it), else a
    warning (the decisions that need it say what they lack)."""
    message = f"{where} is {size} bytes, over the {MAX_METADATA_BYTES}-byte limit for a metadata file"
    if path == "config.json":
        raise BadMetadata(message, file=path)
    warnings.append(f"{message}: not read")


def read_file_range(path: str | Path, start: int, end: int) -> bytes:
    """Bytes start..end (inclusive, as in an HTTP Range) of a local file."""
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(end - start + 1)


def require_config(snapshot: RepoSnapshot) -> None:
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
