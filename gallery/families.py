"""What the project knows about model families and the two MLX libraries, without importing MLX.

Shared by the importer (which records decisions) and the runtime (which acts on them), so the two
cannot disagree about, say, which VLM families have a zero-copy text route.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
from pathlib import Path

# VLM model_type -> the mlx_lm model module whose text model can share the VLM's language weights
# (built from the VLM's text config; the VLM's `language_model` arrays are loaded into it without a
# copy). Checked by hand per family: see ../shared/notes/mlx-facts.md.
SHARED_TEXT_ROUTE: dict[str, str] = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "qwen3_5": "qwen3_5",
}


@functools.lru_cache(maxsize=8)
def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=8)
def _remapping(package: str) -> dict[str, str]:
    """Read MODEL_REMAPPING from the library's utils.py by parsing it (importing would load MLX)."""
    root = _package_dir(package)
    if root is None:
        return {}
    try:
        tree = ast.parse((root / "utils.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "MODEL_REMAPPING" for target in node.targets
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
    return {}


def library_version(package: str) -> str | None:
    """The installed version of a distribution (mlx-lm, mlx-vlm), or None when not installed."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def library_knows(backend: str, model_type: str) -> bool | None:
    """Whether mlx-lm (backend `mlx`) or mlx-vlm (`mlx-vlm`) has a model class for model_type.

    None when the library is not installed. Checked on the installed files, without importing them.
    """
    package = "mlx_lm" if backend == "mlx" else "mlx_vlm"
    root = _package_dir(package)
    if root is None:
        return None
    name = _remapping(package).get(model_type, model_type).replace("-", "_")
    models = root / "models"
    return (models / f"{name}.py").is_file() or (models / name / "__init__.py").is_file()


@dataclasses.dataclass(frozen=True)
class ShardingMethods:
    """Which sharding methods mlx-lm's class for a model type defines, and the file that says so."""

    pipeline: bool
    tensor: bool
    source: str  # e.g. mlx_lm/models/qwen2.py


def sharding_methods(model_type: str) -> ShardingMethods | None:
    """What mlx-lm's module for model_type offers: `shard` on Model (tensor), `pipeline` or PipelineMixin (pipeline).

    Read from the installed source with ast (importing it would load MLX); None when mlx-lm is not installed
    or has no module for the type.
    """
    root = _package_dir("mlx_lm")
    if root is None:
        return None
    name = _remapping("mlx_lm").get(model_type, model_type).replace("-", "_")
    path = root / "models" / f"{name}.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    tensor = pipeline = False
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        methods = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
        bases = {base.id for base in node.bases if isinstance(base, ast.Name)}
        if node.name == "Model" and "shard" in methods:
            tensor = True
        if "PipelineMixin" in bases or "pipeline" in methods:
            pipeline = True
    return ShardingMethods(pipeline=pipeline, tensor=tensor, source=f"mlx_lm/models/{name}.py")
