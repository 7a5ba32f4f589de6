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

from gallery.config import SUPPORTED_BACKENDS, Backend, Decision, Evidence
from gallery.errors import UnsupportedModel, UsageError
from gallery.families import LibrarySupport, library_support
from importers.fetch import RepoSnapshot
from importers.metadata import RepoMetadata, optional_str, str_list
from importers.pipelines import (
    _NON_CHAT_ARCH,
    TEXT_PIPELINES,
    UNSUPPORTED_LIBRARIES,
    UNSUPPORTED_MODEL_TYPES,
    UNSUPPORTED_PIPELINES,
    VISION_PIPELINES,
)
from importers.towers import (
    _AUDIO_TENSOR,
    _MEDIA_TOKEN_KEYS,
    _PROCESSOR_FILES,
    _VISION_TENSOR,
    _VISIONISH_TAGS,
    _WEIGHT_SUFFIXES,
    find_processor_classes,
    find_towers,
    tensor_prefixes,
    weight_tensor_names,
)


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


def _unsupported_reasons(snapshot: RepoSnapshot, meta: RepoMetadata) -> list[str]:
    """Why the repo is no chat model: Hub facts (pipeline tag, library, tags) and config.json alone
    (model type, architectures), so a repo stripped of its tags and README is still recognised."""
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
    kinds = {arch: non_chat_architecture(arch) for arch in architectures}
    odd = [arch for arch, kind in kinds.items() if kind is not None]
    if architectures and len(odd) == len(architectures):
        what = ", ".join(dict.fromkeys(str(kinds[arch]) for arch in odd))
        reasons.append(f"config.json architectures {odd} ({what}; not a text generator)")
    return reasons


def non_chat_architecture(arch: str) -> str | None:
    """What a non-generative architecture class is (\"image segmentation\", \"embeddings\" …), else None."""
    for pattern, what in _NON_CHAT_ARCH:
        if pattern.search(arch):
            return what
    return None


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


@dataclasses.dataclass
class _Modality:
    """What the checkpoint's files say about towers, gathered once for the decision phases."""

    towers: list[tuple[str, str]]
    tensor_names: list[str] | None
    vision_tensors: int
    audio_tensors: int
    processor_classes: list[tuple[str, str, str, str]]
    processor_files: list[str]
    pipeline: str | None
    evidence: list[Evidence]
    against: list[str] = dataclasses.field(default_factory=list)

    @property
    def processor_kinds(self) -> set[str]:
        """The modalities the processor files name (vision, audio)."""
        return {kind for _, _, _, kind in self.processor_classes if kind != "other"}


@dataclasses.dataclass
class _Choice:
    """A backend choice in progress: the backend, the modalities, and the reason shown to the user."""

    backend: str
    image: bool
    audio: bool
    reason: str
    video: bool = False


def decide_backend(
    snapshot: RepoSnapshot, meta: RepoMetadata, requested: str | None = None
) -> BackendDecision:
    """Weigh every source of evidence and pick `mlx` or `mlx-vlm`. Raises UnsupportedModel / UsageError.

    The modality evidence (weights, config, processor files, Hub facts) says which backend the checkpoint
    needs; what the installed libraries can load is decisive: a backend without a class for the model
    type is never chosen when the other has one, and when neither has one the import fails (NoLoader).
    """
    unsupported = _refuse_unservable(snapshot, meta, requested)
    seen = _gather_evidence(snapshot, meta)
    choice = _decide_modality(seen)
    warnings: list[str] = []
    support = _check_loadability(snapshot, meta, seen, choice, warnings)
    if requested is not None:
        _apply_requested(requested, unsupported, support, seen, choice, warnings)
    detail = (
        f"{choice.backend}: {choice.reason}"
        if requested is None
        else f"{choice.backend} (requested; evidence: {choice.reason})"
    )
    decision = Decision(value=detail, evidence=seen.evidence, conflicts=seen.against)
    if seen.against and requested is None:
        warnings.extend(f"backend evidence disagrees: {item}" for item in seen.against)
    return BackendDecision(
        backend="mlx-vlm" if choice.backend == "mlx-vlm" else "mlx",
        image=choice.image,
        audio=choice.audio,
        video=choice.video,
        decision=decision,
        warnings=warnings,
        support=support,
    )


