"""What an engine is set up with: its settings (from load options), the loaded model and its decoders.

`load_model` reads the weights (this process, or this rank's shard of a distributed run); `build` makes the
decoders the model needs (the continuous text batch, per-request text streams, mlx-vlm streams, the batch's
mirror across ranks) and the `Runtime` that preparing a request needs. Both run on the worker thread.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from backends import default_max_active, default_prefill_step, device_info
from backends.decoder import Processor, Sampler
from backends.dense import DenseReport, dequantize_for_batching
from backends.feature_cache import FeatureCache
from backends.prefix_cache import check_kv_quantization, check_turboquant
from backends.text_decoders import TextStreams
from backends.vlm_batch import VlmBatch
from backends.vlm_decoder import VlmStreams
from gallery.config import ModelConfig
from gallery.kv_quant import backend_kv_problem, kv_problem
from gallery.sharding import ShardPlan
from runtime.cluster import (
    Cluster,
    MirroredBatcher,
    load_message,
    load_sharded,
    refuse_unsupported,
    shard_plan,
)
from runtime.controls import BatchSettings, Recipe, new_batcher, new_prefix_cache, text_controls
from runtime.errors import LoadFailed
from runtime.load_options import LoadOptions, parse_options
from runtime.loader import LoadedModel, load
from runtime.media import MediaPolicy
from runtime.prepare import Route, Runtime
from runtime.request import RequestLimits
from runtime.sampling import SamplingDefaults
from runtime.scheduler import Controls, DecoderSet


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How the engine serves, from the load options (see runtime.load_options)."""

    max_active: int = 32
    max_queue: int = 256
    batching: bool = True
    solo: bool = True  # a lone text request decodes alone (single-sequence speed) until another arrives
    dequantize: bool | None = None  # serve on 16-bit weights (None: on with MLX CUDA when they fit)
    prefill_step: int = 512
    prefill_batch: int = 8
    prefix_cache: bool = True
    prefix_cache_entries: int = 32
    prefix_cache_bytes: int = 1024 * 1024 * 1024
    media_batching: bool = True
    vision_cache_entries: int = 32
    vision_cache_bytes: int = 512 * 1024 * 1024
    max_kv_size: int | None = None
    kv_bits: float | None = None
    kv_quant_scheme: str | None = None  # uniform | turboquant; None: the config's mlx.kv_cache, else uniform
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    num_draft_tokens: int | None = None
    context_size: int | None = None
    distributed_strategy: str | None = None  # distributed runs: pipeline | tensor | auto
    layer_split: str | None = None  # distributed pipeline runs: layers per rank, "20,12"
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)
    media_policy: MediaPolicy = dataclasses.field(default_factory=MediaPolicy)
    sampling: SamplingDefaults = dataclasses.field(default_factory=SamplingDefaults)  # from load options

    @classmethod
    def from_options(
        cls, options: LoadOptions | None = None, *, interface: str = "stdio", seed: int | None = None
    ) -> EngineSettings:
        """Settings from parsed load options (defaults for what they leave out; `seed`: ModelOptions.Seed)."""
        options = options or parse_options(None)
        local_media = options.get("allow_local_media")
        policy = MediaPolicy(
            allow_local_paths=(interface in ("stdio", "cli")) if local_media is None else bool(local_media),
            allow_remote_urls=bool(options.get("allow_remote_media")),
            max_items=int(options.get("max_media_items")),
            max_bytes=int(float(options.get("max_media_mb")) * 1024 * 1024),
        )
        return cls(
            max_active=int(options.get("max_active") or default_max_active()),
            max_queue=int(options.get("max_queue")),
            batching=bool(options.get("batching")),
            solo=bool(options.get("solo")),
            dequantize=options.get("dequantize"),
            prefill_step=int(options.get("prefill_step") or default_prefill_step()),
            prefill_batch=int(options.get("prefill_batch")),
            prefix_cache=bool(options.get("prefix_cache")),
            prefix_cache_entries=int(options.get("prefix_cache_entries")),
            prefix_cache_bytes=int(float(options.get("prefix_cache_mb")) * 1024 * 1024),
            media_batching=bool(options.get("media_batching")),
            vision_cache_entries=int(options.get("vision_cache_entries")),
            vision_cache_bytes=int(float(options.get("vision_cache_mb")) * 1024 * 1024),
            max_kv_size=options.get("max_kv_size"),
            kv_bits=options.get("kv_bits"),
            kv_quant_scheme=options.get("kv_quant_scheme"),
            kv_group_size=int(options.get("kv_group_size")),
            quantized_kv_start=int(options.get("quantized_kv_start")),
            num_draft_tokens=options.get("num_draft_tokens"),
            context_size=options.get("context_size"),
            distributed_strategy=options.get("distributed_strategy"),
            layer_split=options.get("layer_split"),
            limits=RequestLimits(
                max_request_bytes=int(options.get("max_request_bytes")),
                max_tokens=int(options.get("max_tokens_limit")),
                grammar_budget_s=float(options.get("grammar_budget_s")),
            ),
            media_policy=policy,
            sampling=SamplingDefaults.from_options(options, seed=seed),
        )

    def batch(self, *, distributed: bool) -> BatchSettings:
        """What shapes the text batch and its prefix cache (sent to every rank in a distributed run)."""
        return BatchSettings(
            max_batch=self.max_active,
            prefill_batch=self.prefill_batch,
            prefill_step=self.prefill_step,
            max_kv_size=self.max_kv_size,
            prefix_entries=self.prefix_cache_entries if self.prefix_cache else 0,
            prefix_bytes=self.prefix_cache_bytes,
            deferred_eviction=distributed,
        )


