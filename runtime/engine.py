"""The engine: one worker thread owns the model and every MLX array; requests are handed to it.

Callers (the CLI, the gRPC, stdio and HTTP servers) prepare a request on their own thread (runtime.prepare:
template, media, tokens, sampling, route — bad input fails before it queues) and get a RequestHandle that
streams Events. The worker admits up to `max_active` requests in arrival order and drives the decoders
(backends.decoding): text requests join one continuous batch, media requests run on the vision path, and
each step every active request advances by one token (or its prompt by one chunk). Between steps the
worker drops cancelled requests (freeing the slot within one step) and admits new ones.

Per-request state lives with the request: sampler, processors, stop set, seed. A processor or sampler
that fails marks only its own request as failed; a failure of a whole batch step fails that batch's
requests, resets the random state and starts a fresh batch, and the engine keeps serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from backends import drop_buffer_cache, memory_stats, run_on_mlx_thread, tool_parser
from backends.decoding import (
    DecodeSpec,
    PrefixCache,
    TextBatcher,
    TextStreams,
    Token,
    VlmStreams,
    check_kv_quantization,
)
from backends.sampling import recover_random_state
from gallery.config import ModelConfig
from gallery.errors import GalleryError, RuntimeFailure
from runtime.cluster import (
    HEARTBEAT_S,
    Cluster,
    MirroredBatcher,
    load_message,
    load_sharded,
    refuse_unsupported,
    shard_plan,
)
from runtime.controls import BatchSettings, Guarded, Recipe, new_batcher, new_prefix_cache, text_controls
from runtime.errors import ClusterLost, LoadFailed, NotLoaded, QueueFull, ShuttingDown
from runtime.load_options import LoadOptions, parse_options
from runtime.loader import LoadedModel, load
from runtime.media import MediaPolicy
from runtime.prepare import ROUTE_NAMES, Prepared, Runtime, prepare
from runtime.request import (
    Answer,
    Completion,
    Event,
    GenerationRequest,
    RequestLimits,
    Timings,
    TokenLogprob,
    Usage,
)
from runtime.textstream import ReasoningSplitter, StopStringMatcher, ToolCallExtractor

log = logging.getLogger("runtime")


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How the engine serves, from the load options (see runtime.load_options)."""

    max_active: int = 32
    max_queue: int = 256
    batching: bool = True
    prefill_step: int = 512
    prefill_batch: int = 8
    prefix_cache: bool = True
    prefix_cache_entries: int = 32
    prefix_cache_bytes: int = 1024 * 1024 * 1024
    max_kv_size: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    num_draft_tokens: int | None = None
    context_size: int | None = None
    distributed_strategy: str | None = None  # distributed runs: pipeline | tensor | auto
    layer_split: str | None = None  # distributed pipeline runs: layers per rank, "20,12"
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)
    media_policy: MediaPolicy = dataclasses.field(default_factory=MediaPolicy)
    defaults: tuple[tuple[str, Any], ...] = ()  # request defaults from load options (temperature, …)

    @classmethod
    def from_options(cls, options: LoadOptions | None = None, *, interface: str = "stdio") -> EngineSettings:
        """Settings from parsed load options (defaults for what they leave out)."""
        options = options or parse_options(None)
        local_media = options.get("allow_local_media")
        policy = MediaPolicy(
            allow_local_paths=(interface in ("stdio", "cli")) if local_media is None else bool(local_media),
            allow_remote_urls=bool(options.get("allow_remote_media")),
            max_items=int(options.get("max_media_items")),
            max_bytes=int(float(options.get("max_media_mb")) * 1024 * 1024),
        )
        defaults = tuple(
            (key, options.get(key))
            for key in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed")
            if options.given(key)
        )
        return cls(
            max_active=int(options.get("max_active")),
            max_queue=int(options.get("max_queue")),
            batching=bool(options.get("batching")),
            prefill_step=int(options.get("prefill_step")),
            prefill_batch=int(options.get("prefill_batch")),
            prefix_cache=bool(options.get("prefix_cache")),
            prefix_cache_entries=int(options.get("prefix_cache_entries")),
            prefix_cache_bytes=int(float(options.get("prefix_cache_mb")) * 1024 * 1024),
            max_kv_size=options.get("max_kv_size"),
            kv_bits=options.get("kv_bits"),
            kv_group_size=int(options.get("kv_group_size")),
            quantized_kv_start=int(options.get("quantized_kv_start")),
            num_draft_tokens=options.get("num_draft_tokens"),
            context_size=options.get("context_size"),
            distributed_strategy=options.get("distributed_strategy"),
            layer_split=options.get("layer_split"),
            limits=RequestLimits(
                max_request_bytes=int(options.get("max_request_bytes")),
                max_tokens=int(options.get("max_tokens_limit")),
            ),
            media_policy=policy,
            defaults=defaults,
        )


