"""What mlx-vlm's speculative loop accepts as a drafter for a target, read from its sources without importing MLX.

Shared by the importer (which pins a drafter), `gallery validate` and the loader (which refuse a pairing), so the
three cannot disagree. The rules are mlx-vlm's own:
- a drafter's model type fixes the round loop it needs (`DRAFTER_KIND_BY_MODEL_TYPE` in
  `mlx_vlm/speculative/drafters/__init__.py`; a type naming `mtp` needs `mtp`, anything else defaults to dflash);
- drafters that call `validate_dflash_target` (`drafters/compatibility.py`) need a target whose language model
  can roll back its speculative cache (`rollback_speculative_cache`), and the same hidden size, layer count and
  vocabulary as the drafter was trained on.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any

from gallery.families import _package_dir, _parse_file

DRAFTER_KINDS: tuple[str, ...] = ("dflash", "eagle3", "mtp")
DEFAULT_KIND = "dflash"  # mlx-vlm's DEFAULT_DRAFTER_KIND


def _drafters_dir() -> Path | None:
    root = _package_dir("mlx_vlm")
    return None if root is None else root / "speculative" / "drafters"


@functools.lru_cache(maxsize=1)
def kind_by_model_type() -> dict[str, str]:
    """mlx-vlm's DRAFTER_KIND_BY_MODEL_TYPE (empty when mlx-vlm is not installed)."""
    folder = _drafters_dir()
    if folder is None:
        return {}
    try:
        tree = _parse_file(folder / "__init__.py")
    except (OSError, SyntaxError, ValueError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "DRAFTER_KIND_BY_MODEL_TYPE" for t in node.targets
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
    return {}


def drafter_model_type(config: dict[str, Any]) -> str | None:
    """The drafter's model type as mlx_vlm.utils.get_model_type resolves a drafter's config.json."""
    raw = config.get("model_type") or config.get("speculators_model_type")
    if not isinstance(raw, str):
        return None
    model_type = raw.lower()
    architectures = config.get("architectures") or []
    dflash = config.get("dflash_config")
    if isinstance(architectures, list) and "DFlash2DraftModel" in architectures:
        return "dflash2"
    if isinstance(dflash, dict):
        markov = int(config.get("markov_rank") or dflash.get("markov_rank") or 0)
        return "dspark" if dflash.get("projector_type") == "dspark" or markov > 0 else f"{model_type}_dflash"
    return model_type


def expected_kind(model_type: str | None) -> str | None:
    """The round loop a drafter of this model type needs, or None when mlx-vlm does not say."""
    if not model_type:
        return None
    known = kind_by_model_type().get(model_type)
    if known:
        return known
    if "mtp" in model_type:
        return "mtp"
    # A DFlash drafter (a config with dflash_config, resolved to `<type>_dflash`) runs only dflash's round loop;
    # mlx-vlm leaves it to its default kind, and would start another loop on it if told to.
    return "dflash" if model_type.endswith("dflash") else None


@functools.lru_cache(maxsize=32)
def _calls_dflash_target_check(model_type: str) -> bool:
    """Whether the drafter module for model_type validates its target with compatibility.validate_dflash_target."""
    folder = _drafters_dir()
    module = None if folder is None else folder / model_type
    if module is None or not module.is_dir():
        return False
    return any("validate_dflash_target" in f.read_text(encoding="utf-8") for f in module.glob("*.py"))


@functools.lru_cache(maxsize=32)
def _target_can_roll_back(target_type: str) -> bool | None:
    """Whether mlx-vlm's model for target_type defines rollback_speculative_cache (None: no such model)."""
    root = _package_dir("mlx_vlm")
    folder = None if root is None else root / "models" / target_type
    if folder is None or not folder.is_dir():
        return None
    return any("def rollback_speculative_cache" in f.read_text(encoding="utf-8") for f in folder.glob("*.py"))


def pairing_problem(target_type: str | None, kind: str, drafter_type: str | None) -> str | None:
    """Why mlx-vlm would refuse this drafter for this target (one line), or None when it has no objection."""
    if kind not in DRAFTER_KINDS:
        return f"unknown drafter kind {kind!r} (mlx-vlm knows {', '.join(DRAFTER_KINDS)})"
    expected = expected_kind(drafter_type)
    if expected is not None and expected != kind:
        return (
            f"a {drafter_type} drafter needs kind {expected!r}, not {kind!r} "
            "(mlx_vlm.speculative.drafters.DRAFTER_KIND_BY_MODEL_TYPE)"
        )
    if (
        drafter_type
        and target_type
        and _calls_dflash_target_check(drafter_type)
        and _target_can_roll_back(target_type) is False
    ):
        return (
            f"a {drafter_type} drafter needs a target that can roll back its speculative cache, and mlx-vlm's "
            f"{target_type} has no rollback_speculative_cache (mlx_vlm.speculative.drafters.compatibility)"
        )
    return None


def _text(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def size_problem(
    target: dict[str, Any], drafter: dict[str, Any], drafter_type: str | None, kind: str
) -> str | None:
    """A hidden-size / layer-count / vocabulary mismatch between two config.json files, as mlx-vlm checks it
    (validate_drafter_compatibility for mtp, compatibility.validate_dflash_target for dflash drafters)."""
    text = _text(target)
    checks: list[tuple[str, Any]] = []
    if kind == "mtp":
        own = drafter.get("backbone_hidden_size") or drafter.get("target_hidden_size")
        checks.append(("hidden_size", own or _text(drafter).get("hidden_size")))
    elif drafter_type and drafter_type.endswith("dflash"):
        checks.append(("hidden_size", drafter.get("hidden_size")))
        dflash = drafter.get("dflash_config") or {}
        ids = dflash.get("target_layer_ids") or drafter.get("target_layer_ids") or []
        layers = dflash.get("num_target_layers") or drafter.get("num_target_layers")
        checks += [
            ("num_hidden_layers", layers or (max(ids) + 1 if ids else None)),
            ("vocab_size", drafter.get("vocab_size")),
        ]
    for name, value in checks:
        if value is not None and text.get(name) is not None and value != text.get(name):
            return f"the drafter was made for {name} {value}, the model has {text.get(name)}"
    return None
