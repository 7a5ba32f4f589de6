"""Where a checkpoint's vision and audio towers show.

Config sections and media-token keys, tower tensor names in the weights index, and processor classes: the
strong evidence importers.backend weighs when it decides between mlx-lm and mlx-vlm.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from importers.metadata import RepoMetadata, is_tower_key, tower_kind

_MEDIA_TOKEN_KEYS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "audio_token_id",
    "audio_token_index",
)
# Tensor-name markers of modality towers in a weights index (any path component). Projectors
# (`multi_modal_projector`, `mm_projector`) are left out: audio-only models have them too.
_VISION_TENSOR = re.compile(
    r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|vision_backbone|vision_embed_tokens|vit|"
    r"image_encoder|image_vit|embed_vision|vision_embed|img_processor|"
    r"image_newline|patch_embed|vpm|visual_tokenizer|vision_projection|image_projector)(\.|$)"
)
_AUDIO_TENSOR = re.compile(
    r"(^|\.)(audio_tower|audio_model|audio_encoder|embed_audio|speech_encoder|audio_projector|"
    r"audio_projection|apm|whisper_encoder|sound_encoder)(\.|$)"
)
_PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
)
# Fields of processor files that name a class; the class name says which modality it prepares.
_PROCESSOR_CLASS_FIELDS = (
    "image_processor_type",
    "video_processor_type",
    "feature_extractor_type",
    "processor_class",
)
_VISUAL_CLASS = re.compile(r"Image|Video|Vision|Visual|VL|Pixel|Siglip|Clip", re.IGNORECASE)
_AUDIO_CLASS = re.compile(r"Audio|Speech|Whisper|Wav|Sound|Mel|Voice", re.IGNORECASE)
_VISIONISH_TAGS = frozenset(
    {"vision", "multimodal", "image-text-to-text", "vlm", "any-to-any", "video-text-to-text"}
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


def find_towers(meta: RepoMetadata) -> list[tuple[str, str]]:
    """(dotted path, kind) of every tower sub-config in config.json: top-level or nested under any sub-config."""
    found: list[tuple[str, str]] = []
    for path, node in meta.sub_configs(include_towers=True):
        for key, value in node.items():
            if is_tower_key(key, value):
                found.append((f"{path}.{key}" if path else key, tower_kind(key)))
    # A tower's own nested dicts (vision_config.text_config …) are part of that tower, not new towers.
    return [(p, k) for p, k in found if not any(p.startswith(q + ".") for q, _ in found)]


def weight_tensor_names(meta: RepoMetadata) -> list[str] | None:
    """The tensor names of the weights index (None when the repo has no index to read)."""
    index = meta.json_object("model.safetensors.index.json")
    if index is None:
        return None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        return None
    return [str(name) for name in weight_map]


def tensor_prefixes(names: list[str], pattern: re.Pattern[str]) -> dict[str, int]:
    """Tower tensor counts by prefix (the name up to and including the tower component)."""
    counts: dict[str, int] = {}
    for name in names:
        match = pattern.search(name)
        if match:
            prefix = name[: match.end(2)]
            counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def find_processor_classes(meta: RepoMetadata, listing: Iterable[str]) -> list[tuple[str, str, str, str]]:
    """(file, field, class name, kind) for each processor class a processor file names; kind is
    `vision`, `audio` or `other` (a processor whose name says neither)."""
    found: list[tuple[str, str, str, str]] = []
    for name in _PROCESSOR_FILES:
        if name == "chat_template.json" or name not in listing:
            continue
        data = meta.json_object(name) or {}
        nodes: list[tuple[str, dict[str, Any]]] = [("", data)]
        nodes += [(f"{k}.", v) for k, v in data.items() if isinstance(v, dict) and k != "auto_map"]
        for prefix, node in nodes:
            for field in _PROCESSOR_CLASS_FIELDS:
                value = node.get(field)
                if not isinstance(value, str) or not value:
                    continue
                kind = (
                    "audio"
                    if field == "feature_extractor_type" or _AUDIO_CLASS.search(value)
                    else "vision"
                    if field in ("image_processor_type", "video_processor_type")
                    or _VISUAL_CLASS.search(value)
                    else "other"
                )
                found.append((name, prefix + field, value, kind))
    return found
