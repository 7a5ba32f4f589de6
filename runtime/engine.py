"""The engine: one worker thread owns the model and every MLX array; requests are handed to it.

Callers (the CLI, the gRPC server, the stdio loop) prepare a request on their own thread — normalize
messages, render the pinned template, decode media, so bad input fails before it queues — and get a
RequestHandle that streams Events. The worker admits up to `max_active` requests and advances them
round-robin, one decoding step each, so concurrent streams progress fairly; a cancelled request is
closed before its next step, which frees the worker within one decoding step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from backends import SamplingParams, Step, run_on_mlx_thread
from gallery.config import ModelConfig
from gallery.errors import GalleryError, RuntimeFailure
from runtime.loader import LoadedModel, load
from runtime.media import DecodedMedia, MediaPolicy, decode_media
from runtime.messages import MediaItem
from gallery.errors import RequestError
from runtime.prompt import check_media_allowed, check_media_markers, render_request_prompt, thinking_setting
from runtime.textstream import ReasoningSplitter, StopStringMatcher, ToolCall, ToolCallExtractor

DEFAULT_MAX_TOKENS = 512


class QueueFull(RuntimeFailure):
    """The request queue is full: the caller should retry later (a RuntimeFailure, so existing handlers still catch it)."""


@dataclasses.dataclass
class GenerationRequest:
    """One request: chat messages (rendered with the pinned template) or a raw prompt."""

    messages: Any = None
    prompt: str | None = None
    media: list[MediaItem] = dataclasses.field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    enable_thinking: bool | None = None
    template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    correlation_id: str | None = None


@dataclasses.dataclass
class Usage:
    """Token counts of one request (prompt tokens include expanded image tokens)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass
class Timings:
    """Where the time went, in seconds, plus the backend's rates."""

    queued_s: float = 0.0
    prompt_s: float = 0.0
    generation_s: float = 0.0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0


@dataclasses.dataclass
class Event:
    """A streamed piece of an answer; the last one has done=True and the totals."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: str | None = None
    route: str | None = None


@dataclasses.dataclass
class Completion:
    """A whole answer, aggregated from its events."""

    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    finish_reason: str | None
    usage: Usage
    timings: Timings
    route: str | None


class RequestHandle:
    """The caller's side of one request: iterate its events, or cancel it."""

    _ids = itertools.count(1)

    def __init__(self, prepared: _Prepared) -> None:
        self.id = next(self._ids)
        self.prepared = prepared
        self._events: queue.Queue[Event] = queue.Queue()
        self._cancelled = threading.Event()
        self.finished = threading.Event()
        self._notify: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Stop this request; the worker closes it before its next decoding step."""
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
        """Wait for the whole answer."""
        content, reasoning, calls = [], [], []
        final = Event(done=True)
        for event in self.events():
            content.append(event.content)
            reasoning.append(event.reasoning)
            calls.extend(event.tool_calls)
            final = event
        if final.error:
            raise RuntimeFailure(final.error)
        return Completion("".join(content), "".join(reasoning), calls, final.finish_reason,
                          final.usage or Usage(), final.timings or Timings(), final.route)


@dataclasses.dataclass
class _Prepared:
    prompt: str
    media: DecodedMedia | None
    params: SamplingParams
    stops: list[str]
    thinking: bool
    starts_inside: bool
    tools: list[dict[str, Any]] | None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


_WAKE = object()


class _Call:
    """A function to run on the worker thread, with its result."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class _Job:
    """Worker-side state of one request."""

    def __init__(self, handle: RequestHandle, backend: Any, route: str, config: ModelConfig) -> None:
        self.handle = handle
        self.prepared = handle.prepared
        self.backend = backend
        self.route = route
        self.gen: Iterator[Step] | None = None
        reasoning = config.mlx.reasoning
        tool_calls = config.mlx.tool_calls
        self.stops = StopStringMatcher(self.prepared.stops)
        self.splitter = ReasoningSplitter(
            reasoning.start if reasoning.supported else None,
            reasoning.end if reasoning.supported else None,
            thinking=self.prepared.thinking,
            starts_inside=self.prepared.starts_inside,
        )
        self.tools = ToolCallExtractor(tool_calls.format if self.prepared.tools else None, tool_calls.start,
                                       tool_calls.end, self.prepared.tools)
        self.last: Step | None = None
        self.started = 0.0
        self.first_token_at: float | None = None

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


