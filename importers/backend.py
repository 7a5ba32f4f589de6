"""Decide the backend: `mlx-vlm` only when the checkpoint really has a vision or audio tower.

Evidence is weighed, not voted: the weights index (tensor names) is the strongest, because it says
what the checkpoint actually contains; then tower sub-configs in config.json (top-level or nested);
then processor files and the Hub's pipeline tag; architecture names and image-token ids are weak
(text-only conversions of vision models keep them). Repos of kinds the project cannot serve
(speech, embeddings, image generation, GGUF-only) are refused with what was found.
"""

from __future__ import annotations

import dataclasses
import re

from gallery.config import SUPPORTED_BACKENDS, Backend, Decision, Evidence
from gallery.errors import UnsupportedModel, UsageError
from gallery.families import library_knows
from importers.fetch import RepoSnapshot
from importers.metadata import TOWER_KEYS, RepoMetadata, optional_str, str_list

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
_GENERATIVE_ARCH = re.compile(r"(ForCausalLM|ForConditionalGeneration|LMHeadModel|ForMultimodalLM)$")
# Tensor-name markers of modality towers in a weights index.
_VISION_TENSOR = re.compile(
    r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|vit|image_encoder|multi_modal_projector|"
    r"mm_projector|embed_vision|vision_embed|img_processor|image_newline|patch_embed)(\.|$)"
)
_AUDIO_TENSOR = re.compile(
    r"(^|\.)(audio_tower|audio_model|audio_encoder|embed_audio|speech_encoder|audio_projector)(\.|$)"
)
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json")
_VISIONISH_TAGS = frozenset(
    {"vision", "multimodal", "image-text-to-text", "vlm", "any-to-any", "video-text-to-text"}
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


@dataclasses.dataclass
class BackendDecision:
    """The backend and which modalities the towers accept."""

    backend: Backend
    image: bool
    audio: bool
    video: bool
    decision: Decision
    warnings: list[str]


def _towers(meta: RepoMetadata) -> list[tuple[str, str]]:
    """(dotted path, kind) of every tower sub-config in config.json, nested ones included."""
    found: list[tuple[str, str]] = []
    for path, node in meta.sub_configs(include_towers=True):
        for key in TOWER_KEYS:
            value = node.get(key)
            if (isinstance(value, dict) and value) or (isinstance(value, str) and value):
                kind = "audio" if key in ("audio_config", "speech_config", "audio_encoder") else "vision"
                found.append((f"{path}.{key}" if path else key, kind))
    return found


def _weight_tensor_names(meta: RepoMetadata) -> list[str] | None:
    index = meta.json_object("model.safetensors.index.json")
    if index is None:
        return None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        return None
    return [str(name) for name in weight_map]


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
    """Weigh every source of evidence and pick `mlx` or `mlx-vlm`. Raises UnsupportedModel / UsageError."""
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
    image = audio = False
    for path, kind in towers:
        evidence.append(Evidence(source="config.json", field=path, detail=f"{kind} tower sub-config present"))
    vision_tensors = audio_tensors = 0
    if tensor_names is not None:
        vision_tensors = sum(1 for name in tensor_names if _VISION_TENSOR.search(name))
        audio_tensors = sum(1 for name in tensor_names if _AUDIO_TENSOR.search(name))
        detail = (
            f"{vision_tensors} vision and {audio_tensors} audio tower tensors among {len(tensor_names)}"
            if vision_tensors or audio_tensors
            else f"no tower tensors among {len(tensor_names)} tensors"
        )
        evidence.append(Evidence(source="model.safetensors.index.json", field="weight_map", detail=detail))
    processor_files = [name for name in _PROCESSOR_FILES if name in snapshot.listing]
    for name in processor_files:
        evidence.append(Evidence(source=name, detail="processor file present (image/audio preprocessing)"))
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
        evidence.append(Evidence(source="hub", field="pipeline_tag", detail=f"{pipeline} ({kind})"))
    architectures = str_list(meta.config.get("architectures"), "config.json", "architectures")
    visionish_arch = [
        a for a in architectures if re.search(r"ConditionalGeneration|VL|Vision|Llava|Multimodal", a)
    ]
    if visionish_arch:
        evidence.append(
            Evidence(
                source="config.json",
                field="architectures",
                detail=f"{visionish_arch[0]} (a vision-capable architecture name; not proof alone)",
            )
        )
    token_keys = [
        k
        for k in ("image_token_id", "image_token_index", "video_token_id", "audio_token_id")
        if k in meta.config
    ]
    if token_keys:
        evidence.append(
            Evidence(
                source="config.json",
                field=", ".join(token_keys),
                detail="media token ids declared (text-only conversions keep these too)",
            )
        )
    tags = set(facts.tags) if facts else set()
    tag_hits = sorted(tags & _VISIONISH_TAGS)
    if tag_hits:
        evidence.append(
            Evidence(source="hub", field="tags", detail=f"multimodal tags: {', '.join(tag_hits)}")
        )

    # The decision. Strongest first: what the weights contain, then what the config describes.
    tower_kinds = {kind for _, kind in towers}
    if tensor_names is not None and (vision_tensors or audio_tensors):
        vlm = True
        image, audio = (
            vision_tensors > 0 or "vision" in tower_kinds,
            audio_tensors > 0 or "audio" in tower_kinds,
        )
        reason = "the weights contain tower tensors"
    elif tensor_names is not None and towers:
        vlm = False
        reason = "config.json describes a tower but the weights have none (a text-only conversion)"
        against.append(
            f"config.json {towers[0][0]}: tower config present, but no tower tensors in the weights"
        )
    elif towers:
        vlm = True
        image, audio = "vision" in tower_kinds, "audio" in tower_kinds
        reason = "config.json has a tower sub-config" + (
            " (no weights index to confirm)" if tensor_names is None else ""
        )
    else:
        vlm = False
        reason = "no tower in config.json" + (" or in the weights" if tensor_names is not None else "")
    if not vlm:
        if pipeline in VISION_PIPELINES:
            against.append(f"hub pipeline_tag {pipeline!r} suggests vision, but {reason}")
        if processor_files:
            against.append(f"processor files ({', '.join(processor_files)}) present, but {reason}")
    elif pipeline in TEXT_PIPELINES:
        against.append(f"hub pipeline_tag {pipeline!r} suggests text only, but {reason}")
    video = vlm and image and ("video_token_id" in meta.config or "video_token_index" in meta.config)

    backend = "mlx-vlm" if vlm else "mlx"
    if requested is not None:
        evidence.insert(
            0, Evidence(source="cli", field="--backend", detail=f"{requested} requested explicitly")
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
    model_type = optional_str(meta.config.get("model_type"), "config.json", "model_type")
    if model_type:
        known = library_knows(backend, model_type)
        library = "mlx-lm" if backend == "mlx" else "mlx-vlm"
        if known is False:
            warnings.append(
                f"the installed {library} has no model class for model_type {model_type!r}: loading will fail"
            )
            evidence.append(Evidence(source=library, field="models", detail=f"no class for {model_type!r}"))
        elif known:
            evidence.append(
                Evidence(source=library, field="models", detail=f"{library} has a class for {model_type!r}")
            )
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
    )


def _where(snapshot: RepoSnapshot) -> str:
    return str(snapshot.repo_id or snapshot.source.local_path)