def _refuse_unservable(snapshot: RepoSnapshot, meta: RepoMetadata, requested: str | None) -> list[str]:
    """Phase 1: refuse a bad --backend, formats no backend reads, and non-chat models (unless --backend).
    Returns the non-chat reasons an explicit --backend overrode."""
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
    if unsupported and requested is None:
        raise UnsupportedModel(
            f"{_where(snapshot)} is not a chat/text-generation model this project can serve: {'; '.join(unsupported)}"
            " (pass --backend to import it anyway)"
        )
    return unsupported


def _gather_evidence(snapshot: RepoSnapshot, meta: RepoMetadata) -> _Modality:
    """Phase 2: every modality clue, strong (weights, tower configs, processor classes) and weak (tags…)."""
    towers = find_towers(meta)
    tensor_names = weight_tensor_names(meta)
    evidence = [
        Evidence(
            source="config.json", field=path, detail=f"{kind} tower sub-config present", strength="medium"
        )
        for path, kind in towers
    ]
    vision_prefixes = tensor_prefixes(tensor_names or [], _VISION_TENSOR)
    audio_prefixes = tensor_prefixes(tensor_names or [], _AUDIO_TENSOR)
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
    classes = find_processor_classes(meta, snapshot.listing)
    processor_files = [name for name in _PROCESSOR_FILES if name in snapshot.listing]
    evidence += _processor_evidence(classes, processor_files)
    facts = snapshot.facts
    pipeline = facts.pipeline_tag if facts else None
    evidence += _weak_evidence(meta, pipeline, set(facts.tags) if facts else set())
    return _Modality(
        towers=towers,
        tensor_names=tensor_names,
        vision_tensors=vision_tensors,
        audio_tensors=audio_tensors,
        processor_classes=classes,
        processor_files=processor_files,
        pipeline=pipeline,
        evidence=evidence,
    )


def _processor_evidence(
    processor_classes: list[tuple[str, str, str, str]], processor_files: list[str]
) -> list[Evidence]:
    """Evidence rows for the processor classes named, and for processor files that name none."""
    evidence: list[Evidence] = []
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
    for name in processor_files:
        if not any(file == name for file, _, _, _ in processor_classes):
            evidence.append(
                Evidence(
                    source=name, detail="processor file present (image/audio preprocessing)", strength="weak"
                )
            )
    return evidence


def _weak_evidence(meta: RepoMetadata, pipeline: str | None, tags: set[str]) -> list[Evidence]:
    """Clues that text-only conversions keep too: pipeline tag, architecture names, media token ids, tags,
    custom code."""
    evidence: list[Evidence] = []
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
    token_keys = [k for k in _MEDIA_TOKEN_KEYS if k in meta.config]
    if token_keys:
        evidence.append(
            Evidence(
                source="config.json",
                field=", ".join(token_keys),
                detail="media token ids declared (text-only conversions keep these too)",
                strength="weak",
            )
        )
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
    return evidence


def _decide_modality(seen: _Modality) -> _Choice:
    """Phase 3: the modality decision. Strongest first: what the weights contain, then what the config
    describes, then what the processor files prepare."""
    towers, tensor_names = seen.towers, seen.tensor_names
    tower_kinds = {kind for _, kind in towers}
    processor_kinds = seen.processor_kinds
    if tensor_names is not None and (seen.vision_tensors or seen.audio_tensors):
        choice = _Choice(
            "mlx-vlm",
            seen.vision_tensors > 0 or "vision" in tower_kinds,
            seen.audio_tensors > 0 or "audio" in tower_kinds,
            "the weights contain tower tensors",
        )
    elif tensor_names is not None and (towers or processor_kinds):
        choice = _Choice("mlx", False, False, "the weights have no tower tensors (a text-only conversion)")
        if towers:
            seen.against.append(
                f"config.json {towers[0][0]}: tower config present, but no tower tensors in the weights"
            )
    elif towers:
        reason = "config.json has a tower sub-config" + (
            " (no weights index to confirm)" if tensor_names is None else ""
        )
        choice = _Choice("mlx-vlm", "vision" in tower_kinds, "audio" in tower_kinds, reason)
    elif processor_kinds:
        reason = "the processor files prepare " + " and ".join(sorted(processor_kinds)) + " input"
        choice = _Choice("mlx-vlm", "vision" in processor_kinds, "audio" in processor_kinds, reason)
    else:
        reason = "no tower in config.json" + (" or in the weights" if tensor_names is not None else "")
        choice = _Choice("mlx", False, False, reason)
    pipeline = seen.pipeline
    if choice.backend == "mlx":
        if pipeline in VISION_PIPELINES:
            seen.against.append(f"hub pipeline_tag {pipeline!r} suggests vision, but {choice.reason}")
        if seen.processor_classes or seen.processor_files:
            named = [f"{cls} ({file})" for file, _, cls, _ in seen.processor_classes] or seen.processor_files
            seen.against.append(f"processor files name {', '.join(named)}, but {choice.reason}")
    elif pipeline in TEXT_PIPELINES:
        seen.against.append(f"hub pipeline_tag {pipeline!r} suggests text only, but {choice.reason}")
    return choice


