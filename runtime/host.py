"""The model host: which model is loaded, loading a new one, freeing it, and what state it is in.

Both interfaces (gRPC and stdio) drive one ModelHost. It resolves a model spec (config path, catalog
name, model folder, Hub repo id) to a config, applies load options, starts an Engine, and frees the
previous engine first — but only after the new spec resolved, so asking for a model that does not
exist never unloads the one that works. Loads are serialized; requests read the current engine
without a lock (a request racing a reload is cancelled cleanly by the old engine's shutdown).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any

from backends import memory_stats, release_memory
from catalog.resolve import Resolved, resolve_spec
from gallery.config import ModelConfig
from gallery.errors import GalleryError, RequestError, RuntimeFailure
from runtime.cluster import Cluster
from runtime.engine import Engine, EngineSettings, RequestHandle, rss_bytes
from runtime.errors import IdentityMismatch, LoadFailed, NotLoaded, QueueFull, ShuttingDown
from runtime.load_options import LoadOptions, parse_options
from runtime.request import GenerationRequest

log = logging.getLogger("runtime")


@dataclasses.dataclass
class LoadReport:
    """What a load did, for the caller's reply."""

    name: str
    backend: str
    spec: str
    seconds: float
    warnings: list[str]
    unknown_options: list[str]
    reused: bool = False
    import_warnings: list[str] = dataclasses.field(
        default_factory=list
    )  # when the spec was imported on the fly
    imported: str | None = None  # an import on the fly: the commit it pinned

    @property
    def message(self) -> str:
        """One line for LoadModel's Result.message."""
        text = f"loaded {self.name} ({self.backend})" + (
            " (already loaded)" if self.reused else f" in {self.seconds:.1f} s"
        )
        if self.imported:
            text += f"; {self.imported}"
        if self.unknown_options:
            text += f"; ignored unknown options: {', '.join(self.unknown_options)}"
        if self.warnings:
            text += f"; warnings: {' | '.join(self.warnings)}"
        return text


@dataclasses.dataclass
class Overrides:
    """Load settings that come from typed ModelOptions fields rather than `key:value` options."""

    context_size: int | None = None
    seed: int | None = None
    trust_remote_code: bool = False
    draft_model: str | None = None


def resolve(
    spec: str, catalog: str | None, model_path: str | None = None, revision: str | None = None
) -> Resolved:
    """Resolve a spec to its config (no weights are read); relative paths also under model_path; at
    `revision` when given (LoadModel's `revision:` option)."""
    return resolve_spec(
        spec, catalog=catalog, base_dirs=[model_path] if model_path else [], revision=revision
    )


def apply_options(config: ModelConfig, options: LoadOptions, overrides: Overrides) -> ModelConfig:
    """A copy of config with the context size and trust settings the load asked for.

    Sampling defaults are not written into the copy: the engine lays them over the config's once
    (runtime.sampling.SamplingDefaults), from the same options.
    """
    config = config.model_copy(deep=True)
    context = options.get("context_size") or overrides.context_size
    if context:
        config.context_size = int(context)
    if overrides.trust_remote_code or options.get("trust_remote_code"):
        config.mlx.trust_remote_code = True
    if overrides.draft_model:
        config.mlx.speculative.draft_model = overrides.draft_model
    return config


def identity_names(config: ModelConfig, spec: str, options: LoadOptions) -> set[str]:
    """Every name a request may use to mean this model (ModelIdentity / `model`)."""
    names = {config.name, spec, config.parameters.model, *options.get("model_identity")}
    source = config.mlx.source
    if source.repo:
        names.add(source.repo)
        if source.revision:
            names.add(f"{source.repo}@{source.revision}")
    if source.local_path:
        names.add(source.local_path)
    path = Path(spec)
    names.update({path.name, path.stem})
    return {name for name in names if name}


def weights_bytes(config: ModelConfig) -> int:
    """The bytes of a config's weights (its .safetensors files): what MLX holds in memory for them."""
    weights = [f.size or 0 for f in config.mlx.files if f.path.endswith(".safetensors")]
    return sum(weights) if weights else int(config.mlx.total_size or 0)


