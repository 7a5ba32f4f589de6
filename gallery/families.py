"""What the project knows about model families and the two MLX libraries, without importing MLX.

Shared by the importer (which records decisions) and the runtime (which acts on them), so the two
cannot disagree about, say, which VLM families have a zero-copy text route.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import threading
from pathlib import Path
from typing import Any

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


# ast.parse is not thread-safe on CPython 3.11 (the ast module keeps its recursion counter in shared state, see
# python/cpython#106905): two threads parsing at once can fail with "SystemError: AST constructor recursion
# depth mismatch" (seen with `gallery refresh`, which imports entries on several threads). Parses take turns.
_PARSE_LOCK = threading.Lock()


def _parse_file(path: Path) -> ast.Module:
    """Parse a Python source file (one parse at a time, see _PARSE_LOCK). Raises OSError, SyntaxError, ValueError."""
    text = path.read_text(encoding="utf-8")
    with _PARSE_LOCK:
        return ast.parse(text)


@functools.lru_cache(maxsize=8)
def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=16)
def _module_dict(package: str, name: str) -> dict[Any, str]:
    """A literal dict assigned at the top of the library's utils.py (MODEL_REMAPPING, …), read by parsing
    the file: importing it would load MLX, and the importer must work without MLX."""
    root = _package_dir(package)
    if root is None:
        return {}
    try:
        tree = _parse_file(root / "utils.py")
    except (OSError, SyntaxError, ValueError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == name for target in node.targets
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {k: str(v) for k, v in value.items()} if isinstance(value, dict) else {}
    return {}


def library_version(package: str) -> str | None:
    """The installed version of a distribution (mlx-lm, mlx-vlm), or None when not installed."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


LIBRARIES: dict[str, tuple[str, str]] = {"mlx": ("mlx-lm", "mlx_lm"), "mlx-vlm": ("mlx-vlm", "mlx_vlm")}


@dataclasses.dataclass(frozen=True)
class LibrarySupport:
    """Whether one library can build the model of a config.json, resolved the way that library does it.

    `loadable` is None when the library is not installed (nothing was checked), True when it has a module
    for the resolved model type (`module`, `path`), False when it has none.
    """

    backend: str
    library: str
    version: str | None
    declared_type: str | None
    resolved_type: str | None
    module: str | None
    path: str | None
    custom_code: str | None = None  # config.json model_file: the checkpoint's own module (trust_remote_code)

    @property
    def loadable(self) -> bool | None:
        """True / False as above; None when the library is not installed."""
        if self.version is None:
            return None
        return self.module is not None

    def describe(self) -> str:
        """One line for the evidence table."""
        name = f"{self.library} {self.version}" if self.version else self.library
        if self.version is None:
            return f"{self.library} is not installed: support for {self.declared_type!r} not checked"
        if self.declared_type is None:
            return f"{name}: config.json has no model_type, so it cannot pick a class"
        resolved = (
            f"{self.declared_type!r} (resolved as {self.resolved_type!r})"
            if self.resolved_type != self.declared_type
            else repr(self.declared_type)
        )
        if self.module:
            return f"{name} has a class for {resolved}: {self.module}"
        return f"{name} has no class for {resolved}"


