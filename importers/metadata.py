"""Typed access to a repo's metadata files: JSON parsing and field types checked once, with clear errors.

Every accessor that the decisions rely on checks the type it needs and raises BadMetadata naming the
file and field ("generation_config.json: eos_token_id must be an integer or a list of integers, got
str"), so wrongly typed metadata is an error with an exit code, never a traceback or a silent guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from gallery.errors import BadMetadata
from importers.fetch import RepoSnapshot

# Sub-configs that describe a modality tower; their eos/context fields are not the language model's.
TOWER_KEYS = (
    "vision_config",
    "audio_config",
    "vision_tower",
    "vit_config",
    "visual",
    "vision_encoder",
    "img_processor",
    "speech_config",
    "audio_encoder",
    "mm_vision_tower",
    "vision_tower_config",
)
# Any other dict-valued key that names a modality tower: `image_encoder_config`, `audio_tower`, … (top-level
# or nested under any `*_config`). Dict values only: `vision_feature_layer` or `audio_token_id` are not towers.
_TOWER_KEY_RE = re.compile(
    r"^(vision|visual|vit|image|img|audio|speech|video|mm_vision)(_[a-z0-9]+)*_(config|tower|encoder|model|backbone)$"
)
_AUDIO_KEY_RE = re.compile(r"^(audio|speech)")


def is_tower_key(key: str, value: Any) -> bool:
    """Whether `key: value` in a config describes a modality tower (a non-empty sub-config)."""
    if key in TOWER_KEYS:
        return (isinstance(value, dict) and bool(value)) or (isinstance(value, str) and bool(value))
    return isinstance(value, dict) and bool(value) and bool(_TOWER_KEY_RE.match(key))


def tower_kind(key: str) -> str:
    """`audio` or `vision` for a tower key."""
    return "audio" if _AUDIO_KEY_RE.match(key) or key == "audio_encoder" else "vision"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


class RepoMetadata:
    """The parsed small files of one snapshot."""

    def __init__(self, snapshot: RepoSnapshot) -> None:
        self.snapshot = snapshot
        self._objects: dict[str, dict[str, Any] | None] = {}

    def json_object(self, path: str) -> dict[str, Any] | None:
        """A file parsed as a JSON object; None when the repo has no such file. BadMetadata when malformed."""
        if path in self._objects:
            return self._objects[path]
        raw = self.snapshot.files.get(path)
        value: dict[str, Any] | None = None
        if raw is not None:
            try:
                parsed = json.loads(raw.decode("utf-8-sig"))
            except UnicodeDecodeError:
                raise BadMetadata(f"{path} is not UTF-8 text") from None
            except json.JSONDecodeError as exc:
                raise BadMetadata(
                    f"{path} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
                ) from None
            except RecursionError:
                raise BadMetadata(f"{path} is nested too deeply to read") from None
            if not isinstance(parsed, dict):
                raise BadMetadata(f"{path} must be a JSON object, got {_describe(parsed)}")
            value = parsed
        self._objects[path] = value
        return value

    @property
    def config(self) -> dict[str, Any]:
        """config.json (always present once fetch succeeded, unless the repo is GGUF-only/diffusers)."""
        return self.json_object("config.json") or {}

    @property
    def generation_config(self) -> dict[str, Any]:
        return self.json_object("generation_config.json") or {}

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        return self.json_object("tokenizer_config.json") or {}

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        return self.json_object("special_tokens_map.json") or {}

    def sub_configs(self, *, include_towers: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
        """(dotted path, dict) for config.json and its nested sub-configs (depth ≤ 3), root first.

        Tower sub-configs (vision/audio) are skipped unless include_towers: their eos or context fields
        do not describe the language model.
        """

        def walk(prefix: str, node: dict[str, Any], depth: int) -> Iterator[tuple[str, dict[str, Any]]]:
            yield prefix, node
            if depth >= 3:
                return
            for key, value in node.items():
                if isinstance(value, dict) and (include_towers or not is_tower_key(key, value)):
                    if key in (
                        "id2label",
                        "label2id",
                        "quantization",
                        "quantization_config",
                        "rope_scaling",
                        "rope_parameters",
                        "auto_map",
                        "task_specific_params",
                    ):
                        continue
                    yield from walk(f"{prefix}.{key}" if prefix else key, value, depth + 1)

        yield from walk("", self.config, 0)


def token_text(value: Any, file: str, field: str) -> str | None:
    """A special token given as a string or as `{"content": …}` (AddedToken form)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        content = value.get("content")
        if isinstance(content, str):
            return content or None
    raise BadMetadata(f"{file}: {field} must be a string or an object with 'content', got {_describe(value)}")


def int_ids(value: Any, file: str, field: str) -> list[int]:
    """An id field that may be an int or a list of ints (eos_token_id). None gives []."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise BadMetadata(f"{file}: {field} must be an integer or a list of integers, got a boolean")
    if isinstance(value, int):
        return [value] if value >= 0 else []
    if isinstance(value, list):
        ids = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int):
                raise BadMetadata(
                    f"{file}: {field} must be an integer or a list of integers, found {_describe(item)}"
                )
            if item >= 0:
                ids.append(item)
        return ids
    raise BadMetadata(f"{file}: {field} must be an integer or a list of integers, got {_describe(value)}")


def optional_int(value: Any, file: str, field: str) -> int | None:
    """An optional integer field (context sizes, bits, group sizes)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise BadMetadata(f"{file}: {field} must be an integer, got {_describe(value)}")
    return value


def optional_number(value: Any, file: str, field: str) -> float | None:
    """An optional number field (sampling defaults)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadMetadata(f"{file}: {field} must be a number, got {_describe(value)}")
    return float(value)


def optional_str(value: Any, file: str, field: str) -> str | None:
    """An optional string field."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadMetadata(f"{file}: {field} must be a string, got {_describe(value)}")
    return value


def str_list(value: Any, file: str, field: str) -> list[str]:
    """An optional list of strings (architectures)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadMetadata(f"{file}: {field} must be a list of strings, got {_describe(value)}")
    return list(value)
