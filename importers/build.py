"""Import a model: fetch the evidence, make every decision, and assemble the pinned ModelConfig."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Literal

from gallery.config import (
    Decision,
    Evidence,
    Media,
    MlxSection,
    ModelConfig,
    Source,
    TemplateSettings,
)
from gallery.errors import GalleryError, UsageError
from gallery.families import SHARED_TEXT_ROUTE, library_knows
from importers.backend import decide_backend
from importers.facts import (
    decide_activation_quantization,
    decide_context,
    decide_license,
    decide_quantization,
    decide_sampling,
    decide_speculative,
    model_vocab_size,
    repo_files,
)
from importers.fetch import FetchStats, RepoSnapshot, fetch
from importers.memory import decide_memory
from importers.metadata import RepoMetadata, optional_int, str_list, token_text
from importers.reasoning import decide_reasoning
from importers.remote_code import decide_remote_code
from importers.sharding import decide_sharding
from importers.source import ModelSource, parse_source
from importers.stops import decide_stops
from importers.template import decide_template
from importers.vocab import SpecialVocab


@dataclasses.dataclass
class ImportResult:
    """A finished import: the config, the warnings to show, what the fetch cost, and the expected metadata files
    it could not read (an offline import from a half-filled cache; `--strict` refuses those)."""

    config: ModelConfig
    warnings: list[str]
    stats: FetchStats
    origin: str
    missing: list[str] = dataclasses.field(default_factory=list)


def default_name(snapshot: RepoSnapshot) -> str:
    """A config name from the repo name (or folder name): lowercase, file-name safe."""
    base = (
        snapshot.repo_id.split("/", 1)[1] if snapshot.repo_id else Path(str(snapshot.source.local_path)).name
    )
    name = re.sub(r"[^a-z0-9._+-]+", "-", base.lower()).strip("-.") or "model"
    return name.replace("..", ".")


def _media_token(
    meta: RepoMetadata, vocab: SpecialVocab, id_keys: tuple[str, ...], text_key: str
) -> str | None:
    text = token_text(meta.tokenizer_config.get(text_key), "tokenizer_config.json", text_key)
    if text:
        return text
    for key in id_keys:
        token_id = optional_int(meta.config.get(key), "config.json", key)
        if token_id is not None:
            found = vocab.text_of(token_id)
            if found:
                return found[0]
    return None


def import_model(
    source: str | ModelSource,
    *,
    revision: str | None = None,
    backend: str | None = None,
    name: str | None = None,
    token: str | bool | None = None,
    cache_dir: Path | None = None,
    trust_remote_code: bool = False,
    drafter: bool = False,
) -> ImportResult:
    """Import SOURCE into a pinned ModelConfig. Raises GalleryError subclasses for every user-facing failure.

    `trust_remote_code` pins it on (only worth it when the import says the tokenizer or model needs it);
    A documented drafter (importers/drafters.yaml) is recorded as a suggestion; `drafter` reads it from the Hub and
    pins it when it verifies against the model."""
    model_source = source if isinstance(source, ModelSource) else parse_source(source, revision)
    snapshot = fetch(model_source, token=token, cache_dir=cache_dir)
    result = build_config(snapshot, backend=backend, name=name, trust_remote_code=trust_remote_code)
    if snapshot.origin != "local":
        from importers.drafters import pin_drafter, suggest_drafter

        raw = snapshot.files.get("config.json")
        target = json.loads(raw) if raw else {}
        result.config = (
            pin_drafter(
                result.config,
                target if isinstance(target, dict) else {},
                result.warnings,
                token=token,
                cache_dir=cache_dir,
            )
            if drafter
            else suggest_drafter(result.config)
        )
    return result


def build_config(
    snapshot: RepoSnapshot,
    *,
    backend: str | None = None,
    name: str | None = None,
    trust_remote_code: bool = False,
) -> ImportResult:
    """Make every decision from a fetched snapshot and assemble the config."""
    meta = RepoMetadata(snapshot)
    meta.json_object("config.json")  # parse config.json first: its errors are the first a user should see
    warnings: list[str] = list(snapshot.warnings)
    decisions: dict[str, Decision] = {}

    backend_decision = decide_backend(snapshot, meta, backend)
    warnings.extend(backend_decision.warnings)
    decisions["backend"] = backend_decision.decision
    vlm = backend_decision.backend == "mlx-vlm"

    vocab = SpecialVocab(meta)
    stops = decide_stops(meta, vocab)
    warnings.extend(stops.warnings)
    decisions["stop_tokens"] = stops.decision

    image_token = (
        _media_token(meta, vocab, ("image_token_id", "image_token_index"), "image_token") if vlm else None
    )
    template = decide_template(meta, vlm=vlm, image_token_text=image_token)
    warnings.extend(template.warnings)
    decisions["chat_template"] = template.decision

    reasoning = decide_reasoning(
        template.template.text, vocab, template.template.variables, card=snapshot.card_text
    )
    warnings.extend(reasoning.warnings)
    decisions["reasoning"] = reasoning.reasoning_decision
    decisions["tool_calls"] = reasoning.tool_decision

    context = decide_context(meta)
    decisions["context_size"] = context.decision
    quant = decide_quantization(meta)
    decisions["quantization"] = quant.decision
    activations = decide_activation_quantization(quant.value)
    if activations is not None:
        quant.value.activation_quantization = True
        decisions["activation_quantization"] = activations.decision
    model_ref = snapshot.repo_id or str(snapshot.source.local_path)
    sampling = decide_sampling(meta, model_ref)
    decisions["sampling"] = sampling.decision
    index = meta.json_object("model.safetensors.index.json")
    weight_map = index.get("weight_map") if index else None
    tensor_names = list(weight_map) if isinstance(weight_map, dict) else None
    speculative = decide_speculative(meta, tensor_names)
    decisions["speculative"] = speculative.decision
    license_fact = decide_license(snapshot)
    decisions["license"] = license_fact.decision

    model_type = meta.config.get("model_type") if isinstance(meta.config.get("model_type"), str) else None
    sharding = decide_sharding(meta, backend_decision.backend, model_type)
    decisions["sharding"] = sharding.decision
    text_route: Literal["shared-weights", "vlm"] | None = None
    if vlm:
        text_module = SHARED_TEXT_ROUTE.get(model_type or "")
        knows = library_knows("mlx", text_module) if text_module else None
        text_route = "shared-weights" if text_module and knows is not False else "vlm"
        decisions["text_route"] = Decision(
            value=text_route,
            evidence=[
                Evidence(
                    source="gallery.families",
                    field=model_type,
                    detail=f"mlx-lm text model {text_module!r} shares the VLM's language weights"
                    if text_route == "shared-weights"
                    else "no mlx-lm text model for this family: text-only requests run on the mlx-vlm path",
                )
            ],
        )

    remote = decide_remote_code(
        meta, backend_decision.support[backend_decision.backend], trusted=trust_remote_code
    )
    if remote.decision is not None:
        decisions["trust_remote_code"] = remote.decision
    warnings.extend(remote.warnings)
    if isinstance(meta.config.get("auto_map"), dict) and not remote.trusted:
        warnings.append(
            "the repo ships custom modelling code (config.json auto_map); trust_remote_code stays off"
        )

    files, total_size = repo_files(snapshot)
    memory, decisions["memory"] = decide_memory(meta, files, context.value)
    if snapshot.commit:
        decisions["revision"] = Decision(
            value=snapshot.commit,
            evidence=[
                Evidence(
                    source="hub" if snapshot.origin == "hub" else snapshot.origin,
                    field="sha",
                    detail=f"{snapshot.source.revision or 'main'} resolved to {snapshot.commit}",
                )
            ],
        )
    source = Source(
        repo=snapshot.repo_id,
        revision=snapshot.commit,
        requested_revision=snapshot.source.revision if snapshot.source.revision != snapshot.commit else None,
        local_path=str(snapshot.source.local_path) if snapshot.source.local_path else None,
    )
    media = Media(
        image=backend_decision.image,
        audio=backend_decision.audio,
        video=backend_decision.video,
        marker=template.media_marker,
        image_token=image_token,
        audio_token=_media_token(meta, vocab, ("audio_token_id", "audio_token_index"), "audio_token")
        if backend_decision.audio
        else None,
        video_token=_media_token(meta, vocab, ("video_token_id", "video_token_index"), "video_token")
        if backend_decision.video
        else None,
    )
    stopwords = [t.text for t in stops.tokens if t.text] + stops.unmapped_texts
    usecases = ["chat", "completion"] + (["vision"] if media.image else [])
    config_name = name or default_name(snapshot)
    try:
        config = ModelConfig(
            name=config_name,
            description=_description(snapshot, backend_decision.backend),
            license=license_fact.value,
            backend=backend_decision.backend,
            known_usecases=usecases,
            context_size=context.value,
            parameters=sampling.value,
            template=TemplateSettings(use_tokenizer_template=True),
            stopwords=list(dict.fromkeys(stopwords)),
            mlx=MlxSection(
                source=source,
                model_type=model_type,
                architectures=str_list(meta.config.get("architectures"), "config.json", "architectures"),
                vocab_size=model_vocab_size(meta),
                stop_tokens=stops.tokens,
                chat_template=template.template,
                reasoning=reasoning.reasoning,
                tool_calls=reasoning.tool_calls,
                media=media,
                quantization=quant.value,
                speculative=speculative.value,
                text_route=text_route,
                files=files,
                total_size=total_size,
                sharding=sharding.value,
                memory=memory,
                trust_remote_code=trust_remote_code,
                decisions=decisions,
                warnings=list(dict.fromkeys(warnings)),
            ),
        )
    except ValueError as exc:
        if "name" in str(exc) and name is not None:
            raise UsageError(f"--name {name!r}: letters, digits and . _ + - only") from None
        raise GalleryError(f"the import produced an invalid config: {exc}") from None
    return ImportResult(
        config=config,
        warnings=list(dict.fromkeys(warnings)),
        stats=snapshot.stats,
        origin=snapshot.origin,
        missing=list(snapshot.missing),
    )


def _description(snapshot: RepoSnapshot, backend: str) -> str:
    where = snapshot.repo_id or str(snapshot.source.local_path)
    at = f"@{snapshot.commit[:12]}" if snapshot.commit else ""
    tag = (
        f", Hub pipeline tag {snapshot.facts.pipeline_tag}"
        if snapshot.facts and snapshot.facts.pipeline_tag
        else ""
    )
    return f"{where}{at} for {backend}{tag}"
