"""The zero-copy text route for VLM configs: an mlx-lm text model that shares the VLM's language weights.

Text-only requests to a VLM are faster on mlx-lm's plain text model than on the mlx-vlm path. For the
families in gallery.families.SHARED_TEXT_ROUTE, the text model is built from the VLM's config and the
VLM's `language_model` arrays are loaded into it by reference: no weight is copied, so the route costs
almost no memory, and text-only logits equal the VLM's.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

from backends.mlx_lm_backend import MlxLmBackend
from gallery.families import SHARED_TEXT_ROUTE


class TextRouteUnavailable(RuntimeError):
    """The family has no shared-weight text model, or its parameters do not line up."""


def _quantized_layers(module: Any) -> dict[str, dict[str, Any]]:
    """Path -> quantization settings of every quantized layer in a module tree."""
    found: dict[str, dict[str, Any]] = {}
    for path, child in module.named_modules():
        if hasattr(child, "scales") and hasattr(child, "bits"):
            found[path] = {
                "group_size": child.group_size,
                "bits": child.bits,
                "mode": getattr(child, "mode", "affine"),
            }
    return found


def _candidate_targets(text_model: Any) -> list[tuple[str, Any]]:
    targets = [("", text_model)]
    for attr in ("language_model", "model"):
        child = getattr(text_model, attr, None)
        if child is not None and hasattr(child, "parameters"):
            targets.append((attr, child))
    return targets


def build_shared_text_backend(vlm_model: Any, config: dict[str, Any], model_path: Path) -> MlxLmBackend:
    """Build the text route for a loaded mlx-vlm model. Raises TextRouteUnavailable."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    model_type = str(config.get("model_type", ""))
    module_name = SHARED_TEXT_ROUTE.get(model_type)
    if module_name is None:
        raise TextRouteUnavailable(f"no shared-weight text model for model_type {model_type!r}")
    try:
        module = importlib.import_module(f"mlx_lm.models.{module_name}")
    except ImportError as exc:
        raise TextRouteUnavailable(f"mlx-lm has no {module_name} model ({exc})") from None
    source = getattr(vlm_model, "language_model", None)
    if source is None:
        raise TextRouteUnavailable("the VLM has no language_model to share")
    # Text-only classes (gemma3_text, gemma4_text) take the text sub-config; wrappers take the whole config.
    wants_text_config = module_name.endswith("_text") and isinstance(config.get("text_config"), dict)
    args_dict = {**config["text_config"], "model_type": module_name} if wants_text_config else config
    args_dict = copy.deepcopy(args_dict)  # mlx-lm's ModelArgs may edit nested dicts in place
    text_model = module.Model(module.ModelArgs.from_dict(args_dict))
    src_params: list[tuple[str, Any]] = tree_flatten(source.parameters())  # type: ignore[assignment]
    src_names = {name for name, _ in src_params}
    quantized = _quantized_layers(source)
    for _, target in _candidate_targets(text_model):
        if quantized:
            # Quantize the (never evaluated) skeleton layer by layer exactly like the source.
            def predicate(path: str, layer: Any, settings: dict[str, dict[str, Any]] = quantized) -> Any:
                return settings.get(path, False)

            try:
                nn.quantize(target, class_predicate=predicate)
            except (TypeError, ValueError):
                continue
        flat: list[tuple[str, Any]] = tree_flatten(target.parameters())  # type: ignore[assignment]
        names = {name for name, _ in flat}
        if names == src_names:
            target.load_weights(src_params, strict=True)
            tokenizer = load_tokenizer(model_path)
            return MlxLmBackend(text_model, tokenizer)
    raise TextRouteUnavailable(
        f"the parameters of mlx_lm.models.{module_name} do not line up with the VLM's language model"
    )


def shares_weights(text_backend: MlxLmBackend, vlm_model: Any) -> bool:
    """Whether every array of the text route is the very same object as the VLM's (no copy)."""
    from mlx.utils import tree_flatten

    vlm_flat: list[tuple[str, Any]] = tree_flatten(vlm_model.language_model.parameters())  # type: ignore[assignment]
    text_flat: list[tuple[str, Any]] = tree_flatten(text_backend.model.parameters())  # type: ignore[assignment]
    vlm_ids = {id(array) for _, array in vlm_flat}
    text_arrays = [array for _, array in text_flat]
    return bool(text_arrays) and all(id(array) in vlm_ids for array in text_arrays)