class ModelHost:
    """Owns at most one loaded Engine; thread-safe."""

    def __init__(self, *, interface: str, catalog: str | None = None, cluster: Cluster | None = None) -> None:
        self.interface = interface
        self.catalog = catalog
        self.cluster = cluster  # rank 0 of a distributed run: every engine loads across the ranks
        self.engine: Engine | None = None
        self.options = parse_options(None)
        self.spec: str | None = None
        self.names: set[str] = set()
        self.loading: str | None = None
        self.error: str | None = None
        self.draining = False
        self._load_lock = threading.Lock()
        self._loaded_key: tuple[Any, ...] | None = None

    # ----- loading -----
    def load(
        self,
        spec: str,
        options: Any = None,
        *,
        model_path: str | None = None,
        overrides: Overrides | None = None,
    ) -> LoadReport:
        """Load a model, freeing the previous one. Raises ModelNotFound, RequestError, LoadFailed…"""
        if self.draining:
            raise ShuttingDown("the runtime is shutting down")
        parsed = parse_options(options)
        overrides = overrides or Overrides()
        with self._load_lock:
            started = time.perf_counter()
            located = spec.strip()
            key = (located, model_path, repr(sorted(parsed.values.items())), dataclasses.astuple(overrides))
            if self.engine is not None and self._loaded_key == key and self.engine.ready:
                return LoadReport(
                    self.engine.config.name,
                    self.engine.config.backend,
                    located,
                    0.0,
                    list(self.engine.warnings),
                    parsed.unknown,
                    reused=True,
                )
            catalog = parsed.get("catalog") or self.catalog
            resolved = resolve(located, catalog, model_path, parsed.get("revision"))
            for message in resolved.warnings:
                log.warning("import of %s: %s", located, message)
            if resolved.imported_note:
                log.info("%s", resolved.imported_note)
            config = apply_options(resolved.config, parsed, overrides)
            base = resolved.base
            self._free_locked()
            self.loading, self.error = config.name, None
            log.info("loading %s (%s) from %s", config.name, config.backend, located)
            try:
                engine = self._start_engine(config, base, parsed, overrides)
            except GalleryError as exc:
                self.error = str(exc)
                if type(exc) is RuntimeFailure:  # a plain runtime failure means "found, but would not load"
                    raise LoadFailed(str(exc)) from None
                raise
            except Exception as exc:  # an MLX or library failure while loading: report it, keep serving
                self.error = f"could not load {config.name}: {type(exc).__name__}: {exc}"
                raise LoadFailed(self.error) from None
            finally:
                self.loading = None
            self.engine, self.options, self.spec = engine, parsed, located
            self.names = identity_names(config, located, parsed)
            self._loaded_key = key
            seconds = time.perf_counter() - started
            log.info(
                "loaded %s in %.1f s, MLX memory %.0f MiB",
                config.name,
                seconds,
                memory_stats().get("mlx_active", 0) / 2**20,
            )
            return LoadReport(
                config.name,
                config.backend,
                located,
                seconds,
                list(engine.warnings),
                parsed.unknown,
                import_warnings=list(resolved.warnings),
                imported=resolved.imported_note,
            )

    def _start_engine(
        self, config: ModelConfig, base: Path | None, options: LoadOptions, overrides: Overrides
    ) -> Engine:
        settings = EngineSettings.from_options(options, interface=self.interface, seed=overrides.seed)
        engine = Engine(
            config,
            settings=settings,
            base=base,
            allow_download=bool(options.get("allow_download")),
            strict=bool(options.get("strict")),
            cluster=self.cluster,
        )
        return engine.start()

    def free(self) -> str | None:
        """Unload the model and release its memory; returns the freed model's name (None if none)."""
        with self._load_lock:
            return self._free_locked()

    def _free_locked(self) -> str | None:
        engine, self.engine = self.engine, None
        self._loaded_key, self.names, self.spec, self.options = None, set(), None, parse_options(None)
        if engine is None:
            return None
        name = engine.config.name
        engine.shutdown(cancel=True)  # the worker drops the model's arrays as it exits
        del engine
        gc.collect()
        release_memory()
        log.info("freed %s", name)
        return name

    def close(self, *, cancel: bool = True) -> None:
        """Stop serving: refuse new work and shut the engine down."""
        self.draining = True
        engine = self.engine
        if engine is not None:
            engine.shutdown(cancel=cancel)

    # ----- requests -----
    def current(self) -> Engine:
        """The loaded engine. Raises NotLoaded / ShuttingDown."""
        if self.draining:
            raise ShuttingDown("the runtime is shutting down")
        engine = self.engine
        if engine is None:
            if self.loading:
                raise NotLoaded(f"{self.loading} is still loading; retry when Status is READY")
            raise NotLoaded(
                "no model is loaded: call LoadModel first"
                + (f" (last load failed: {self.error})" if self.error else "")
            )
        return engine

    def check_identity(self, identity: str | None) -> None:
        """Refuse a request meant for another model. Empty identity means "whatever is loaded"."""
        if not identity:
            return
        engine = self.current()
        if identity not in self.names:
            source = engine.config.mlx.source
            raise IdentityMismatch(
                f"request is for model {identity!r} but {engine.config.name!r}"
                + (f" ({source.repo})" if source.repo else "")
                + " is loaded"
            )

    def submit(self, request: GenerationRequest, identity: str | None = None) -> RequestHandle:
        """Apply load-time request defaults and queue the request on the current engine."""
        engine = self.current()
        self.check_identity(identity)
        if request.enable_thinking is None and self.options.get("enable_thinking") is not None:
            request.enable_thinking = bool(self.options.get("enable_thinking"))
        try:
            return engine.submit(request)
        except (QueueFull, RequestError):
            raise
        except RuntimeFailure:
            # The engine stopped between current() and submit(): a drain, or a reload / Free racing us.
            if self.draining:
                raise ShuttingDown("the runtime is shutting down") from None
            if engine is not self.engine:
                raise NotLoaded(
                    "the model was unloaded while this request was being prepared; retry"
                ) from None
            raise

    # ----- state -----
    def status(self) -> dict[str, Any]:
        """State (UNINITIALIZED / READY / BUSY / ERROR), the model, load and memory."""
        engine = self.engine
        memory: dict[str, int] = {"rss": rss_bytes(), **memory_stats()}
        info: dict[str, Any] = {
            "model": None,
            "backend": None,
            "active": 0,
            "queued": 0,
            "completed": 0,
            "warnings": [],
            "error": self.error,
            "loading": self.loading,
            "draining": self.draining,
        }
        if engine is not None:
            status = engine.status()
            state = {"READY": "READY", "BUSY": "BUSY", "STOPPING": "BUSY", "ERROR": "ERROR"}.get(
                status["state"], "UNINITIALIZED"
            )
            info.update(
                {
                    key: status[key]
                    for key in (
                        "model",
                        "backend",
                        "active",
                        "queued",
                        "completed",
                        "batch",
                        "prefix_cache",
                        "speculative",
                        "stats",
                        "warnings",
                        "kv_cache",
                        "activation_quantization",
                    )
                }
            )
            info["error"] = status["error"]
            memory["weights"] = weights_bytes(engine.config)  # the loaded model's own share (gRPC Status)
        elif self.loading:
            state = "UNINITIALIZED"
        else:
            state = "ERROR" if self.error else "UNINITIALIZED"
        return {"state": state, "memory": {"total": memory["rss"], "breakdown": memory}, **info}