class RequestHandle:
    """The caller's side of one request: iterate its events, or cancel it."""

    _ids = itertools.count(1)

    def __init__(self, prepared: Prepared) -> None:
        self.id = next(self._ids)
        self.prepared = prepared
        self._events: queue.Queue[Event] = queue.Queue()
        self._cancelled = threading.Event()
        self.finished = threading.Event()
        self._notify: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Stop this request; the worker drops it before its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was called."""
        return self._cancelled.is_set()

    def _put(self, event: Event) -> None:
        self._events.put(event)
        if event.done:
            self.finished.set()
        notify = self._notify
        if notify is not None:
            notify()

    def on_event(self, callback: Callable[[], None]) -> None:
        """Call `callback()` after each new event (from the producing thread; it must not block).

        Lets an event loop wait for events without a thread per request: the callback wakes the loop,
        which then drains them with poll(). Fires once at once if events are already waiting.
        """
        self._notify = callback
        if not self._events.empty():
            callback()

    def poll(self) -> Event | None:
        """The next event if one is ready, else None (never blocks)."""
        try:
            return self._events.get_nowait()
        except queue.Empty:
            return None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until (and including) the final one."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.done:
                return

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def result(self) -> Completion:
        """Wait for the whole answer. Raises RuntimeFailure when generation failed."""
        answer = Answer()
        for event in self.events():
            answer.add(event)
        completion = answer.completion()
        if completion.error:
            raise RuntimeFailure(completion.error)
        return completion


class _Job:
    """Worker-side state of one request: its text pipeline, its counters, its decoder."""

    def __init__(self, handle: RequestHandle, config: ModelConfig, backend: Any, decoder: Any) -> None:
        prepared = handle.prepared
        self.handle = handle
        self.prepared = prepared
        self.uid = handle.id
        self.backend = backend
        self.decoder = decoder
        self.route = ROUTE_NAMES[prepared.route]
        reasoning = config.mlx.reasoning
        self.stops = StopStringMatcher(prepared.stops)
        self.splitter = ReasoningSplitter(
            reasoning.start if reasoning.supported else None,
            reasoning.end if reasoning.supported else None,
            thinking=prepared.thinking,
            starts_inside=prepared.starts_inside,
        )
        tool_calls = config.mlx.tool_calls
        fmt = tool_calls.format if prepared.tools else None
        self.tools = ToolCallExtractor(
            fmt,
            tool_calls.start,
            tool_calls.end,
            prepared.tools,
            library=tool_parser(fmt) if fmt else (None, None, None),
            max_calls=prepared.max_tool_calls,
        )
        self.detokenizer = backend.detokenizer() if prepared.route != "vlm" else None
        self.failure: str | None = None
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_tokens = len(prepared.prompt_ids) if prepared.prompt_ids is not None else 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.draft_accepted = 0

    def fail(self, reason: str) -> None:
        """Mark this request failed (its sampler or a processor raised); the worker closes it after the step."""
        self.failure = self.failure or reason

    def pipe(self, text: str, *, final: bool = False) -> Event:
        """Run text through stop strings, reasoning split and tool extraction."""
        event = Event(route=self.route)
        visible = self.stops.feed(text) if text else ""
        if final:
            visible += self.stops.flush()
        pieces = self.splitter.feed(visible) if visible else []
        if final:
            pieces += self.splitter.flush()
        for piece in pieces:
            if piece.kind == "reasoning":
                event.reasoning += piece.text
                continue
            content, calls = self.tools.feed(piece.text)
            event.content += content
            event.tool_calls.extend(calls)
        if final:
            content, calls = self.tools.flush()
            event.content += content
            event.tool_calls.extend(calls)
        return event


def rss_bytes() -> int:
    """Current resident memory of this process."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine started (Status, metrics)."""

    requests: int = 0
    finished: dict[str, int] = dataclasses.field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    batch_steps: int = 0
    batch_rows: int = 0


