"""Map special-token ids to text and back, from the smallest file that knows.

Order: `tokenizer_config.json` `added_tokens_decoder`, then `added_tokens.json`, then — only when
still needed — the `added_tokens` list at the head of `tokenizer.json` (read with Range requests;
transformers-v5 style configs dropped `added_tokens_decoder`, and tokenizer.json can be 30+ MB).
"""

from __future__ import annotations

from typing import Any

from gallery.errors import BadMetadata
from importers.metadata import RepoMetadata


class SpecialVocab:
    """Special-token id <-> text lookups with the file each answer came from."""

    def __init__(self, meta: RepoMetadata) -> None:
        self._meta = meta
        self._by_id: dict[int, tuple[str, str]] = {}
        self._by_text: dict[str, tuple[int, str]] = {}
        self._special: dict[str, bool] = {}  # text -> the file's `special` flag, where the file has one
        self._head_loaded = False
        self._load_small_files()

    def _add(self, token_id: int, text: str, source: str, special: Any = None) -> None:
        self._by_id.setdefault(token_id, (text, source))
        self._by_text.setdefault(text, (token_id, source))
        if isinstance(special, bool):
            self._special.setdefault(text, special)

    def _load_small_files(self) -> None:
        decoder = self._meta.tokenizer_config.get("added_tokens_decoder")
        if decoder is not None:
            if not isinstance(decoder, dict):
                raise BadMetadata(
                    "tokenizer_config.json: added_tokens_decoder must be an object of id -> token"
                )
            for key, entry in decoder.items():
                try:
                    token_id = int(key)
                except (TypeError, ValueError):
                    raise BadMetadata(
                        f"tokenizer_config.json: added_tokens_decoder key {key!r} is not an id"
                    ) from None
                content = entry.get("content") if isinstance(entry, dict) else entry
                if not isinstance(content, str):
                    raise BadMetadata(
                        f"tokenizer_config.json: added_tokens_decoder[{key}] has no string content"
                    )
                special = entry.get("special") if isinstance(entry, dict) else None
                self._add(token_id, content, "tokenizer_config.json:added_tokens_decoder", special)
        added = self._meta.json_object("added_tokens.json")
        if added:
            for text, token_id in added.items():
                if isinstance(token_id, bool) or not isinstance(token_id, int):
                    raise BadMetadata(f"added_tokens.json: the id of {text!r} must be an integer")
                self._add(token_id, text, "added_tokens.json")

    def _load_head(self) -> None:
        if self._head_loaded:
            return
        self._head_loaded = True
        tokens: list[dict[str, Any]] | None = self._meta.snapshot.tokenizer_added_tokens()
        for entry in tokens or []:
            token_id, content = entry.get("id"), entry.get("content")
            if isinstance(token_id, int) and not isinstance(token_id, bool) and isinstance(content, str):
                self._add(token_id, content, "tokenizer.json:added_tokens", entry.get("special"))

    def text_of(self, token_id: int) -> tuple[str, str] | None:
        """(text, source file) for an id, or None when no file maps it."""
        if token_id not in self._by_id:
            self._load_head()
        return self._by_id.get(token_id)

    def id_of(self, text: str) -> tuple[int, str] | None:
        """(id, source file) for a token text, or None when no file maps it."""
        if text not in self._by_text:
            self._load_head()
        return self._by_text.get(text)

    def contains_text(self, text: str) -> bool:
        """Whether the special-token vocabulary has this text (without reading tokenizer.json)."""
        return text in self._by_text

    def is_special(self, text: str) -> bool | None:
        """Whether an added token is marked special (True), added as plain text (False), or unknown (None:
        not an added token, or its file does not say)."""
        if text not in self._by_text:
            return None
        return self._special.get(text)

    def known_texts(self) -> set[str]:
        """Every special-token text known so far."""
        return set(self._by_text)