def _mlx_lm_type(config: dict[str, Any]) -> str | None:
    """mlx_lm.utils._get_classes: an (model_type, architecture) remap first, else MODEL_REMAPPING."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    by_arch = _module_dict("mlx_lm", "MODEL_ARCHITECTURE_REMAPPING")
    for architecture in architectures if isinstance(architectures, (list, tuple)) else ():
        remapped = by_arch.get((model_type, architecture))
        if remapped is not None:
            return remapped
    return _module_dict("mlx_lm", "MODEL_REMAPPING").get(model_type, model_type)


def _mlx_vlm_type(config: dict[str, Any]) -> str | None:
    """mlx_vlm.utils.get_model_type: model_type (or speculators_model_type), lower-cased, remapped."""
    raw = config.get("model_type") or config.get("speculators_model_type")
    if not isinstance(raw, str):
        return None
    model_type = raw.lower()
    return _module_dict("mlx_vlm", "MODEL_REMAPPING").get(model_type, model_type)


def _find_module(root: Path, package: str, subpackages: tuple[str, ...], name: str) -> tuple[str, str] | None:
    """(dotted module, file) of `package.<subpackage>.<name>` when that file exists."""
    for sub in subpackages:
        folder = root.joinpath(*sub.split("."))
        for candidate in (folder / f"{name}.py", folder / name / "__init__.py"):
            if candidate.is_file():
                return f"{package}.{sub}.{name}", str(candidate)
    return None


def library_support(backend: str, config: dict[str, Any]) -> LibrarySupport:
    """Resolve config.json's model type as mlx-lm (`mlx`) or mlx-vlm (`mlx-vlm`) will, and find its module.

    Checked on the installed files without importing them (importing a model module loads MLX).
    """
    library, package = LIBRARIES[backend]
    declared = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    root = _package_dir(package)
    version = library_version(library) if root is not None else None
    resolved = _mlx_lm_type(config) if backend == "mlx" else _mlx_vlm_type(config)
    model_file = config.get("model_file") if isinstance(config.get("model_file"), str) else None
    found = None
    if root is not None and resolved:
        subpackages = ("models",) if backend == "mlx" else ("models", "speculative.drafters")
        found = _find_module(root, package, subpackages, resolved)
    return LibrarySupport(
        backend=backend,
        library=library,
        version=version,
        declared_type=declared,
        resolved_type=resolved,
        module=found[0] if found else None,
        path=found[1] if found else None,
        custom_code=model_file,
    )


def library_knows(backend: str, model_type: str) -> bool | None:
    """Whether mlx-lm (backend `mlx`) or mlx-vlm (`mlx-vlm`) has a model class for model_type.

    None when the library is not installed. Checked on the installed files, without importing them.
    """
    return library_support(backend, {"model_type": model_type}).loadable


@dataclasses.dataclass(frozen=True)
class ShardingMethods:
    """Which sharding methods mlx-lm's class for a model type defines, and the file that says so."""

    pipeline: bool
    tensor: bool
    source: str  # e.g. mlx_lm/models/qwen2.py


def _methods_in(trees: list[ast.Module]) -> tuple[bool, bool]:
    """(pipeline, tensor): a class with `pipeline` or the PipelineMixin base; `shard` on the class named Model."""
    tensor = pipeline = False
    for tree in trees:
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            methods = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
            bases = {base.id for base in node.bases if isinstance(base, ast.Name)}
            if node.name == "Model" and "shard" in methods:
                tensor = True
            if "PipelineMixin" in bases or "pipeline" in methods:
                pipeline = True
    return pipeline, tensor


def sharding_methods(config: dict[str, Any], backend: str = "mlx") -> ShardingMethods | None:
    """What the library's class for a config.json offers: `shard` on Model (tensor), `pipeline` or PipelineMixin
    (pipeline).

    The module is the one the library would load (library_support); its source is read with ast (importing it
    would load MLX). mlx-vlm's model is a package (the VLM plus its `language.py`): every file in it is read,
    as mlx-vlm's sharded_load calls `model.shard` and `language_model.model.pipeline`. None when the library is
    not installed or has no module for the type.
    """
    support = library_support(backend, config)
    if support.path is None or support.module is None:
        return None
    path = Path(support.path)
    files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
    try:
        trees = [_parse_file(file) for file in files]
    except (OSError, SyntaxError, ValueError):
        return None
    pipeline, tensor = _methods_in(trees)
    source = support.module.replace(".", "/") + ("/" if path.name == "__init__.py" else ".py")
    return ShardingMethods(pipeline=pipeline, tensor=tensor, source=source)