class Engine:
    """Load one config on a worker thread and serve requests against it."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        settings: EngineSettings | None = None,
        base: Path | None = None,
        model_path: Path | None = None,
        allow_download: bool = False,
        strict: bool = False,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        self.settings = settings or EngineSettings()
        self._cluster = cluster  # set when this is rank 0 of a distributed run (runtime.cluster)
        self.plan: Any = None  # the shard plan, in a distributed run
        self._base, self._model_path = base, model_path
        self._allow_download, self._strict = allow_download, strict
        self.loaded: LoadedModel | None = None
        self.runtime: Runtime | None = None
        self.warnings: list[str] = []
        self.error: str | None = None
        self.stats = EngineStats()
        self.listeners: list[Callable[[Event], None]] = []  # called with every final event (metrics)
        self._queue: queue.Queue[RequestHandle | None] = queue.Queue()
        self._jobs: dict[int, _Job] = {}
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._stopping = threading.Event()
        self._hard_stop = threading.Event()
        self._done: threading.Event | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self.completed = 0
        self._batcher: TextBatcher | MirroredBatcher | None = None
        self._streams: TextStreams | None = None
        self._vlm: VlmStreams | None = None
        self._prefix: PrefixCache | None = None

    # ----- lifecycle -----
    def start(self, timeout: float | None = None) -> Engine:
        """Start the worker and wait until the model is loaded. Raises the load error."""
        self._done = run_on_mlx_thread(self._run)
        if not self._ready.wait(timeout):
            raise RuntimeFailure(f"{self.config.name}: loading did not finish in {timeout} s")
        if self._load_error is not None:
            raise self._load_error
        for message in self.warnings:
            log.warning(
                "%s", message
            )  # through logging, so a front end that shows them itself can quiet them
        return self

    def shutdown(self, *, cancel: bool = True, timeout: float | None = 30.0) -> None:
        """Stop the worker: cancel (or let finish) in-flight requests, refuse new ones."""
        self._stopping.set()
        if cancel:
            self._hard_stop.set()
            with self._lock:
                for job in list(self._jobs.values()):
                    job.handle.cancel()
            while True:
                try:
                    handle = self._queue.get_nowait()
                except queue.Empty:
                    break
                if handle is not None:
                    self._finish_unstarted(handle, "cancelled", "the runtime is shutting down")
        self._queue.put(None)
        if self._done is not None:
            self._done.wait(timeout)

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and the worker is serving."""
        broken = self._cluster is not None and self._cluster.failure is not None
        return self.loaded is not None and not self._stopping.is_set() and not broken

    def status(self) -> dict[str, Any]:
        """State (LOADING, READY, BUSY, ERROR, STOPPING), load, memory, caches and warnings."""
        cluster = self._cluster
        if cluster is not None and cluster.failure is not None and self.loaded is not None:
            self.error = self.error or cluster.failure
        if self.error or self._load_error is not None:
            state = "ERROR"
        elif self.loaded is None:
            state = "LOADING"
        elif self._stopping.is_set():
            state = "STOPPING"
        else:
            state = "BUSY" if (self._jobs or self._pending) else "READY"
        caches: dict[str, Any] = {}
        if self._prefix is not None:
            caches["text"] = self._prefix.describe()
        if self._vlm is not None:
            caches["vlm"] = self._vlm.describe()
        draft: dict[str, Any] = {}
        drafting = [d for d in (self._streams, self._vlm) if d is not None and d.drafted]
        if drafting:
            drafted, accepted = sum(d.drafted for d in drafting), sum(d.accepted for d in drafting)
            draft = {
                "draft_tokens": drafted,
                "accepted": accepted,
                "acceptance": round(accepted / drafted, 4),
            }
            if self._vlm is not None and self._vlm.proposed:
                draft["proposed"] = self._vlm.proposed  # drafts offered (mlx-vlm counts them per round)
        return {
            "state": state,
            "model": self.config.name,
            "backend": self.config.backend,
            "active": len(self._jobs),
            "queued": self._pending,
            "completed": self.completed,
            "batch": len(self._batcher.specs) if self._batcher is not None else 0,
            "memory": {"rss": rss_bytes(), **memory_stats()},
            "prefix_cache": caches,
            "speculative": draft,
            "stats": dataclasses.asdict(self.stats),
            "warnings": list(self.warnings),
            "error": self.error or (str(self._load_error) if self._load_error else None),
            "text_route": bool(self.loaded and self.loaded.text_route is not None),
            "distributed": {
                **cluster.describe(),
                "strategy": self.plan.strategy if self.plan else None,
                "layer_split": list(self.plan.layer_split) if self.plan and self.plan.layer_split else None,
            }
            if cluster is not None
            else None,
        }

    # ----- requests -----
    def prepare(self, request: GenerationRequest) -> Prepared:
        """Validate, render and route a request on the caller's thread. Raises RequestError."""
        if self.runtime is None:
            raise NotLoaded(self.error or "the model is not loaded")
        return prepare(request, self.runtime)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Prepare and queue a request; returns its handle. Raises RequestError / RuntimeFailure / QueueFull."""
        if self._stopping.is_set():
            raise ShuttingDown("the runtime is shutting down")
        if self.loaded is None:
            raise NotLoaded(self.error or "the model is not loaded")
        if self._cluster is not None and self._cluster.failure is not None:
            raise ClusterLost(self._cluster.failure)
        prepared = self.prepare(request)
        with self._lock:
            if self._pending >= self.settings.max_queue:
                prepared.cleanup()
                raise QueueFull(f"the runtime is busy ({self._pending} requests queued); retry later")
            self._pending += 1
        handle = RequestHandle(prepared)
        self._queue.put(handle)
        return handle

    def generate(self, request: GenerationRequest) -> Completion:
        """Submit a request and wait for the whole answer."""
        return self.submit(request).result()

    def _tokenizer_backend(self) -> Any:
        runtime = self.runtime
        if runtime is None:
            raise NotLoaded(self.error or "the model is not loaded")
        return runtime.text_backend or runtime.vlm_backend

    def tokenize(self, text: str) -> list[int]:
        """Token ids of text, as the text route encodes a prompt (tokenizers are safe to share across threads)."""
        return self._tokenizer_backend().tokenize(text)

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids."""
        return self._tokenizer_backend().detokenize(ids)

    # ----- the worker -----
    def _run(self) -> None:
        try:
            if self._cluster is not None:
                self.loaded = self._load_distributed(self._cluster)
            else:
                if self.settings.distributed_strategy or self.settings.layer_split:
                    raise LoadFailed(
                        "load options distributed_strategy and layer_split need a distributed run "
                        "(serve with --hosts); this runtime is one process"
                    )
                self.loaded = load(
                    self.config,
                    base=self._base,
                    model_path=self._model_path,
                    allow_download=self._allow_download,
                    strict=self._strict,
                )
            self.warnings.extend(self.loaded.warnings)
            self._build_decoders(self.loaded)
        except BaseException as exc:
            self._load_error = (
                exc if isinstance(exc, GalleryError) else RuntimeFailure(f"{type(exc).__name__}: {exc}")
            )
            self.error = str(self._load_error)
            self.loaded = None
            self._ready.set()
            return
        self._ready.set()
        exiting = False
        while True:
            exiting = self._admit(exiting)
            self._drop_cancelled()
            if exiting and not self._jobs:
                break
            self._step()
        self._close_decoders()

    def _load_distributed(self, cluster: Cluster) -> LoadedModel:
        """Rank 0: check the model can be split, tell the other ranks to load it, and load this rank's shard."""
        settings, config = self.settings, self.config
        refuse_unsupported(
            config,
            batching=settings.batching,
            kv_bits=settings.kv_bits,
            draft=bool(config.mlx.speculative.draft_model) or settings.num_draft_tokens is not None,
        )
        plan = shard_plan(config, cluster.size, settings.distributed_strategy, settings.layer_split)
        cluster.send(
            load_message(
                config,
                plan,
                self._batch_settings(),
                base=self._base,
                model_path=self._model_path,
                allow_download=self._allow_download,
            )
        )
        self.plan = plan
        return load_sharded(
            cluster,
            config,
            plan,
            base=self._base,
            model_path=self._model_path,
            allow_download=self._allow_download,
            strict=self._strict,
        )

    def _batch_settings(self) -> BatchSettings:
        settings = self.settings
        return BatchSettings(
            max_batch=settings.max_active,
            prefill_batch=settings.prefill_batch,
            prefill_step=settings.prefill_step,
            max_kv_size=settings.max_kv_size,
            prefix_entries=settings.prefix_cache_entries if settings.prefix_cache else 0,
            prefix_bytes=settings.prefix_cache_bytes,
            deferred_eviction=self._cluster is not None,
        )

    def _build_decoders(self, loaded: LoadedModel) -> None:
        settings, config = self.settings, self.config
        text_backend = loaded.primary if config.backend == "mlx" else loaded.text_route
        vlm_backend = loaded.primary if config.backend == "mlx-vlm" else None
        self._prefix = new_prefix_cache(self._batch_settings())
        kv: dict[str, Any] = {
            "max_kv_size": settings.max_kv_size,
            "kv_bits": settings.kv_bits,
            "kv_group_size": settings.kv_group_size,
            "quantized_kv_start": settings.quantized_kv_start,
        }
        for backend in (text_backend, vlm_backend):
            problem = (
                check_kv_quantization(backend.model, settings.kv_bits, settings.kv_group_size)
                if backend
                else None
            )
            if problem:
                raise LoadFailed(f"{config.name}: {problem} (load options kv_bits / kv_group_size)")
        if text_backend is not None and self._cluster is not None:
            self._batcher = MirroredBatcher(self._new_batcher(text_backend), self._cluster)
        elif text_backend is not None:
            if settings.batching and settings.kv_bits is None:
                self._batcher = self._new_batcher(text_backend)
            self._streams = TextStreams(
                text_backend.model,
                self._prefix,
                draft_model=text_backend.draft_model,
                num_draft_tokens=settings.num_draft_tokens or config.mlx.speculative.num_draft_tokens or 3,
                prefill_step=settings.prefill_step,
                **kv,
            )
        if vlm_backend is not None:
            self._vlm = VlmStreams(
                vlm_backend.model,
                vlm_backend.processor,
                prefix_entries=settings.prefix_cache_entries if settings.prefix_cache else 0,
                prefill_step=settings.prefill_step,
                draft_model=vlm_backend.draft_model,
                draft_kind=vlm_backend.draft_kind,
                num_draft_tokens=settings.num_draft_tokens or config.mlx.speculative.num_draft_tokens,
                **kv,
            )
        vlm_drafts = vlm_backend is not None and vlm_backend.draft_model is not None
        self.runtime = Runtime(
            config=config,
            text_backend=None if vlm_drafts else text_backend,
            vlm_backend=vlm_backend,
            limits=settings.limits,
            media_policy=settings.media_policy,
            context_size=settings.context_size or config.context_size,
            speculative=text_backend is not None and text_backend.draft_model is not None,
            vlm_for_text=vlm_backend is not None and (text_backend is None or vlm_drafts),
            defaults=dict(settings.defaults),
        )

    def _new_batcher(self, backend: Any) -> TextBatcher:
        assert self._prefix is not None
        return new_batcher(backend.model, self._prefix, self._batch_settings())

    def _close_decoders(self) -> None:
        for decoder in (self._batcher, self._streams, self._vlm):
            if decoder is not None:
                decoder.close()

    def _admit(self, exiting: bool) -> bool:
        """Start queued requests while there is room, blocking only while idle. Returns whether to exit when idle."""
        while len(self._jobs) < self.settings.max_active:
            idle = not self._jobs and not exiting
            mirror = self._batcher if isinstance(self._batcher, MirroredBatcher) else None
            # A distributed run pings its ranks while idle, so a dead one is noticed (and reported) at once.
            beat = HEARTBEAT_S if idle and mirror is not None and mirror.cluster.failure is None else None
            if idle and self._queue.empty():
                drop_buffer_cache()  # nothing to do: hold only the weights and the bounded prefix cache
            try:
                handle = self._queue.get(block=idle, timeout=beat)
            except queue.Empty:
                if mirror is not None and beat is not None:
                    try:
                        mirror.heartbeat()
                    except ClusterLost as exc:
                        self.error = str(exc)
                    continue
                return exiting
            if handle is None:
                exiting = True
                continue
            with self._lock:
                self._pending -= 1
            if handle.cancelled:
                self._finish_unstarted(handle, "cancelled", None)
                continue
            self._start(handle)
        return exiting

    def _decoder_for(self, prepared: Prepared) -> Any:
        if prepared.route == "vlm":
            return self._vlm
        if self._batcher is not None and not prepared.speculative:
            return self._batcher
        return self._streams

    def _start(self, handle: RequestHandle) -> None:
        prepared = handle.prepared
        runtime = self.runtime
        assert runtime is not None
        backend = runtime.vlm_backend if prepared.route == "vlm" else runtime.text_backend
        decoder = self._decoder_for(prepared)
        job = _Job(handle, self.config, backend, decoder)
        self.stats.requests += 1
        try:
            recipe = self._recipe(job)
            spec = self._spec(job, backend, recipe)
            started = decoder.add(spec, recipe) if isinstance(decoder, MirroredBatcher) else decoder.add(spec)
        except Exception as exc:
            self._jobs[job.uid] = job
            self._close(
                job,
                "error",
                error=f"generation failed to start: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
            )
            return
        job.cached_tokens = started.cached_tokens
        self._jobs[job.uid] = job

    def _recipe(self, job: _Job) -> Recipe:
        prepared = job.prepared
        return Recipe(
            uid=job.uid,
            prompt=prepared.prompt_ids or [],
            max_tokens=prepared.max_tokens,
            stop_ids=sorted(prepared.stop_ids),
            params=prepared.params,
            logprobs=prepared.logprobs,
            grammar=prepared.grammar,
            thinking_budget=prepared.thinking_budget,
            thinking=prepared.thinking,
            starts_inside=prepared.starts_inside,
        )

    def _spec(self, job: _Job, backend: Any, recipe: Recipe) -> DecodeSpec:
        prepared = job.prepared
        sampler, processors = text_controls(recipe, backend, self.config)
        media = prepared.media
        handle = job.handle
        return DecodeSpec(
            uid=job.uid,
            max_tokens=prepared.max_tokens,
            stop_ids=prepared.stop_ids,
            sampler=Guarded(sampler, job.fail, sampler=True) if sampler is not None else None,
            processors=[Guarded(processor, job.fail) for processor in processors],
            logprobs=prepared.logprobs,
            prompt=prepared.prompt_ids or [],
            prompt_text=prepared.prompt_text,
            images=list(media.images) if media else [],
            audio=list(media.audio) if media else [],
            video=list(media.video) if media else [],
            media_key=tuple(media.hashes) if media else (),
            speculative=prepared.speculative,
            num_draft_tokens=prepared.num_draft_tokens,
            should_stop=lambda: handle.cancelled or self._hard_stop.is_set(),
        )

    def _drop_cancelled(self) -> None:
        for job in list(self._jobs.values()):
            if job.handle.cancelled:
                job.decoder.cancel(job.uid)
                self._close(job, "cancelled")

    def _step(self) -> None:
        for decoder in (self._batcher, self._streams, self._vlm):
            if decoder is None or not decoder.busy():
                continue
            try:
                tokens = decoder.step()
            except Exception as exc:  # a whole batch step failed: fail its requests, keep serving
                self._fail_decoder(decoder, exc)
                continue
            if decoder is self._batcher:
                self.stats.batch_steps += 1
                self.stats.batch_rows += len(tokens)
            for token in tokens:
                job = self._jobs.get(token.uid)
                if job is not None:
                    self._on_token(job, token)
        for job in list(self._jobs.values()):
            if job.failure is not None:
                job.decoder.cancel(job.uid)
                self._close(job, "error", error=f"generation failed: {job.failure}")

    def _fail_decoder(self, decoder: Any, exc: Exception) -> None:
        if isinstance(exc, ClusterLost):
            # The ranks can no longer be kept in step: fail everything, stay up reporting the error.
            self.error = str(exc)
            for job in list(self._jobs.values()):
                self._close(job, "error", error=f"generation failed: {exc}")
            return
        message = f"generation failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        for job in [job for job in self._jobs.values() if job.decoder is decoder]:
            self._close(job, "error", error=message)
        recover_random_state()
        if decoder is self._batcher and isinstance(self._batcher, TextBatcher):
            self._batcher.close()
            runtime = self.runtime
            assert runtime is not None
            self._batcher = self._new_batcher(runtime.text_backend)
        else:
            decoder.close()

    def _on_token(self, job: _Job, token: Token) -> None:
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        if token.prompt_tokens is not None:
            job.prompt_tokens = token.prompt_tokens
        if token.cached_tokens is not None:
            job.cached_tokens = token.cached_tokens
        if token.finish in ("cancelled", "error"):
            self._close(job, token.finish, error=token.error)
            return
        text = token.text or ""
        event_logprob = None
        if token.token is not None:
            job.completion_tokens += 1
            job.draft_accepted += int(token.from_draft)
            if job.splitter.inside:
                job.reasoning_tokens += 1
            is_stop = token.finish == "stop" and token.token in job.prepared.stop_ids
            if token.text is None and not is_stop and job.detokenizer is not None:
                job.detokenizer.add_token(token.token)
                text = job.detokenizer.last_segment
            if job.prepared.logprobs is not None and token.logprob is not None and not is_stop:
                event_logprob = self._logprob(job, token)
        if token.finish is not None and job.detokenizer is not None:
            job.detokenizer.finalize()
            text += job.detokenizer.last_segment
        event = job.pipe(text)
        if event_logprob is not None:
            event.logprobs.append(event_logprob)
        if job.stops.stopped or job.tools.complete:
            if token.finish is None:
                job.decoder.cancel(job.uid)
            self._close(job, "stop", event)
            return
        if token.finish is not None:
            self._close(job, token.finish, event)
            return
        if event.has_output:
            job.handle._put(event)

    def _logprob(self, job: _Job, token: Token) -> TokenLogprob:
        decode = job.backend.detokenize
        assert token.token is not None and token.logprob is not None
        return TokenLogprob(
            decode([token.token]),
            token.token,
            token.logprob,
            [(decode([i]), i, lp) for i, lp in token.top_logprobs or []],
        )

    def _finish_unstarted(self, handle: RequestHandle, reason: str, error: str | None) -> None:
        handle.prepared.cleanup()
        handle._put(Event(done=True, finish_reason=reason, usage=Usage(), timings=Timings(), error=error))

    def _close(self, job: _Job, reason: str, pending: Event | None = None, error: str | None = None) -> None:
        self._jobs.pop(job.uid, None)
        clean = error is None and reason not in ("cancelled", "error")
        tail = job.pipe("", final=True) if clean else Event(route=job.route)
        final = pending or Event(route=job.route)
        final.content += tail.content
        final.reasoning += tail.reasoning
        final.tool_calls.extend(tail.tool_calls)
        finish = "stop" if job.stops.stopped and reason not in ("cancelled", "error") else reason
        if clean and (final.tool_calls or (job.tools.calls and finish == "stop")):
            finish = "tool_calls"
        now = time.perf_counter()
        first = job.first_token_at or now
        prompt_s = max(first - job.started, 0.0)
        generation_s = max(now - first, 0.0)
        computed = max(job.prompt_tokens - job.cached_tokens, 0)
        final.done = True
        final.finish_reason = finish
        final.error = error
        final.seed = job.prepared.params.seed if not job.prepared.params.greedy else None
        final.stop_sequence = job.stops.matched if finish == "stop" else None
        final.usage = Usage(
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
            cached_tokens=job.cached_tokens,
            reasoning_tokens=job.reasoning_tokens,
            draft_tokens_accepted=job.draft_accepted,
        )
        final.timings = Timings(
            queued_s=max(job.started - job.prepared.submitted, 0.0),
            prompt_s=prompt_s,
            generation_s=generation_s,
            prompt_tps=computed / prompt_s if prompt_s > 0 and job.first_token_at else 0.0,
            generation_tps=(job.completion_tokens - 1) / generation_s
            if generation_s > 0 and job.completion_tokens > 1
            else 0.0,
        )
        job.prepared.cleanup()
        self.completed += 1
        stats = self.stats
        stats.finished[finish] = stats.finished.get(finish, 0) + 1
        stats.prompt_tokens += job.prompt_tokens
        stats.cached_tokens += job.cached_tokens
        stats.completion_tokens += job.completion_tokens
        for listener in self.listeners:
            with contextlib.suppress(Exception):  # metrics must never take a request down
                listener(final)
        job.handle._put(final)
