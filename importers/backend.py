"""Decide the backend: `mlx-vlm` only when the checkpoint really has a vision or audio tower.

Evidence is weighed, not voted: the weights index (tensor names) is the strongest, because it says
what the checkpoint actually contains; then tower sub-configs in config.json (top-level or nested);
then processor files naming an image/video/audio processor class; the Hub's pipeline tag, architecture
names and image-token ids are weak (text-only conversions of vision models keep them). Decisive above all:
whether the installed mlx-lm / mlx-vlm has a class for the model type, resolved the way each library does. Repos of kinds the project cannot serve
(speech, embeddings, image generation, GGUF-only) are refused with what was found.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from gallery.config import SUPPORTED_BACKENDS, Backend, Decision, Evidence
from gallery.errors import UnsupportedModel, UsageError
from gallery.families import LibrarySupport, library_support
from importers.fetch import RepoSnapshot
from importers.metadata import RepoMetadata, is_tower_key, optional_str, str_list, tower_kind

VISION_PIPELINES = frozenset(
    {
        "image-text-to-text",
        "any-to-any",
        "visual-question-answering",
        "image-to-text",
        "video-text-to-text",
        "audio-text-to-text",
        "document-question-answering",
    }
)
TEXT_PIPELINES = frozenset({"text-generation", "text2text-generation", "conversational"})
UNSUPPORTED_PIPELINES: dict[str, str] = {
    "automatic-speech-recognition": "speech recognition",
    "text-to-speech": "speech synthesis",
    "text-to-audio": "audio generation",
    "audio-to-audio": "audio processing",
    "audio-classification": "audio classification",
    "voice-activity-detection": "voice activity detection",
    "feature-extraction": "embeddings",
    "sentence-similarity": "embeddings",
    "text-ranking": "reranking",
    "fill-mask": "masked-language modelling (an encoder)",
    "text-classification": "text classification",
    "token-classification": "token classification",
    "zero-shot-classification": "zero-shot classification",
    "question-answering": "extractive question answering",
    "text-to-image": "image generation",
    "image-to-image": "image generation",
    "unconditional-image-generation": "image generation",
    "text-to-video": "video generation",
    "image-to-video": "video generation",
    "text-to-3d": "3D generation",
    "image-classification": "image classification",
    "object-detection": "object detection",
    "image-segmentation": "image segmentation",
    "depth-estimation": "depth estimation",
    "mask-generation": "mask generation",
    "zero-shot-image-classification": "zero-shot image classification",
    "image-feature-extraction": "image embeddings",
}
UNSUPPORTED_LIBRARIES: dict[str, str] = {
    "diffusers": "image generation (diffusers)",
    "sentence-transformers": "embeddings (sentence-transformers)",
    "gguf": "GGUF weights (llama.cpp)",
    "open_clip": "CLIP embeddings",
    "timm": "image classification (timm)",
    "speechbrain": "speech (speechbrain)",
    "nemo": "speech (NeMo)",
    "pyannote-audio": "speech (pyannote)",
    "whisperkit": "speech recognition (WhisperKit)",
}
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    **dict.fromkeys(
        [
            "whisper",
            "wav2vec2",
            "hubert",
            "wavlm",
            "speecht5",
            "seamless_m4t",
            "bark",
            "encodec",
            "musicgen",
            "data2vec-audio",
            "unispeech",
            "sew",
        ],
        "speech/audio",
    ),
    **dict.fromkeys(
        [
            "bert",
            "roberta",
            "xlm-roberta",
            "distilbert",
            "mpnet",
            "nomic_bert",
            "deberta",
            "deberta-v2",
            "electra",
            "albert",
            "camembert",
            "modernbert",
            "new",
        ],
        "an encoder (embeddings/classification)",
    ),
    **dict.fromkeys(["clip", "siglip", "dinov2", "vit"], "a vision encoder (embeddings/classification)"),
}
_UNSUPPORTED_ARCH_SUFFIXES = (
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForSpeechSeq2Seq",
    "ForCTC",
    "ForAudioClassification",
    "ForImageClassification",
    "ForTextToSpeech",
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


class NoLoader(UnsupportedModel):
    """Neither mlx-lm nor mlx-vlm has a class for the model type (exit 10), with what each resolved."""

    def __init__(
        self,
        message: str,
        *,
        model_type: str | None,
        support: dict[str, LibrarySupport],
        modalities: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.modalities = modalities or []
        self.model_type = model_type
        self.support = support
        self.versions = {s.library: s.version for s in support.values()}


@dataclasses.dataclass
class BackendDecision:
    """The backend and which modalities the towers accept."""

    backend: Backend
    image: bool
    audio: bool
    video: bool
    decision: Decision
    warnings: list[str]
    support: dict[str, LibrarySupport] = dataclasses.field(default_factory=dict)


def _towers(meta: RepoMetadata) -> list[tuple[str, str]]:
    """(dotted path, kind) of every tower sub-config in config.json: top-level or nested under any sub-config."""
    found: list[tuple[str, str]] = []
    for path, node in meta.sub_configs(include_towers=True):
        for key, value in node.items():
            if is_tower_key(key, value):
                found.append((f"{path}.{key}" if path else key, tower_kind(key)))
    # A tower's own nested dicts (vision_config.text_config …) are part of that tower, not new towers.
    return [(p, k) for p, k in found if not any(p.startswith(q + ".") for q, _ in found)]


def _weight_tensor_names(meta: RepoMetadata) -> list[str] | None:
    index = meta.json_object("model.safetensors.index.json")
    if index is None:
        return None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        return None
    return [str(name) for name in weight_map]


def _tensor_prefixes(names: list[str], pattern: re.Pattern[str]) -> dict[str, int]:
    """Tower tensor counts by prefix (the name up to and including the tower component)."""
    counts: dict[str, int] = {}
    for name in names:
        match = pattern.search(name)
        if match:
            prefix = name[: match.end(2)]
            counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def _processor_classes(meta: RepoMetadata, listing: Iterable[str]) -> list[tuple[str, str, str, str]]:
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


def _unsupported_reasons(snapshot: RepoSnapshot, meta: RepoMetadata) -> list[str]:
    reasons: list[str] = []
    facts = snapshot.facts
    if facts is not None:
        if facts.pipeline_tag in UNSUPPORTED_PIPELINES:
            reasons.append(
                f"Hub pipeline tag {facts.pipeline_tag!r} ({UNSUPPORTED_PIPELINES[facts.pipeline_tag]})"
            )
        if facts.library_name in UNSUPPORTED_LIBRARIES:
            reasons.append(
                f"Hub library {facts.library_name!r} ({UNSUPPORTED_LIBRARIES[facts.library_name]})"
            )
        for tag in facts.tags:
            if tag in ("sentence-transformers", "diffusers") and f"Hub library {tag!r}" not in " ".join(
                reasons
            ):
                reasons.append(f"Hub tag {tag!r} ({UNSUPPORTED_LIBRARIES[tag]})")
    model_type = meta.config.get("model_type")
    if isinstance(model_type, str) and model_type in UNSUPPORTED_MODEL_TYPES:
        reasons.append(f"config.json model_type {model_type!r} ({UNSUPPORTED_MODEL_TYPES[model_type]})")
    architectures = str_list(meta.config.get("architectures"), "config.json", "architectures")
    odd = [arch for arch in architectures if arch.endswith(_UNSUPPORTED_ARCH_SUFFIXES)]
    if architectures and len(odd) == len(architectures):
        reasons.append(f"config.json architectures {odd} (not a text generator)")
    return reasons


def _format_problems(snapshot: RepoSnapshot) -> list[str]:
    """Problems no backend choice can fix: GGUF-only, diffusers pipelines, no weights we can read."""
    paths = list(snapshot.listing)
    problems: list[str] = []
    ggufs = [p for p in paths if p.endswith(".gguf")]
    weights = [p for p in paths if p.endswith(_WEIGHT_SUFFIXES)]
    if ggufs and not weights:
        problems.append(
            f"only GGUF weights ({len(ggufs)} .gguf file(s), e.g. {ggufs[0]}): use llama.cpp, or an MLX conversion"
        )
    if "model_index.json" in paths:
        problems.append("a diffusers pipeline (model_index.json): image generation")
    if "config.json" not in snapshot.files and not problems:
        problems.append("no config.json")
    return problems


def decide_backend(
    snapshot: RepoSnapshot, meta: RepoMetadata, requested: str | None = None
) -> BackendDecision:
    """Weigh every source of evidence and pick `mlx` or `mlx-vlm`. Raises UnsupportedModel / UsageError.

    The modality evidence (weights, config, processor files, Hub facts) says which backend the checkpoint
    needs; what the installed libraries can load is decisive: a backend without a class for the model
    type is never chosen when the other has one, and when neither has one the import fails (NoLoader).
    """
    if requested is not None and requested not in SUPPORTED_BACKENDS:
        raise UsageError(
            f"--backend {requested!r} is not supported; choose one of {', '.join(SUPPORTED_BACKENDS)}"
        )
    problems = _format_problems(snapshot)
    if problems:
        raise UnsupportedModel(
            f"{_where(snapshot)} cannot be served by mlx-lm or mlx-vlm: {'; '.join(problems)}"
        )
    unsupported = _unsupported_reasons(snapshot, meta)
    warnings: list[str] = []
    if unsupported and requested is None:
        raise UnsupportedModel(
            f"{_where(snapshot)} is not a chat/text-generation model this project can serve: {'; '.join(unsupported)}"
            " (pass --backend to import it anyway)"
        )

    evidence: list[Evidence] = []
    against: list[str] = []
    towers = _towers(meta)
    tensor_names = _weight_tensor_names(meta)
    for path, kind in towers:
        evidence.append(
            Evidence(
                source="config.json", field=path, detail=f"{kind} tower sub-config present", strength="medium"
            )
        )
    vision_prefixes = _tensor_prefixes(tensor_names or [], _VISION_TENSOR)
    audio_prefixes = _tensor_prefixes(tensor_names or [], _AUDIO_TENSOR)
    vision_tensors, audio_tensors = sum(vision_prefixes.values()), sum(audio_prefixes.values())
    if tensor_names is not None:
        if vision_tensors or audio_tensors:
            shown = sorted({**vision_prefixes, **audio_prefixes}.items(), key=lambda kv: -kv[1])[:4]
            detail = (
                f"{vision_tensors} vision and {audio_tensors} audio tower tensors among {len(tensor_names)} "
                f"({', '.join(f'{prefix}.* {count}' for prefix, count in shown)})"
            )
        else:
            detail = f"no tower tensors among {len(tensor_names)} tensors"
        evidence.append(
            Evidence(
                source="model.safetensors.index.json", field="weight_map", detail=detail, strength="strong"
            )
        )
    processor_classes = _processor_classes(meta, snapshot.listing)
    for file, field, cls, kind in processor_classes:
        what = {"vision": "an image/video processor", "audio": "an audio feature extractor"}.get(
            kind, "a processor (modality not named)"
        )
        evidence.append(
            Evidence(
                source=file,
                field=field,
                detail=f"{cls}: {what}",
                value=cls,
                strength="medium" if kind != "other" else "weak",
            )
        )
    processor_files = [name for name in _PROCESSOR_FILES if name in snapshot.listing]
    for name in processor_files:
        if not any(file == name for file, _, _, _ in processor_classes):
            evidence.append(
                Evidence(
                    source=name, detail="processor file present (image/audio preprocessing)", strength="weak"
                )
            )
    processor_kinds = {kind for _, _, _, kind in processor_classes if kind != "other"}
    facts = snapshot.facts
    pipeline = facts.pipeline_tag if facts else None
    if pipeline:
        kind = (
            "vision/multimodal"
            if pipeline in VISION_PIPELINES
            else "text"
            if pipeline in TEXT_PIPELINES
            else "other"
        )
        evidence.append(
            Evidence(source="hub", field="pipeline_tag", detail=f"{pipeline} ({kind})", strength="weak")
        )
    architectures = str_list(meta.config.get("architectures"), "config.json", "architectures")
    visionish_arch = [
        a for a in architectures if re.search(r"ConditionalGeneration|VL|Vision|Llava|Multimodal|Molmo", a)
    ]
    if visionish_arch:
        evidence.append(
            Evidence(
                source="config.json",
                field="architectures",
                detail=f"{visionish_arch[0]} (a vision-capable architecture name; not proof alone)",
                strength="weak",
            )
        )
    token_keys = [
        k
        for k in (
            "image_token_id",
            "image_token_index",
            "video_token_id",
            "audio_token_id",
            "audio_token_index",
        )
        if k in meta.config
    ]
    if token_keys:
        evidence.append(
            Evidence(
                source="config.json",
                field=", ".join(token_keys),
                detail="media token ids declared (text-only conversions keep these too)",
                strength="weak",
            )
        )
    tags = set(facts.tags) if facts else set()
    tag_hits = sorted(tags & _VISIONISH_TAGS)
    if tag_hits:
        evidence.append(
            Evidence(
                source="hub", field="tags", detail=f"multimodal tags: {', '.join(tag_hits)}", strength="weak"
            )
        )
    auto_map = meta.config.get("auto_map")
    if isinstance(auto_map, dict) and auto_map:
        evidence.append(
            Evidence(
                source="config.json",
                field="auto_map",
                detail="custom modelling code: "
                + ", ".join(f"{k} -> {v}" for k, v in list(auto_map.items())[:3] if isinstance(v, str)),
                strength="weak",
            )
        )

    # The modality decision. Strongest first: what the weights contain, then what the config describes,
    # then what the processor files prepare.
    tower_kinds = {kind for _, kind in towers}
    image = audio = False
    if tensor_names is not None and (vision_tensors or audio_tensors):
        vlm = True
        image, audio = (
            vision_tensors > 0 or "vision" in tower_kinds,
            audio_tensors > 0 or "audio" in tower_kinds,
        )
        reason = "the weights contain tower tensors"
    elif tensor_names is not None and (towers or processor_kinds):
        vlm = False
        reason = "the weights have no tower tensors (a text-only conversion)"
        if towers:
            against.append(
                f"config.json {towers[0][0]}: tower config present, but no tower tensors in the weights"
            )
    elif towers:
        vlm = True
        image, audio = "vision" in tower_kinds, "audio" in tower_kinds
        reason = "config.json has a tower sub-config" + (
            " (no weights index to confirm)" if tensor_names is None else ""
        )
    elif processor_kinds:
        vlm = True
        image, audio = "vision" in processor_kinds, "audio" in processor_kinds
        reason = "the processor files prepare " + " and ".join(sorted(processor_kinds)) + " input"
    else:
        vlm = False
        reason = "no tower in config.json" + (" or in the weights" if tensor_names is not None else "")
    if not vlm:
        if pipeline in VISION_PIPELINES:
            against.append(f"hub pipeline_tag {pipeline!r} suggests vision, but {reason}")
        if processor_classes or processor_files:
            named = [f"{cls} ({file})" for file, _, cls, _ in processor_classes] or processor_files
            against.append(f"processor files name {', '.join(named)}, but {reason}")
    elif pipeline in TEXT_PIPELINES:
        against.append(f"hub pipeline_tag {pipeline!r} suggests text only, but {reason}")

    # Loadability: what each library resolves the model type to, and whether it has a class for it.
    support = {backend: library_support(backend, meta.config) for backend in SUPPORTED_BACKENDS}
    for item in support.values():
        evidence.append(
            Evidence(source=item.library, field="models", detail=item.describe(), strength="decisive")
        )
        if item.custom_code:
            evidence.append(
                Evidence(
                    source="config.json",
                    field="model_file",
                    detail=f"{item.custom_code}: the checkpoint's own module (needs trust_remote_code)",
                    strength="weak",
                )
            )
    _nested_types(meta, evidence)
    model_type = optional_str(meta.config.get("model_type"), "config.json", "model_type")
    lm_ok, vlm_ok = support["mlx"].loadable, support["mlx-vlm"].loadable
    if lm_ok is False and vlm_ok is False:
        custom = (
            "; only the repo's own code (config.json auto_map) can build it, and trust_remote_code stays off"
            if isinstance(auto_map, dict) and auto_map
            else ""
        )
        modalities = [k for k, on in (("image", image), ("audio", audio)) if on]
        raise NoLoader(
            f"{_where(snapshot)}: no MLX library can load model_type {model_type!r} "
            f"({support['mlx'].describe()}; {support['mlx-vlm'].describe()}){custom}; "
            f"the evidence found {' and '.join(modalities) or 'text-only'} input ({reason})",
            model_type=model_type,
            support=support,
            modalities=modalities,
        )

    backend = "mlx-vlm" if vlm else "mlx"
    preferred, other = support[backend], support["mlx" if vlm else "mlx-vlm"]
    if preferred.loadable is False and other.loadable:
        against.append(f"the evidence points to {backend} ({reason}), but {preferred.describe()}")
        reason = f"{other.describe()} and {preferred.library} has none ({reason})"
        backend = other.backend
        if backend == "mlx":
            if image or audio:
                warnings.append(
                    f"{preferred.library} cannot load model_type {model_type!r}: importing it for mlx-lm, "
                    "text only (its towers are not used)"
                )
            image = audio = False
    elif preferred.loadable:
        reason += f"; {preferred.describe()}"
    video = (
        backend == "mlx-vlm"
        and image
        and (
            "video_token_id" in meta.config
            or "video_token_index" in meta.config
            or any("video" in field for _, field, _, _ in processor_classes)
        )
    )

    if requested is not None:
        evidence.insert(
            0, Evidence(source="cli", field="--backend", detail=f"{requested} requested explicitly")
        )
        chosen = support[requested]
        if chosen.loadable is False:
            raise UsageError(
                f"--backend {requested}: {chosen.describe()}; "
                + (f"use --backend {backend} or leave --backend out" if backend != requested else "")
            )
        if requested != backend:
            warnings.append(
                f"--backend {requested} overrides the evidence, which points to {backend} ({reason})"
            )
            against.append(f"evidence points to {backend}: {reason}")
        if unsupported:
            warnings.append(f"--backend {requested} given although {'; '.join(unsupported)}")
        backend = requested
        if backend == "mlx":
            image = audio = video = False
        elif not (image or audio):
            image = True  # the user says it is a VLM; assume the common case
    detail = f"{backend}: {reason}" if requested is None else f"{backend} (requested; evidence: {reason})"
    decision = Decision(value=detail, evidence=evidence, conflicts=against)
    if against and requested is None:
        warnings.extend(f"backend evidence disagrees: {item}" for item in against)
    return BackendDecision(
        backend="mlx-vlm" if backend == "mlx-vlm" else "mlx",
        image=image,
        audio=audio,
        video=video,
        decision=decision,
        warnings=warnings,
        support=support,
    )


def _nested_types(meta: RepoMetadata, evidence: list[Evidence]) -> None:
    """Record the language model's own type from text_config / llm_config (mlx-vlm reads llm_config as
    text_config; mlx-lm resolves the top-level type only)."""
    for key in ("text_config", "llm_config", "language_config"):
        node = meta.config.get(key)
        if isinstance(node, dict) and isinstance(node.get("model_type"), str):
            evidence.append(
                Evidence(
                    source="config.json",
                    field=f"{key}.model_type",
                    detail=f"the language model inside is {node['model_type']!r}",
                    strength="weak",
                )
            )
            return


def _where(snapshot: RepoSnapshot) -> str:
    return str(snapshot.repo_id or snapshot.source.local_path)
