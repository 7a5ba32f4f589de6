"""The scheduler: admission, routing, start, cancel, one step of every decoder, failure of a decoder.

It runs on the engine's worker thread only, and owns what it keeps there: the active requests (`Job`s) and
the decoders (backends.decoder.Decoder — it never asks which kind). Requests arrive through the engine's
queue (`admit`), start on the decoder of their route, advance one token per step, and leave when they end,
are cancelled (between steps, at any stage: queued, prefilling, decoding) or fail. Their final events and
every piece of output go to an outbox the engine delivers after publishing a `Snapshot`, the only view of
this state other threads get.

Per-request state lives with the request: sampler, processors, stop set, seed. A processor or sampler that
fails marks only its own request as failed; a failure of a whole decoder step fails that decoder's
requests, resets the random state and the decoder, and the engine keeps serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
from collections.abc import Callable
from typing import Protocol

from backends.decoder import (
    CacheInfo,
    Decoder,
    DecodeSpec,
    FinishReason,
    Processor,
    Sampler,
    TokenEvent,
    failure_text,
)
from backends.sampling import recover_random_state
from gallery.config import ModelConfig
from runtime.controls import Guarded, Recipe
from runtime.errors import ClusterLost
from runtime.handle import RequestHandle
from runtime.output import OutputProcessor, unstarted
from runtime.prepare import Prepared, Route
from runtime.request import Event

# (sampler or None for greedy, logits processors) for one request on one route (runtime.controls).
Controls = Callable[[Recipe, Route], tuple[Sampler | None, list[Processor]]]


class EngineState(str, enum.Enum):
    """What Status reports for an engine."""

    LOADING = "LOADING"
    READY = "READY"
    BUSY = "BUSY"
    ERROR = "ERROR"
    STOPPING = "STOPPING"

    def __str__(self) -> str:
        return self.value


class Describes(Protocol):
    """A cache that can say what it holds (the text routes' shared prefix cache)."""

    def describe(self) -> CacheInfo:
        """Entries, bytes and counters."""


@dataclasses.dataclass
class DecoderSet:
    """The decoders of one loaded model, by role."""

    batch: Decoder | None = None  # the continuous text batch (or its mirror across ranks)
    streams: Decoder | None = (
        None  # per-request text streams: a draft model, a quantized KV cache, no batching
    )
    vlm: Decoder | None = None  # mlx-vlm: media, and text on VLMs that route text there
    text_cache: Describes | None = None  # the prefix cache the text decoders share

    def all(self) -> list[Decoder]:
        """The decoders that exist, in stepping order."""
        return [d for d in (self.batch, self.streams, self.vlm) if d is not None]

    def route(self, prepared: Prepared) -> Decoder | None:
        """The decoder a prepared request runs on."""
        if prepared.route == "vlm":
            return self.vlm
        if self.batch is not None and not prepared.speculative:
            return self.batch
        return self.streams


class Take(enum.Enum):
    """What the engine's queue gave the scheduler instead of a request."""

    EMPTY = "empty"  # nothing waiting (and the worker was busy, so it did not wait)
    EXIT = "exit"  # the engine is shutting down: finish what runs, then exit


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


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the worker knows, as of its last step: published whole, read by any thread, never changed."""

    active: int = 0
    batch: int = 0
    completed: int = 0
    prefix_cache: dict[str, CacheInfo] = dataclasses.field(default_factory=dict)
    vision_cache: CacheInfo | None = None  # the media feature cache (VLMs)
    speculative: dict[str, int | float] = dataclasses.field(default_factory=dict)
    stats: dict[str, object] = dataclasses.field(default_factory=dict)
    error: str | None = None


class Job:
    """Worker-side state of one active request: its handle, its decoder, its output processor."""

    def __init__(self, handle: RequestHandle, decoder: Decoder | None, output: OutputProcessor) -> None:
        self.handle = handle
        self.prepared = handle.prepared
        self.uid = handle.id
        self.decoder = decoder
        self.output = output
        self.failure: str | None = None

    def fail(self, reason: str) -> None:
        """Mark this request failed (its sampler or a processor raised); the worker closes it after the step."""
        self.failure = self.failure or reason


class Scheduler:
    """Admits, routes, starts, steps and ends requests over a DecoderSet (see the module docstring)."""

    def __init__(
        self,
        decoders: DecoderSet,
        config: ModelConfig,
        controls: Controls,
        *,
        max_active: int,
        hard_stop: threading.Event,
        listeners: list[Callable[[Event], None]] | None = None,
    ) -> None:
        self.decoders = decoders
        self.config = config
        self.controls = controls
        self.max_active = max_active
        self.hard_stop = hard_stop
        self.listeners = listeners if listeners is not None else []
        self.jobs: dict[int, Job] = {}
        self.stats = EngineStats()
        self.completed = 0
        self.error: str | None = None  # set when the whole engine is broken (a distributed rank lost)
        self.outbox: list[tuple[RequestHandle, Event]] = []

    # ----- admission -----
    def admit(self, take: Callable[[bool], RequestHandle | Take], exiting: bool) -> bool:
        """Start queued requests in arrival order while there is room; returns whether to exit when idle.

        `take(block)` gives the next handle from the engine's queue, or a `Take`; it is asked to block only
        while the worker has nothing else to do.
        """
        while len(self.jobs) < self.max_active:
            handle = take(not self.jobs and not exiting)
            if handle is Take.EMPTY:
                return exiting
            if handle is Take.EXIT:
                exiting = True
                continue
            assert isinstance(handle, RequestHandle)
            if handle.cancelled:
                self.finish_unstarted(handle, FinishReason.CANCELLED, None)
                continue
            self.start(handle)
        return exiting

    def finish_unstarted(self, handle: RequestHandle, reason: FinishReason, error: str | None) -> None:
        """End a request that never started."""
        handle.prepared.cleanup()
        self.outbox.append((handle, unstarted(reason, error)))

    def start(self, handle: RequestHandle) -> None:
        """Route a request to its decoder and add it there (a failure to start ends only this request)."""
        prepared = handle.prepared
        decoder = self.decoders.route(prepared)
        job = Job(handle, decoder, OutputProcessor(prepared, self.config))
        self.stats.requests += 1
        self.jobs[job.uid] = job
        try:
            if decoder is None:
                raise RuntimeError(f"no decoder serves the {prepared.route} route")
            started = decoder.add(self._spec(job))
        except Exception as exc:
            self._close(job, FinishReason.ERROR, error=f"generation failed to start: {failure_text(exc)}")
            return
        job.output.cached_tokens = started.cached_tokens

    def _spec(self, job: Job) -> DecodeSpec:
        prepared, handle = job.prepared, job.handle
        recipe = Recipe(
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
        sampler, processors = self.controls(recipe, prepared.route)
        media = prepared.media
        hard_stop = self.hard_stop
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
            should_stop=lambda: handle.cancelled or hard_stop.is_set(),
            wire=recipe.to_json,
        )

    # ----- stepping -----
    def drop_cancelled(self) -> None:
        """Drop every request cancelled since the last step (all of them when the engine shuts down)."""
        stopping = self.hard_stop.is_set()
        for job in list(self.jobs.values()):
            if stopping or job.handle.cancelled:
                if job.decoder is not None:
                    job.decoder.cancel(job.uid)
                self._close(job, FinishReason.CANCELLED)

    def step(self) -> None:
        """One step of every busy decoder; each token event goes through its request's output processor."""
        for decoder in self.decoders.all():
            if not decoder.busy():
                continue
            try:
                tokens = decoder.step()
            except Exception as exc:  # a whole step failed: fail its requests, keep serving
                self.fail_decoder(decoder, exc)
                continue
            if decoder is self.decoders.batch:
                self.stats.batch_steps += 1
                self.stats.batch_rows += len(tokens)
            for token in tokens:
                job = self.jobs.get(token.uid)
                if job is not None:
                    self._on_token(job, token)
        for job in list(self.jobs.values()):
            if job.failure is not None:
                if job.decoder is not None:
                    job.decoder.cancel(job.uid)
                self._close(job, FinishReason.ERROR, error=f"generation failed: {job.failure}")

    def fail_decoder(self, decoder: Decoder, exc: Exception) -> None:
        """A decoder's whole step raised: end its requests and reset it (all requests, if the cluster is lost)."""
        if isinstance(exc, ClusterLost):
            # The ranks can no longer be kept in step: fail everything, stay up reporting the error.
            self.error = str(exc)
            for job in list(self.jobs.values()):
                self._close(job, FinishReason.ERROR, error=str(exc), fault="cluster_lost")
            return
        message = f"generation failed: {failure_text(exc)}"
        for job in [job for job in self.jobs.values() if job.decoder is decoder]:
            self._close(job, FinishReason.ERROR, error=message)
        recover_random_state()
        decoder.reset()

    def _on_token(self, job: Job, token: TokenEvent) -> None:
        outcome = job.output.on_token(token)
        if outcome.finish is None:
            if outcome.event is not None and outcome.event.has_output:
                self.outbox.append((job.handle, outcome.event))
            return
        if outcome.cut and job.decoder is not None:
            job.decoder.cancel(job.uid)
        self._close(job, outcome.finish, outcome.event, outcome.error)

    def _close(
        self,
        job: Job,
        reason: FinishReason,
        pending: Event | None = None,
        error: str | None = None,
        fault: str | None = None,
    ) -> None:
        self.jobs.pop(job.uid, None)
        final = job.output.finish(reason, pending, error)
        final.fault = fault
        job.prepared.cleanup()
        self.completed += 1
        stats, usage, finish = self.stats, final.usage, final.finish_reason
        assert usage is not None and finish is not None
        key = str(finish)  # the wire string: Status and metrics show plain names
        stats.finished[key] = stats.finished.get(key, 0) + 1
        stats.prompt_tokens += usage.prompt_tokens
        stats.cached_tokens += usage.cached_tokens
        stats.completion_tokens += usage.completion_tokens
        for listener in self.listeners:
            with contextlib.suppress(Exception):  # metrics must never take a request down
                listener(final)
        self.outbox.append((job.handle, final))

    def take_outbox(self) -> list[tuple[RequestHandle, Event]]:
        """The events to deliver, in order (emptied)."""
        out, self.outbox = self.outbox, []
        return out

    # ----- the view other threads get -----
    def snapshot(self) -> Snapshot:
        """An immutable copy of what Status reports."""
        decoders = self.decoders
        caches: dict[str, CacheInfo] = {}
        if decoders.text_cache is not None:
            caches["text"] = decoders.text_cache.describe()
        drafted = accepted = proposed = batch = 0
        solo: dict[str, int] = {}
        features: CacheInfo | None = None
        for decoder in decoders.all():
            stats = decoder.stats()
            features = stats.features or features
            if decoder is decoders.batch:
                batch = stats.active
                solo = {"solo_tokens": stats.solo_tokens, "handovers": stats.handovers}
            drafted, accepted, proposed = (
                drafted + stats.drafted,
                accepted + stats.accepted,
                proposed + stats.proposed,
            )
            if stats.cache is not None:
                caches[stats.cache[0]] = stats.cache[1]
        draft: dict[str, int | float] = {}
        if drafted:
            draft = {
                "draft_tokens": drafted,
                "accepted": accepted,
                "acceptance": round(accepted / drafted, 4),
            }
            if proposed:
                draft["proposed"] = proposed  # drafts offered (mlx-vlm counts them per round)
        return Snapshot(
            active=len(self.jobs),
            batch=batch,
            completed=self.completed,
            prefix_cache=caches,
            vision_cache=features,
            speculative=draft,
            stats={
                **vars(self.stats),
                **solo,
                "finished": dict(self.stats.finished),
            },  # a copy: asdict is slow per step
            error=self.error,
        )

    def close(self) -> None:
        """Release every decoder (the worker is exiting)."""
        for decoder in self.decoders.all():
            decoder.close()
