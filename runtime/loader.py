"""Find a config's weights and load exactly one backend for it.

A text (`mlx`) config imports mlx_lm only; an `mlx-vlm` config imports mlx_vlm, plus mlx_lm for the
shared-weight text route. Weights come from a local folder, the Hugging Face cache at the pinned
revision, or — only when allowed — a download at that revision. (Which config a spec names is
catalog.resolve's job.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gallery.chat_template import template_sha256
from gallery.config import ModelConfig
from gallery.errors import BadConfig, GalleryError, RuntimeFailure, StrictFailure
from gallery.sharding import vlm_refusal

if TYPE_CHECKING:
    from backends.mlx_lm_backend import Shard

# Files the runtime needs from a repo (never anything else: no GGUF, no PyTorch .bin duplicates).
RUNTIME_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]


@dataclasses.dataclass
class LoadedModel:
    """A loaded config: the primary backend, the optional text route, and what to tell the user."""

    config: ModelConfig
    model_path: Path
    primary: Any
    text_route: Any | None
    warnings: list[str]
    activation_quantization: dict[str, Any] | None = None  # pinned / applied / why (status)


def _cached_snapshot(
    repo: str, revision: str | None, *, allow_download: bool, pinned_weights: int = 0
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from gallery.hub import cache_dir, endpoint, hub_errors, is_offline

    # The cache as install wrote it (HF_HUB_CACHE / HF_HOME as set now, not when huggingface_hub was imported).
    cache = str(cache_dir())
    try:
        cached = Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=RUNTIME_PATTERNS,
                local_files_only=True,
                cache_dir=cache,
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        cached = None
    # An import caches the small metadata files at the same commit, so the snapshot folder exists
    # without any weights; that is "not installed", not a model to hand to mlx-lm.
    if cached is not None and _has_weights(cached):
        return cached
    if not allow_download or is_offline():
        raise RuntimeFailure(
            f"the weights of {repo}@{revision or 'main'} are not in the local cache; run "
            "`gallery pull NAME` (or `gallery install NAME`) for a catalog entry, or allow downloads (`--allow-download`, or the "
            "load option `allow_download:true`)" + (" and unset HF_HUB_OFFLINE" if is_offline() else "")
        )
    with hub_errors(
        repo_id=repo, revision=revision, what=f"the weights of {repo}@{(revision or 'main')[:12]}"
    ):
        folder = Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=RUNTIME_PATTERNS, endpoint=endpoint(), cache_dir=cache
            )
        )
    if not _has_weights(folder):
        if pinned_weights:  # the config lists weights, so none arriving means the download never happened
            raise RuntimeFailure(
                f"the weights of {repo}@{revision or 'main'} could not be downloaded ({pinned_weights} "
                f".safetensors file(s) pinned, none in the cache): is {endpoint()} reachable?"
            )
        raise RuntimeFailure(
            f"{repo}@{(revision or 'main')[:12]} has no .safetensors weights (not an MLX conversion?)"
        )
    return folder


def _has_weights(folder: Path) -> bool:
    """Whether a snapshot folder holds safetensors weights (top level or one folder down)."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("*/*.safetensors"))


def model_folder(config: ModelConfig, base: Path | None, *, allow_download: bool) -> Path:
    """Where the weights are: the config's local folder, `parameters.model` as a folder, or the HF cache."""
    candidates = []
    if config.mlx.source.local_path:
        candidates.append(Path(config.mlx.source.local_path).expanduser())
    model_ref = Path(config.parameters.model).expanduser()
    candidates.append(model_ref if model_ref.is_absolute() or base is None else base / model_ref)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    if config.mlx.source.repo:
        return _cached_snapshot(
            config.mlx.source.repo,
            config.mlx.source.revision,
            allow_download=allow_download,
            pinned_weights=sum(1 for f in config.mlx.files if f.path.endswith(".safetensors")),
        )
    raise RuntimeFailure(f"{config.name}: model folder {candidates[0]} has no config.json")


def drafter_folder(config: ModelConfig, base: Path | None, *, allow_download: bool) -> Path | None:
    """Where the pinned drafter's files are (its local folder, or its pinned commit in the HF cache), or None.

    The pairing is checked first against mlx-vlm's own rules (gallery.drafters), so a drafter mlx-vlm would
    refuse fails here by name, before any weights are read.
    """
    from gallery.drafters import drafter_model_type, pairing_problem

    drafter = config.mlx.drafter
    if drafter is None:
        return None
    problem = pairing_problem(config.mlx.model_type, drafter.kind, drafter.model_type)
    if problem:
        raise BadConfig(f"{config.name}: mlx.drafter: {problem}")
    if drafter.local_path:
        path = Path(drafter.local_path).expanduser()
        folder = path if path.is_absolute() or base is None else base / path
    else:
        assert drafter.repo is not None
        try:
            folder = _cached_snapshot(
                drafter.repo,
                drafter.revision,
                allow_download=allow_download,
                pinned_weights=sum(1 for f in drafter.files if f.path.endswith(".safetensors")),
            )
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"{config.name}: the drafter: {exc}") from None
    # The files decide, not the pin's description of them: check the drafter's own config.json too.
    try:
        actual = drafter_model_type(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError) as exc:
        raise RuntimeFailure(
            f"{config.name}: the drafter in {folder} has no readable config.json ({exc})"
        ) from None
    problem = pairing_problem(config.mlx.model_type, drafter.kind, actual)
    if problem:
        raise BadConfig(f"{config.name}: mlx.drafter: {problem}")
    return folder


def check_template_pin(config: ModelConfig) -> list[str]:
    """Warnings about the chat template; raises when the pinned text does not match its sha256."""
    template = config.mlx.chat_template
    if template.status == "pinned":
        assert template.text is not None
        if template.sha256 and template_sha256(template.text) != template.sha256:
            raise BadConfig(
                f"{config.name}: the pinned chat template does not match its sha256 (edited by hand?)"
            )
        return []
    why = (
        "none was found in any home"
        if template.status == "missing"
        else f"the one in {template.source} is unusable"
    )
    return [f"{config.name} HAS NO CHAT TEMPLATE ({why}): chat requests are refused; raw prompts still work"]


def activation_quantization(config: ModelConfig) -> dict[str, Any] | None:
    """Whether the pinned activation quantization (mxfp8/nvfp4) applies here: on CUDA, and nowhere else.

    None when the config does not pin it. MLX's quantized-activation matmuls (QQLinear) are for NVIDIA GPUs;
    elsewhere the weights run as plain quantized layers, and status says so.
    """
    quant = config.mlx.quantization
    if quant is None or not quant.activation_quantization:
        return None
    from backends import device_info

    device = device_info()
    applied = device["backend"] == "cuda"
    why = (
        f"{quant.mode} weights on CUDA: activations quantized (QQLinear)"
        if applied
        else f"not applied: this device is {device['backend']} ({device['kind']}); MLX quantizes activations "
        f"of {quant.mode} layers on CUDA only"
    )
    return {
        "pinned": True,
        "applied": applied,
        "mode": quant.mode,
        "device": device["backend"],
        "detail": why,
    }


def load(
    config: ModelConfig,
    *,
    base: Path | None = None,
    model_path: Path | None = None,
    allow_download: bool = False,
    strict: bool = False,
    shard: Shard | None = None,
) -> LoadedModel:
    """Load the config's backend (must run on the thread that will own the MLX state).

    With `shard` (a distributed run), only this rank's part of a text model's weights is read.
    """
    warnings = check_template_pin(config)
    if warnings and strict:
        raise StrictFailure(f"--strict: {config.name} has no usable chat template")
    if not config.mlx.stop_tokens:
        warnings.append(
            f"{config.name} pins no stop tokens: answers run to max_tokens unless a stop string matches"
        )
    folder = model_path or model_folder(config, base, allow_download=allow_download)
    activations = activation_quantization(config)
    quantize_activations = bool(activations and activations["applied"])
    trust = bool(config.mlx.trust_remote_code)
    speculative = config.mlx.speculative
    draft_path = Path(speculative.draft_model).expanduser() if speculative.draft_model else None
    if draft_path is not None and not draft_path.is_absolute() and base is not None:
        draft_path = base / draft_path
    try:
        if config.backend == "mlx":
            from backends.mlx_lm_backend import MlxLmBackend

            primary: Any = MlxLmBackend.load(
                folder,
                draft_path=draft_path,
                trust_remote_code=trust,
                shard=shard,
                quantize_activations=quantize_activations,
            )
            return LoadedModel(config, folder, primary, None, warnings, activations)
        if shard is not None:
            raise RuntimeFailure(vlm_refusal(config))
        from backends.mlx_vlm_backend import MlxVlmBackend

        draft_kind = speculative.draft_kind or ("mtp" if speculative.mtp else None)
        pinned = drafter_folder(config, base, allow_download=allow_download)
        if pinned is not None:  # a separate, pinned drafter wins over bundled MTP layers
            draft_path, draft_kind = pinned, config.mlx.drafter.kind if config.mlx.drafter else None
        elif speculative.mtp and draft_path is None:
            draft_path = folder  # bundled multi-token-prediction layers: mlx-vlm splits them into a drafter
        primary = MlxVlmBackend.load(
            folder,
            trust_remote_code=trust,
            draft_path=draft_path,
            draft_kind=draft_kind,
            quantize_activations=quantize_activations,
            strict_kind=pinned is not None,
        )
        text_route = None
        if config.mlx.text_route == "shared-weights":
            from backends.text_route import TextRouteUnavailable, build_shared_text_backend

            try:
                raw_config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
                text_route = build_shared_text_backend(primary.model, raw_config, folder)
            except TextRouteUnavailable as exc:
                warnings.append(f"text route unavailable ({exc}): text-only requests use the mlx-vlm path")
        return LoadedModel(config, folder, primary, text_route, warnings, activations)
    except GalleryError:
        raise
    except Exception as exc:
        raise RuntimeFailure(
            f"could not load {config.name} from {folder} with {config.backend}: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from None