def _rss_bytes() -> int:
    """Current resident memory of this process."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Engine:
    """Load one config on a worker thread and serve requests against it."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        base: Path | None = None,
        model_path: Path | None = None,
        allow_download: bool = False,
        strict: bool = False,
        max_active: int = 8,
        max_queue: int = 256,
        media_policy: MediaPolicy | None = None,
        max_tokens_limit: int = 32768,
    ) -> None:
        self.config = config
        self._load_args = {"base": base, "model_path": model_path, "allow_download": allow_download, "strict": strict}
        self.max_active = max(1, max_active)
        self.max_queue = max_queue
        self.media_policy = media_policy or MediaPolicy()
        self.max_tokens_limit = max_tokens_limit
        self.loaded: LoadedModel | None = None
        self.warnings: list[str] = []
        self.error: str | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._calls: queue.Queue[_Call] = queue.Queue()
        self._active: list[_Job] = []
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._stopping = threading.Event()
        self._done: threading.Event | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self.completed = 0

    # ----- lifecycle -----
    def start(self, timeout: float | None = None) -> Engine:
        """Start the worker and wait until the model is loaded. Raises the load error."""
        self._done = run_on_mlx_thread(self._run)
        if not self._ready.wait(timeout):
            raise RuntimeFailure(f"{self.config.name}: loading did not finish in {timeout} s")
        if self._load_error is not None:
            raise self._load_error
        for message in self.warnings:
            print(f"runtime: WARNING: {message}", file=sys.stderr)
        return self

    def shutdown(self, *, cancel: bool = True, timeout: float | None = 30.0) -> None:
        """Stop the worker: cancel (or let finish) in-flight requests, refuse new ones."""
        self._stopping.set()
        if cancel:
            with self._lock:
                for job in self._active:
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
        return self.loaded is not None and not self._stopping.is_set()

    def status(self) -> dict[str, Any]:
        """State (LOADING, READY, BUSY, ERROR, STOPPING), load, memory and warnings."""
        if self.error or self._load_error is not None:
            state = "ERROR"
        elif self.loaded is None:
            state = "LOADING"
        elif self._stopping.is_set():
            state = "STOPPING"
        else:
            state = "BUSY" if (self._active or self._pending) else "READY"
        memory: dict[str, int] = {"rss": _rss_bytes()}
        if self.loaded is not None:
            try:
                import mlx.core as mx

                memory["mlx_active"] = int(mx.get_active_memory())
                memory["mlx_peak"] = int(mx.get_peak_memory())
            except (ImportError, AttributeError):
                pass
        return {
            "state": state,
            "model": self.config.name,
            "backend": self.config.backend,
            "active": len(self._active),
            "queued": self._pending,
            "completed": self.completed,
            "memory": memory,
            "warnings": list(self.warnings),
            "error": self.error or (str(self._load_error) if self._load_error else None),
            "text_route": bool(self.loaded and self.loaded.text_route is not None),
        }

    # ----- requests -----
    def _params(self, request: GenerationRequest) -> SamplingParams:
        defaults = self.config.parameters
        max_tokens = request.max_tokens if request.max_tokens is not None else defaults.max_tokens
        max_tokens = DEFAULT_MAX_TOKENS if not max_tokens or max_tokens < 0 else max_tokens
        if max_tokens > self.max_tokens_limit:
            raise RequestError(f"max_tokens {max_tokens} is over this runtime's limit of {self.max_tokens_limit}")
        temperature = request.temperature if request.temperature is not None else defaults.temperature

        def pick(value: Any, default: Any) -> Any:
            return value if value is not None else default

        return SamplingParams(
            max_tokens=int(max_tokens),
            temperature=float(temperature) if temperature is not None else 0.0,
            top_p=pick(request.top_p, defaults.top_p),
            top_k=pick(request.top_k, defaults.top_k),
            min_p=pick(request.min_p, defaults.min_p),
            repeat_penalty=pick(request.repeat_penalty, defaults.repeat_penalty),
            seed=pick(request.seed, defaults.seed),
        )

    def prepare(self, request: GenerationRequest) -> _Prepared:
        """Validate and render a request on the caller's thread. Raises RequestError."""
        if (request.messages is None) == (request.prompt is None):
            raise RequestError("send either messages (chat) or a prompt (raw completion)")
        if request.messages is not None:
            rendered = render_request_prompt(self.config, request.messages, tools=request.tools,
                                             enable_thinking=request.enable_thinking,
                                             template_kwargs=request.template_kwargs)
            prompt, media_items = rendered.text, rendered.media + list(request.media)
            thinking, starts_inside = rendered.thinking, rendered.starts_inside_reasoning
        else:
            if not isinstance(request.prompt, str):
                raise RequestError("prompt must be a string")
            prompt, media_items = request.prompt, list(request.media)
            if len(prompt) > 4 * 1024 * 1024:
                raise RequestError("prompt too large (over 4 MiB)")
            check_media_markers(self.config, prompt, media_items)
            thinking = thinking_setting(self.config, request.enable_thinking)
            reasoning = self.config.mlx.reasoning
            starts_inside = bool(reasoning.supported and reasoning.start and prompt.rstrip().endswith(reasoning.start))
        check_media_allowed(self.config, media_items)
        for stop in request.stop:
            if not isinstance(stop, str):
                raise RequestError("stop strings must be strings")
        params = self._params(request)
        media = decode_media(media_items, self.media_policy) if media_items else None
        stops = list(dict.fromkeys([*self.config.stopwords, *request.stop]))
        return _Prepared(prompt=prompt, media=media, params=params, stops=stops, thinking=thinking,
                         starts_inside=starts_inside, tools=request.tools)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Prepare and queue a request; returns its handle. Raises RequestError / RuntimeFailure."""
        if self._stopping.is_set():
            raise RuntimeFailure("the runtime is shutting down")
        if self.loaded is None:
            raise RuntimeFailure(self.error or "the model is not loaded")
        prepared = self.prepare(request)
        with self._lock:
            if self._pending >= self.max_queue:
                if prepared.media is not None:
                    prepared.media.cleanup()
                raise QueueFull(f"the runtime is busy ({self._pending} requests queued); retry later")
            self._pending += 1
        handle = RequestHandle(prepared)
        self._queue.put(handle)
        return handle

    def generate(self, request: GenerationRequest) -> Completion:
        """Submit a request and wait for the whole answer."""
        return self.submit(request).result()

    def _on_worker(self, fn: Any, timeout: float = 60.0) -> Any:
        """Run fn on the worker thread (tokenizers and MLX state are not shared across threads)."""
        if self.loaded is None or self._done is None or self._done.is_set():
            raise RuntimeFailure(self.error or "the model is not loaded")
        call = _Call(fn)
        self._calls.put(call)
        self._queue.put(_WAKE)
        if not call.done.wait(timeout):
            raise RuntimeFailure("the worker did not answer in time")
        if call.error is not None:
            raise call.error
        return call.value

    def tokenize(self, text: str) -> list[int]:
        """Token ids of text, as the primary backend encodes a prompt."""
        def run() -> list[int]:
            assert self.loaded is not None
            return (self.loaded.text_route or self.loaded.primary).tokenize(text)

        return self._on_worker(run)

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids."""
        def run() -> str:
            assert self.loaded is not None
            return (self.loaded.text_route or self.loaded.primary).detokenize(ids)

        return self._on_worker(run)

    # ----- the worker -----
    def _run(self) -> None:
        try:
            self.loaded = load(self.config, **self._load_args)  # type: ignore[arg-type]
            self.warnings.extend(self.loaded.warnings)
        except BaseException as exc:
            self._load_error = exc if isinstance(exc, GalleryError) else RuntimeFailure(
                f"{type(exc).__name__}: {exc}")
            self.error = str(self._load_error)
            self._ready.set()
            return
        self._ready.set()
        exiting = False
        while True:
            exiting = self._admit(exiting)
            self._run_calls()
            if exiting and not self._active:
                break
            for job in list(self._active):
                if not self._advance(job):
                    with self._lock:
                        self._active.remove(job)
                    self.completed += 1
        self._run_calls()

    def _run_calls(self) -> None:
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                call.value = call.fn()
            except Exception as exc:
                call.error = exc
            call.done.set()

    def _admit(self, exiting: bool) -> bool:
        """Move queued requests into the active set, blocking only while idle. Returns whether to exit when idle."""
        while len(self._active) < self.max_active:
            idle = not self._active and not exiting and self._calls.empty()
            try:
                item = self._queue.get(block=idle)
            except queue.Empty:
                return exiting
            if item is None:
                exiting = True
                continue
            if item is _WAKE:
                return exiting
            assert isinstance(item, RequestHandle)
            with self._lock:
                self._pending -= 1
            if item.cancelled:
                self._finish_unstarted(item, "cancelled", None)
                continue
            with self._lock:
                self._active.append(self._make_job(item))
        return exiting

    def _make_job(self, handle: RequestHandle) -> _Job:
        loaded = self.loaded
        assert loaded is not None
        media = handle.prepared.media
        if media is not None and media.count:
            return _Job(handle, loaded.primary, loaded.primary.name, self.config)
        if loaded.text_route is not None:
            return _Job(handle, loaded.text_route, "text-route", self.config)
        return _Job(handle, loaded.primary, loaded.primary.name, self.config)

    def _finish_unstarted(self, handle: RequestHandle, reason: str, error: str | None) -> None:
        if handle.prepared.media is not None:
            handle.prepared.media.cleanup()
        handle._put(Event(done=True, finish_reason=reason, usage=Usage(), timings=Timings(), error=error))

    def _advance(self, job: _Job) -> bool:
        """One decoding step of a job. False when the job is finished."""
        handle = job.handle
        try:
            if handle.cancelled:
                self._close(job, "cancelled")
                return False
            if job.gen is None:
                job.started = time.perf_counter()
                job.gen = job.backend.generate(job.prepared.prompt, job.prepared.params, self._stop_ids(),
                                               job.prepared.media)
            step = next(job.gen, None)
            if step is None:
                self._close(job, job.last.finish_reason if job.last else "stop")
                return False
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
            job.last = step
            event = job.pipe(step.text)
            if job.stops.stopped:
                self._close(job, "stop", event)
                return False
            if step.finish_reason is not None:
                self._close(job, step.finish_reason, event)
                return False
            if event.content or event.reasoning or event.tool_calls:
                handle._put(event)
            return True
        except Exception as exc:  # one bad request must not take the worker down
            message = exc.args[0] if isinstance(exc, GalleryError) else f"generation failed: {type(exc).__name__}: {exc}"
            self._close(job, "error", error=" ".join(str(message).split())[:500])
            return False

    def _stop_ids(self) -> list[int]:
        return self.config.mlx.stop_token_ids

    def _close(self, job: _Job, reason: str | None, pending: Event | None = None, error: str | None = None) -> None:
        if job.gen is not None:
            with contextlib.suppress(Exception):
                job.gen.close()  # release the generator's KV cache now, not at garbage collection
        tail = job.pipe("", final=True) if error is None and reason != "cancelled" else Event(route=job.route)
        final = pending or Event(route=job.route)
        final.content += tail.content
        final.reasoning += tail.reasoning
        final.tool_calls.extend(tail.tool_calls)
        last = job.last
        now = time.perf_counter()
        first = job.first_token_at or now
        usage = Usage(prompt_tokens=last.prompt_tokens if last else 0, completion_tokens=last.completion_tokens if last else 0)
        if last is None and error is None and job.gen is not None:
            usage.prompt_tokens = self._count_prompt(job)
        finish = "stop" if job.stops.stopped and reason not in ("cancelled", "error") else reason
        if final.tool_calls or (job.tools.calls and reason == "stop"):
            finish = "tool_calls"
        final.done = True
        final.finish_reason = finish
        final.usage = usage
        final.error = error
        final.timings = Timings(
            queued_s=max(job.started - job.prepared.submitted, 0.0) if job.started else now - job.prepared.submitted,
            prompt_s=max(first - job.started, 0.0) if job.started else 0.0,
            generation_s=max(now - first, 0.0),
            prompt_tps=last.prompt_tps if last else 0.0,
            generation_tps=last.generation_tps if last else 0.0,
        )
        if job.prepared.media is not None:
            job.prepared.media.cleanup()
        job.handle._put(final)

    def _count_prompt(self, job: _Job) -> int:
        try:
            return len(job.backend.tokenize(job.prepared.prompt))
        except Exception:
            return 0