def rss_bytes() -> int:
    """Current resident memory of this process."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclasses.dataclass(frozen=True)
class Source:
    """Where an engine's weights come from."""

    base: Path | None = None
    model_path: Path | None = None
    allow_download: bool = False
    strict: bool = False


def densify(loaded: LoadedModel, settings: EngineSettings, cluster: Cluster | None) -> DenseReport:
    """Serve the text model on 16-bit weights where that is faster (backends.dense); what was done."""
    if cluster is not None:
        return DenseReport(False, "not in a distributed run (every rank would have to agree)")
    text = loaded.primary if loaded.config.backend == "mlx" else loaded.text_route
    if text is None:
        return DenseReport(False, "no mlx-lm text model")
    return dequantize_for_batching(text.model, settings.dequantize, device_info()["backend"])


def kv_settings(config: ModelConfig, settings: EngineSettings) -> EngineSettings:
    """Settings with the KV-cache quantization to use: the load options', else the config's `mlx.kv_cache`.

    Raises LoadFailed naming the field when the pair cannot work, or cannot on this config's backend.
    """
    kv = config.mlx.kv_cache
    if (
        settings.kv_bits is None
        and settings.kv_quant_scheme is None
        and kv is not None
        and kv.bits is not None
    ):
        settings = dataclasses.replace(
            settings,
            kv_bits=kv.bits,
            kv_quant_scheme=kv.scheme,
            kv_group_size=kv.group_size,
            quantized_kv_start=kv.quantized_kv_start,
        )
    problem = kv_problem(settings.kv_bits, settings.kv_quant_scheme) or backend_kv_problem(
        config.backend, settings.kv_quant_scheme
    )
    if problem:
        raise LoadFailed(f"{config.name}: {problem}")
    if settings.kv_bits is not None and float(settings.kv_bits).is_integer():
        settings = dataclasses.replace(settings, kv_bits=int(settings.kv_bits))  # uniform takes whole bits
    return settings


def load_model(
    config: ModelConfig, settings: EngineSettings, source: Source, cluster: Cluster | None
) -> tuple[LoadedModel, ShardPlan | None]:
    """Read the weights: here, or (rank 0 of a distributed run) this rank's shard, after telling the others."""
    settings = kv_settings(
        config, settings
    )  # a KV option the backend cannot honour fails before the weights load
    if cluster is None:
        if settings.distributed_strategy or settings.layer_split:
            raise LoadFailed(
                "load options distributed_strategy and layer_split need a distributed run "
                "(serve with --hosts); this runtime is one process"
            )
        loaded = load(
            config,
            base=source.base,
            model_path=source.model_path,
            allow_download=source.allow_download,
            strict=source.strict,
        )
        return loaded, None
    refuse_unsupported(
        config,
        batching=settings.batching,
        kv_bits=settings.kv_bits,
        draft=bool(config.mlx.speculative.draft_model or config.mlx.drafter)
        or settings.num_draft_tokens is not None,
    )
    plan = shard_plan(config, cluster.size, settings.distributed_strategy, settings.layer_split)
    cluster.send(
        load_message(
            config,
            plan,
            settings.batch(distributed=True),
            base=source.base,
            model_path=source.model_path,
            allow_download=source.allow_download,
        )
    )
    loaded = load_sharded(
        cluster,
        config,
        plan,
        base=source.base,
        model_path=source.model_path,
        allow_download=source.allow_download,
        strict=source.strict,
    )
    return loaded, plan