def _check_loadability(
    snapshot: RepoSnapshot, meta: RepoMetadata, seen: _Modality, choice: _Choice, warnings: list[str]
) -> dict[str, LibrarySupport]:
    """Phase 4: what each library resolves the model type to, and whether it has a class for it. Switches
    to the other backend when only it can load the model; raises NoLoader when neither can."""
    support = {backend: library_support(backend, meta.config) for backend in SUPPORTED_BACKENDS}
    for item in support.values():
        seen.evidence.append(
            Evidence(source=item.library, field="models", detail=item.describe(), strength="decisive")
        )
        if item.custom_code:
            seen.evidence.append(
                Evidence(
                    source="config.json",
                    field="model_file",
                    detail=f"{item.custom_code}: the checkpoint's own module (needs trust_remote_code)",
                    strength="weak",
                )
            )
    _nested_types(meta, seen.evidence)
    model_type = optional_str(meta.config.get("model_type"), "config.json", "model_type")
    if support["mlx"].loadable is False and support["mlx-vlm"].loadable is False:
        auto_map = meta.config.get("auto_map")
        custom = (
            "; only the repo's own code (config.json auto_map) can build it, and trust_remote_code stays off"
            if isinstance(auto_map, dict) and auto_map
            else ""
        )
        modalities = [k for k, on in (("image", choice.image), ("audio", choice.audio)) if on]
        raise NoLoader(
            f"{_where(snapshot)}: no MLX library can load model_type {model_type!r} "
            f"({support['mlx'].describe()}; {support['mlx-vlm'].describe()}){custom}; "
            f"the evidence found {' and '.join(modalities) or 'text-only'} input ({choice.reason})",
            model_type=model_type,
            support=support,
            modalities=modalities,
        )
    vlm = choice.backend == "mlx-vlm"
    preferred, other = support[choice.backend], support["mlx" if vlm else "mlx-vlm"]
    if preferred.loadable is False and other.loadable:
        seen.against.append(
            f"the evidence points to {choice.backend} ({choice.reason}), but {preferred.describe()}"
        )
        choice.reason = f"{other.describe()} and {preferred.library} has none ({choice.reason})"
        choice.backend = other.backend
        if choice.backend == "mlx":
            if choice.image or choice.audio:
                warnings.append(
                    f"{preferred.library} cannot load model_type {model_type!r}: importing it for mlx-lm, "
                    "text only (its towers are not used)"
                )
            choice.image = choice.audio = False
    elif preferred.loadable:
        choice.reason += f"; {preferred.describe()}"
    choice.video = (
        choice.backend == "mlx-vlm"
        and choice.image
        and (
            "video_token_id" in meta.config
            or "video_token_index" in meta.config
            or any("video" in field for _, field, _, _ in seen.processor_classes)
        )
    )
    return support


def _apply_requested(
    requested: str,
    unsupported: list[str],
    support: dict[str, LibrarySupport],
    seen: _Modality,
    choice: _Choice,
    warnings: list[str],
) -> None:
    """Phase 5: an explicit --backend wins over the evidence, if that library can load the model."""
    seen.evidence.insert(
        0, Evidence(source="cli", field="--backend", detail=f"{requested} requested explicitly")
    )
    chosen = support[requested]
    if chosen.loadable is False:
        raise UsageError(
            f"--backend {requested}: {chosen.describe()}; "
            + (
                f"use --backend {choice.backend} or leave --backend out"
                if choice.backend != requested
                else ""
            )
        )
    if requested != choice.backend:
        warnings.append(
            f"--backend {requested} overrides the evidence, which points to {choice.backend} ({choice.reason})"
        )
        seen.against.append(f"evidence points to {choice.backend}: {choice.reason}")
    if unsupported:
        warnings.append(f"--backend {requested} given although {'; '.join(unsupported)}")
    choice.backend = requested
    if requested == "mlx":
        choice.image = choice.audio = choice.video = False
    elif not (choice.image or choice.audio):
        choice.image = True  # the user says it is a VLM; assume the common case


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
