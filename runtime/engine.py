"""The engine: one worker thread owns the model, the decoders and every active request; callers use its queue.

Callers (the CLI, the gRPC, stdio and HTTP servers) prepare a request on their own thread (runtime.prepare:
template, media, tokens, sampling, route — bad input fails before it queues), put it on the engine's queue
and get a RequestHandle that streams Events. The worker loads the model (runtime.engine_setup), then loops:
the scheduler (runtime.scheduler) admits queued requests in arrival order, drops cancelled ones and steps
the decoders; the output processor (runtime.output) turns tokens into answers. After each step the worker
publishes an immutable Snapshot and then delivers the step's events, so `status()` on any thread reads
the snapshot and never the worker's own state.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends import drop_buffer_cache, memory_stats, run_on_mlx_thread
from backends.decoder import FinishReason
from gallery.config import ModelConfig
from gallery.errors import GalleryError, RuntimeFailure
from gallery.sharding import ShardPlan
from runtime.cluster import HEARTBEAT_S, Cluster
from runtime.engine_setup import EngineSettings, Source, build, densify, kv_settings, load_model, rss_bytes
from runtime.errors import ClusterLost, NotLoaded, QueueFull, ShuttingDown
from runtime.handle import RequestHandle
from runtime.loader import LoadedModel
from runtime.output import unstarted
from runtime.prepare import Prepared, Runtime, prepare
from runtime.request import Completion, Event, GenerationRequest
from runtime.scheduler import EngineState, Scheduler, Snapshot, Take

__all__ = ["Engine", "EngineSettings", "EngineState", "RequestHandle", "rss_bytes"]

log = logging.getLogger("runtime")


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
        self._source = Source(base, model_path, allow_download, strict)
        # Written by the worker before `_ready` is set, then only read (and cleared by the worker at exit).
        self.plan: ShardPlan | None = None  # the shard plan, in a distributed run
        self.loaded: LoadedModel | None = None
        self.runtime: Runtime | None = None
        self.warnings: list[str] = []
        self._load_error: BaseException | None = None
        self._text_route = False
        self.weights: dict[str, Any] = {}  # whether the text model runs on 16-bit weights (backends.dense)
        self.listeners: list[Callable[[Event], None]] = []  # called with every final event (metrics)
        # The channel between callers and the worker.
        self._queue: queue.Queue[RequestHandle | None] = queue.Queue()
        self._lock = threading.Lock()  # guards the two counters and the set below
        self._pending = 0  # queued, not yet taken by the worker
        self._unfinished = 0  # submitted, final event not yet delivered
        self._live: set[RequestHandle] = set()  # those requests (a lost cluster finishes them from outside)
        self._ready = threading.Event()
        self._serving = threading.Event()
        self._stopping = threading.Event()
        self._hard_stop = threading.Event()
        self._done: threading.Event | None = None
        self._snapshot = Snapshot()  # replaced whole by the worker after each step

    # ----- lifecycle -----
    def start(self, timeout: float | None = None) -> Engine:
        """Start the worker and wait until the model is loaded. Raises the load error."""
        watch = self._cluster.watch if self._cluster is not None else None
        if watch is not None:
            watch.on_lost(self._abandon)
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
        """Stop the worker: cancel (or let finish) in-flight requests, refuse new ones. Safe from any thread."""
        with self._lock:
            self._stopping.set()
        if cancel:
            self._hard_stop.set()  # the worker cancels every active request before its next step
            self._drain("the runtime is shutting down")
        self._queue.put(None)
        if self._done is not None:
            self._done.wait(timeout)

    def _drain(self, error: str | None) -> None:
        """Cancel every request still in the queue (the queue hands each to one taker only)."""
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                return
            if handle is not None:
                with self._lock:
                    self._pending -= 1
                handle.prepared.cleanup()
                self._deliver(handle, unstarted(FinishReason.CANCELLED, error))

    def _abandon(self, error: str) -> None:
        """The cluster is lost while the worker is blocked in a collective (runtime.cluster_watch): finish every
        queued and in-flight request with `cluster_lost` from the calling thread."""
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                break
            if handle is not None:
                with self._lock:
                    self._pending -= 1
                handle.prepared.cleanup()  # never reached the worker: nothing else will
        with self._lock:
            live = list(self._live)
        for handle in live:
            final = unstarted(FinishReason.ERROR, error)
            final.fault = "cluster_lost"
            self._deliver(handle, final)

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and the worker is serving."""
        broken = self._cluster is not None and self._cluster.failure is not None
        return self._serving.is_set() and not self._stopping.is_set() and not broken

    @property
    def idle(self) -> bool:
        """Whether no request is queued or running (unloading would cancel nothing)."""
        with self._lock:
            return self._unfinished == 0

    def _error(self, snapshot: Snapshot) -> str | None:
        if self._load_error is not None:
            return str(self._load_error)
        cluster = self._cluster
        lost = cluster.failure if cluster is not None and self._serving.is_set() else None
        return snapshot.error or lost

    def status(self) -> dict[str, Any]:
        """State (LOADING, READY, BUSY, ERROR, STOPPING), load, memory, caches and warnings."""
        snapshot = self._snapshot
        with self._lock:
            pending, unfinished = self._pending, self._unfinished
        error = self._error(snapshot)
        if error:
            state = EngineState.ERROR
        elif not self._serving.is_set() and not self._stopping.is_set():
            state = EngineState.LOADING
        elif self._stopping.is_set():
            state = EngineState.STOPPING
        else:
            state = EngineState.BUSY if unfinished else EngineState.READY
        plan, cluster = self.plan, self._cluster
        return {
            "state": state,
            "model": self.config.name,
            "backend": self.config.backend,
            "active": snapshot.active,
            "queued": pending,
            "completed": snapshot.completed,
            "batch": snapshot.batch,
            "memory": {"rss": rss_bytes(), **memory_stats()},
            "prefix_cache": dict(snapshot.prefix_cache),
            "vision_cache": dict(snapshot.vision_cache) if snapshot.vision_cache is not None else None,
            "speculative": dict(snapshot.speculative),
            "stats": dict(snapshot.stats),
            "warnings": list(self.warnings),
            "error": error,
            "text_route": self._text_route,
            "weights": dict(self.weights),
            "kv_cache": self._kv_status(),
            "activation_quantization": self.loaded.activation_quantization if self.loaded else None,
            "distributed": {
                **cluster.describe(),
                "strategy": plan.strategy if plan else None,
                "layer_split": list(plan.layer_split) if plan and plan.layer_split else None,
            }
            if cluster is not None
            else None,
        }

    def _kv_status(self) -> dict[str, Any] | None:
        """The KV-cache quantization in use (None: a plain cache)."""
        bits = self.settings.kv_bits
        if bits is None:
            return None
        scheme = self.settings.kv_quant_scheme or "uniform"
        return {
            "bits": bits,
            "scheme": scheme,
            "group_size": self.settings.kv_group_size if scheme == "uniform" else None,
        }

    # ----- requests -----
    def prepare(self, request: GenerationRequest) -> Prepared:
        """Validate, render and route a request on the caller's thread. Raises RequestError."""
        runtime = self.runtime
        if runtime is None:
            raise NotLoaded(self._error(self._snapshot) or "the model is not loaded")
        return prepare(request, runtime)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Prepare and queue a request; returns its handle. Raises RequestError / RuntimeFailure / QueueFull."""
        if self._stopping.is_set():
            raise ShuttingDown("the runtime is shutting down")
        if not self._serving.is_set():
            raise NotLoaded(self._error(self._snapshot) or "the model is not loaded")
        if self._cluster is not None and self._cluster.failure is not None:
            raise ClusterLost(self._cluster.failure)
        prepared = self.prepare(request)
        handle = RequestHandle(prepared)
        with self._lock:
            # Checked again under the lock shutdown() sets it with: a request prepared while the engine was
            # being freed is refused here (the host says the model was unloaded), never queued behind the end.
            if self._stopping.is_set():
                prepared.cleanup()
                raise ShuttingDown("the runtime is shutting down")
            if self._pending >= self.settings.max_queue:
                prepared.cleanup()
                raise QueueFull(f"the runtime is busy ({self._pending} requests queued); retry later")
            if self._cluster is not None and self._cluster.failure is not None:
                prepared.cleanup()  # checked under the lock _abandon reads the live requests with
                raise ClusterLost(self._cluster.failure)
            self._pending += 1
            self._unfinished += 1
            self._live.add(handle)
        self._queue.put(handle)
        if self._done is not None and self._done.is_set():
            self._drain("the runtime is shutting down")  # the worker left while this request was queued
        return handle

    def generate(self, request: GenerationRequest) -> Completion:
        """Submit a request and wait for the whole answer."""
        return self.submit(request).result()

    def _tokenizer_backend(self) -> Any:
        runtime = self.runtime
        if runtime is None:
            raise NotLoaded(self._error(self._snapshot) or "the model is not loaded")
        return runtime.text_backend or runtime.vlm_backend

    def tokenize(self, text: str) -> list[int]:
        """Token ids of text, as the text route encodes a prompt (tokenizers are safe to share across threads)."""
        return list(self._tokenizer_backend().tokenize(text))

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids."""
        return str(self._tokenizer_backend().detokenize(ids))

    # ----- the worker -----
    def _deliver(self, handle: RequestHandle, event: Event) -> None:
        with self._lock:
            if handle.finished.is_set():
                return  # finished already: abandoned (a lost cluster) while the worker was blocked
            if event.done:
                # Before the caller can see the final event: it then sees the engine idle.
                self._unfinished -= 1
                self._live.discard(handle)
            handle._put(event)

    def _publish(self, scheduler: Scheduler) -> None:
        """Publish the snapshot, then deliver the step's events (a caller that got them sees the new state)."""
        self._snapshot = scheduler.snapshot()
        for handle, event in scheduler.take_outbox():
            self._deliver(handle, event)

    def _load(self) -> Scheduler:
        self.settings = kv_settings(self.config, self.settings)  # the config's mlx.kv_cache under the options
        loaded, self.plan = load_model(self.config, self.settings, self._source, self._cluster)
        self.loaded = loaded
        self.weights = densify(loaded, self.settings, self._cluster).to_json()
        decoders, self.runtime, controls = build(self.config, self.settings, loaded, self._cluster)
        self.warnings.extend(loaded.warnings)  # after build, which may add its own (media run one by one)
        # A text route the runtime does not use (drafting or TurboQuant send text to mlx-vlm) is not reported.
        self._text_route = loaded.text_route is not None and self.runtime.text_backend is not None
        return Scheduler(
            decoders,
            self.config,
            controls,
            max_active=self.settings.max_active,
            hard_stop=self._hard_stop,
            listeners=self.listeners,
        )

    def _run(self) -> None:
        try:
            self._work()
        finally:
            if self._cluster is not None and self._cluster.watch is not None:
                self._cluster.watch.forget(self._abandon)

    def _work(self) -> None:
        try:
            scheduler = self._load()
        except BaseException as exc:
            self._load_error = (
                exc if isinstance(exc, GalleryError) else RuntimeFailure(f"{type(exc).__name__}: {exc}")
            )
            self.loaded = None
            self._ready.set()
            return
        self._snapshot = scheduler.snapshot()
        self._serving.set()
        self._ready.set()

        def take(block: bool) -> RequestHandle | Take:
            return self._take(scheduler, block)

        exiting = False
        while True:
            exiting = scheduler.admit(take, exiting)
            scheduler.drop_cancelled()
            if exiting and not scheduler.jobs:
                break
            scheduler.step()
            self._publish(scheduler)
        scheduler.close()
        self._publish(scheduler)
        self._serving.clear()
        self.loaded = self.runtime = None  # drop the model's arrays now, not whenever the engine goes away
        self._drain("the runtime is shutting down")

    def _take(self, scheduler: Scheduler, block: bool) -> RequestHandle | Take:
        """The next queued handle; blocks only when `block` (the worker is idle), pinging a cluster meanwhile."""
        while True:
            cluster = self._cluster
            # A distributed run pings its ranks while idle, so a dead one is noticed (and reported) at once.
            beat = HEARTBEAT_S if block and cluster is not None and cluster.failure is None else None
            if block:
                self._publish(scheduler)
                if self._queue.empty():
                    drop_buffer_cache()  # nothing to do: hold only the weights and the bounded prefix cache
            try:
                handle = self._queue.get(block=block, timeout=beat)
            except queue.Empty:
                if cluster is not None and beat is not None:
                    try:
                        cluster.heartbeat()
                    except ClusterLost as exc:
                        scheduler.error = str(exc)
                    continue
                return Take.EMPTY
            if handle is None:
                return Take.EXIT
            with self._lock:
                self._pending -= 1
            return handle