def build(
    config: ModelConfig, settings: EngineSettings, loaded: LoadedModel, cluster: Cluster | None
) -> tuple[DecoderSet, Runtime, Controls]:
    """The decoders for a loaded model, what preparing needs to know about it, and its controls builder."""
    settings = kv_settings(config, settings)
    turboquant = settings.kv_quant_scheme == "turboquant"
    # mlx-lm has no TurboQuant cache: a VLM's text requests then take the mlx-vlm route, which has one.
    text_backend = loaded.primary if config.backend == "mlx" else None if turboquant else loaded.text_route
    vlm_backend = loaded.primary if config.backend == "mlx-vlm" else None
    batch_settings = settings.batch(distributed=cluster is not None)
    prefix = new_prefix_cache(batch_settings)
    for backend in (text_backend, vlm_backend):
        problem = (
            check_kv_quantization(backend.model, int(settings.kv_bits), settings.kv_group_size)
            if backend and settings.kv_bits is not None and not turboquant
            else None
        )
        if problem:
            raise LoadFailed(f"{config.name}: {problem} (load options kv_bits / kv_group_size)")
    problem = check_turboquant(vlm_backend.model) if turboquant and vlm_backend is not None else None
    if problem:
        raise LoadFailed(f"{config.name}: {problem}")
    decoders = DecoderSet(text_cache=prefix)
    pinned = config.mlx.drafter.num_draft_tokens if config.mlx.drafter else None
    drafts = settings.num_draft_tokens or pinned or config.mlx.speculative.num_draft_tokens
    if text_backend is not None and cluster is not None:
        batcher = new_batcher(text_backend.model, prefix, batch_settings, codec=text_backend)
        decoders.batch = MirroredBatcher(batcher, cluster)
    elif text_backend is not None:
        if settings.batching and settings.kv_bits is None:
            decoders.batch = new_batcher(
                text_backend.model, prefix, batch_settings, codec=text_backend, solo=settings.solo
            )
        decoders.streams = TextStreams(
            text_backend.model,
            prefix,
            draft_model=text_backend.draft_model,
            num_draft_tokens=drafts or 3,
            prefill_step=settings.prefill_step,
            codec=text_backend,
            max_kv_size=settings.max_kv_size,
            kv_bits=None if settings.kv_bits is None else int(settings.kv_bits),
            kv_group_size=settings.kv_group_size,
            quantized_kv_start=settings.quantized_kv_start,
        )
    if vlm_backend is not None:
        streams = VlmStreams(
            vlm_backend.model,
            vlm_backend.processor,
            prefix_entries=settings.prefix_cache_entries if settings.prefix_cache else 0,
            prefill_step=settings.prefill_step,
            draft_model=vlm_backend.draft_model,
            draft_kind=vlm_backend.draft_kind,
            num_draft_tokens=drafts,
            max_kv_size=settings.max_kv_size,
            kv_bits=settings.kv_bits,
            kv_quant_scheme=settings.kv_quant_scheme,
            kv_group_size=settings.kv_group_size,
            quantized_kv_start=settings.quantized_kv_start,
        )
        # The streams are the batch's fallback; both share the prefix states and the feature cache.
        streams.features = FeatureCache(settings.vision_cache_entries, settings.vision_cache_bytes)
        decoders.vlm = VlmBatch(
            vlm_backend.model,
            vlm_backend.processor,
            streams,
            streams.features,
            enabled=settings.media_batching,
            max_batch=settings.max_active,
            prefill_batch=settings.prefill_batch,
            prefill_step=settings.prefill_step,
        )
        if settings.media_batching and decoders.vlm.refusal is not None:
            loaded.warnings.append(f"{config.name}: media requests run one by one: {decoders.vlm.refusal}")
    vlm_drafts = vlm_backend is not None and vlm_backend.draft_model is not None
    runtime = Runtime(
        config=config,
        text_backend=None if vlm_drafts else text_backend,
        vlm_backend=vlm_backend,
        limits=settings.limits,
        media_policy=settings.media_policy,
        context_size=settings.context_size or config.context_size,
        speculative=text_backend is not None and text_backend.draft_model is not None,
        vlm_for_text=vlm_backend is not None and (text_backend is None or vlm_drafts),
        sampling=settings.sampling.over(config.parameters),
    )

    def controls(recipe: Recipe, route: Route) -> tuple[Sampler | None, list[Processor]]:
        backend = runtime.vlm_backend if route == "vlm" else runtime.text_backend
        return text_controls(recipe, backend, config)

    return decoders, runtime, controls