# A small conversation the pinned template renders for ModelMetadata: a system turn and a user turn,
# with the generation prompt, so a client sees how turns are framed and whether the answer opens
# inside a reasoning block (LocalAI's rendered_template is "the template rendered with thinking on").
PROBE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
]


def model_metadata(config: ModelConfig) -> dict[str, Any]:
    """supports_thinking, the probe conversation rendered with the pinned template, and the media marker."""
    from runtime.prompt import render_request_prompt

    reasoning = config.mlx.reasoning
    rendered = ""
    if config.mlx.chat_template.status == "pinned":
        try:
            rendered = render_request_prompt(
                config,
                [dict(m) for m in PROBE_CONVERSATION],
                enable_thinking=True if reasoning.supported else None,
            ).text
        except GalleryError as exc:
            log.warning(
                "%s: the pinned template does not render the probe conversation: %s", config.name, exc
            )
    return {
        "supports_thinking": bool(reasoning.supported),
        "rendered_template": rendered,
        "media_marker": config.mlx.media.marker or "",
        "reasoning_start": reasoning.start or "",
        "reasoning_end": reasoning.end or "",
        "tool_format": config.mlx.tool_calls.format or "",
    }


def prompt_text(config: ModelConfig, request: GenerationRequest) -> str:
    """The exact prompt text a request renders to (messages through the pinned template), without media."""
    from runtime.prompt import render_request_prompt

    if request.prompt is not None:
        return request.prompt
    return render_request_prompt(
        config,
        request.messages,
        tools=request.tools,
        enable_thinking=request.enable_thinking,
        template_kwargs=request.template_kwargs,
    ).text
