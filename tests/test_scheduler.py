"""The scheduler, the output processor and the engine's threading, on the CPU with a scripted fake decoder.

Everything here is the real runtime code (runtime.scheduler, runtime.output, runtime.engine) and a real
config (the scripted-think fixture: reasoning markers, json tool calls); only the decoder is a fake, because
these tests pin what happens between tokens (admission, cancel at each stage, stop ids and strings split
across tokens, finish reasons, usage), which a real model cannot be made to do on cue.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backends.decoder import (
    DecoderStats,
    DecodeSpec,
    FinishReason,
    Logprob,
    Started,
    TokenEvent,
)
from backends.sampling import SamplingParams
from runtime.handle import RequestHandle
from runtime.prepare import Prepared
from runtime.request import Event, GenerationRequest
from runtime.scheduler import DecoderSet, EngineState, Scheduler, Take

EOS = 0
VOCAB = {
    EOS: "<eos>",
    1: "Hel",
    2: "lo",
    3: " wor",
    4: "ld",
    5: " S",
    6: "TO",
    7: "P!",
    8: "<think>",
    9: "hmm",
    10: "</think>",
    11: '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    12: " ST",
    13: "ART",
}


class _Row:
    def __init__(self, spec: DecodeSpec, prefill: int) -> None:
        self.spec = spec
        self.prefill = prefill
        self.produced = 0


class FakeDecoder:
    """A decoder that plays a script: a request's prompt ids are the answer's tokens, one per step.

    Like the real decoders it detokenizes (VOCAB), reports a stop id as STOP without its text, stops at
    max_tokens with LENGTH, runs the request's processors every step, and spends `prefill` steps on each
    prompt before its first token. `on_step` lets a test act in the middle of a step.
    """

    def __init__(self, *, prefill: int = 0, cached: int = 0) -> None:
        self.rows: OrderedDict[int, _Row] = OrderedDict()
        self.prefill = prefill
        self.cached = cached
        self.added: list[int] = []
        self.cancelled: list[int] = []
        self.steps = 0
        self.resets = 0
        self.closed = False
        self.fail_next = False
        self.on_step: Callable[[FakeDecoder], None] | None = None
        self.gate: threading.Semaphore | None = None  # when set, each step waits for a permit

    def add(self, spec: DecodeSpec) -> Started:
        self.rows[spec.uid] = _Row(spec, self.prefill)
        self.added.append(spec.uid)
        return Started(cached_tokens=self.cached)

    def cancel(self, uid: int) -> None:
        if self.rows.pop(uid, None) is not None:
            self.cancelled.append(uid)

    def busy(self) -> bool:
        return bool(self.rows)

    def step(self) -> list[TokenEvent]:
        if self.gate is not None:
            self.gate.acquire()
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the batch broke")
        out: list[TokenEvent] = []
        for uid, row in list(self.rows.items()):
            if row.prefill:
                row.prefill -= 1
                continue
            spec = row.spec
            for processor in spec.processors:
                processor(None, None)
            token = spec.prompt[row.produced] if row.produced < len(spec.prompt) else EOS
            row.produced += 1
            is_stop = token in spec.stops
            finish = (
                FinishReason.STOP
                if is_stop
                else FinishReason.LENGTH
                if row.produced >= spec.max_tokens
                else None
            )
            text = "" if is_stop else VOCAB[token]
            logprobs = None
            if spec.logprobs is not None and not is_stop:
                logprobs = Logprob(VOCAB[token], token, -0.5, ())
            out.append(TokenEvent(uid, token, text=text, finish=finish, logprob=-0.5, logprobs=logprobs))
            if finish is not None:
                del self.rows[uid]
        return out

    def stats(self) -> DecoderStats:
        return DecoderStats(active=len(self.rows))

    def reset(self) -> None:
        self.resets += 1
        self.rows.clear()

    def close(self) -> None:
        self.closed = True
        self.rows.clear()


def _prepared(
    answer: list[int],
    *,
    stops: list[str] | None = None,
    max_tokens: int = 32,
    tools: list[dict[str, Any]] | None = None,
    logprobs: int | None = None,
    thinking: bool = False,
    ignore_eos: bool = False,
) -> Prepared:
    return Prepared(
        route="text",
        prompt_text="",
        prompt_ids=list(answer),
        media=None,
        params=SamplingParams(),
        max_tokens=max_tokens,
        stop_ids=frozenset() if ignore_eos else frozenset({EOS}),
        stops=list(stops or []),
        thinking=thinking,
        starts_inside=False,
        tools=tools,
        logprobs=logprobs,
        grammar=None,
        thinking_budget=None,
        speculative=False,
    )


@pytest.fixture(scope="module")
def config(scripted_think_model: Path):  # type: ignore[no-untyped-def]
    from importers import import_model

    return import_model(str(scripted_think_model)).config


def _no_controls(_recipe: Any, _route: Any) -> tuple[None, list[Any]]:
    return None, []


class Harness:
    """A scheduler over fake decoders, with a queue of handles, driven step by step like the engine's loop."""

    def __init__(
        self, config: Any, *, max_active: int = 8, controls: Any = _no_controls, **fake: Any
    ) -> None:
        self.batch = FakeDecoder(**fake)
        self.vlm = FakeDecoder(**fake)
        self.hard_stop = threading.Event()
        self.finals: list[Event] = []
        self.scheduler = Scheduler(
            DecoderSet(batch=self.batch, vlm=self.vlm),
            config,
            controls,
            max_active=max_active,
            hard_stop=self.hard_stop,
            listeners=[self.finals.append],
        )
        self.queue: list[RequestHandle] = []
        self.events: dict[int, list[Event]] = {}

    def submit(self, prepared: Prepared) -> RequestHandle:
        handle = RequestHandle(prepared)
        self.queue.append(handle)
        self.events[handle.id] = []
        return handle

    def _take(self, _block: bool) -> RequestHandle | Take:
        return self.queue.pop(0) if self.queue else Take.EMPTY

    def tick(self) -> None:
        """One turn of the engine's loop: admit, drop cancelled, step, deliver."""
        self.scheduler.admit(self._take, False)
        self.scheduler.drop_cancelled()
        self.scheduler.step()
        self.deliver()

    def deliver(self) -> None:
        for handle, event in self.scheduler.take_outbox():
            self.events[handle.id].append(event)
            handle._put(event)

    def run(self, limit: int = 100) -> None:
        for _ in range(limit):
            if not self.queue and not self.scheduler.jobs:
                return
            self.tick()
        raise AssertionError("the scheduler did not finish")

    def final(self, handle: RequestHandle) -> Event:
        events = self.events[handle.id]
        done = [e for e in events if e.done]
        assert len(done) == 1 and events[-1].done, events
        return done[0]

    def content(self, handle: RequestHandle) -> str:
        return "".join(e.content for e in self.events[handle.id])


# ----------------------------------------------------------------------------------------------- admission
def test_requests_start_in_arrival_order_and_never_more_than_max_active(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config, max_active=2)
    handles = [h.submit(_prepared([1, 2, EOS])) for _ in range(5)]
    most = 0
    for _ in range(50):
        if not h.queue and not h.scheduler.jobs:
            break
        h.tick()
        most = max(most, len(h.batch.rows))
    assert h.batch.added == [handle.id for handle in handles]
    assert most == 2
    assert all(h.final(handle).finish_reason == "stop" for handle in handles)


def test_every_active_request_advances_one_token_per_step(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config, max_active=3)
    long = h.submit(_prepared([1] * 30))
    short = h.submit(_prepared([2, 2, EOS]))
    later = h.submit(_prepared([3] * 30))
    for _ in range(3):
        h.tick()
    # Three steps: one token each; the short one ended on its stop id and the third was admitted at once.
    assert [len(h.events[x.id]) for x in (long, later)] == [3, 3]
    assert h.final(short).finish_reason == "stop" and h.final(short).usage.completion_tokens == 3
    waiting = h.submit(_prepared([4, EOS]))
    h.tick()
    assert waiting.id in h.batch.added  # a freed slot is filled before the next step, not after the long ones
    assert [len(h.events[x.id]) for x in (long, later)] == [4, 4]


def test_media_and_text_requests_run_on_their_own_decoders(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    text = h.submit(_prepared([1, EOS]))
    media = _prepared([2, EOS])
    media.route = "vlm"
    image = h.submit(media)
    h.run()
    assert h.batch.added == [text.id] and h.vlm.added == [image.id]
    assert (h.final(text).route, h.final(image).route) == ("mlx", "mlx-vlm")


# ----------------------------------------------------------------------------------------------- cancel
def test_cancel_while_queued_never_reaches_a_decoder(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    handle = h.submit(_prepared([1, 2, EOS]))
    handle.cancel()
    h.run()
    final = h.final(handle)
    assert final.finish_reason == "cancelled" and final.usage.completion_tokens == 0
    assert h.batch.added == [] and h.finals == []  # listeners see requests that ran


def test_cancel_while_prefilling_drops_it_from_the_decoder(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config, prefill=3)
    handle = h.submit(_prepared([1, 2, EOS]))
    h.tick()
    assert h.batch.added == [handle.id] and h.events[handle.id] == []
    handle.cancel()
    h.run()
    final = h.final(handle)
    assert final.finish_reason == "cancelled" and final.usage.completion_tokens == 0
    assert h.batch.cancelled == [handle.id] and not h.batch.rows


def test_cancel_while_decoding_keeps_what_was_sent_and_flushes_nothing(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    handle = h.submit(_prepared([1, 2, 12, 3, 4, EOS], stops=[" STOP"]))
    h.tick()
    h.tick()
    h.tick()  # " ST" is held back: it may start the stop string
    handle.cancel()
    h.run()
    final = h.final(handle)
    assert final.finish_reason == "cancelled" and final.error is None
    assert h.content(handle) == "Hello" and final.usage.completion_tokens == 3
    assert h.batch.cancelled == [handle.id]


def test_cancel_landing_while_the_request_finishes_ends_it_once_with_its_own_reason(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    handle = h.submit(_prepared([1, EOS]))
    h.tick()

    def cancel_now(_decoder: FakeDecoder) -> None:
        handle.cancel()  # the caller cancels while the step that ends the request runs

    h.batch.on_step = cancel_now
    h.run()
    assert h.final(handle).finish_reason == "stop" and h.batch.cancelled == []


def test_shutdown_cancels_every_active_request(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    handles = [h.submit(_prepared([1] * 20)) for _ in range(3)]
    h.tick()
    h.hard_stop.set()
    h.scheduler.drop_cancelled()
    h.deliver()
    assert [h.final(x).finish_reason for x in handles] == ["cancelled"] * 3
    assert sorted(h.batch.cancelled) == sorted(x.id for x in handles)


# ----------------------------------------------------------------------------------------------- stops
def test_a_stop_id_ends_the_answer_without_its_text_or_logprob(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    handle = h.submit(_prepared([1, 2, EOS, 3], logprobs=0))
    h.run()
    final = h.final(handle)
    assert h.content(handle) == "Hello" and final.finish_reason == "stop"
    assert [lp.id for e in h.events[handle.id] for lp in e.logprobs] == [1, 2]
    assert final.usage.completion_tokens == 3  # the stop token was generated, and is counted


def test_ignore_eos_runs_to_the_token_limit(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    handle = h.submit(_prepared([1, 2, EOS, 3, 4], ignore_eos=True, max_tokens=4))
    h.run()
    final = h.final(handle)
    assert final.finish_reason == "length" and final.usage.completion_tokens == 4
    assert h.content(handle) == "Hello<eos> wor"


def test_a_stop_string_split_across_tokens_is_never_sent_and_ends_the_request(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    handle = h.submit(_prepared([1, 2, 5, 6, 7, 3, 4, EOS], stops=["STOP"]))
    h.run()
    final = h.final(handle)
    pieces = [e.content for e in h.events[handle.id]]
    assert h.content(handle) == "Hello " and not any("S" in piece for piece in pieces)
    assert final.finish_reason == "stop" and final.usage.completion_tokens == 5
    assert h.batch.cancelled == [handle.id]  # the decoder would have gone on: it is told to stop


def test_a_partial_stop_string_that_does_not_complete_is_sent_in_full(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    handle = h.submit(_prepared([1, 2, 12, 13, EOS], stops=[" STOP"]))
    h.run()
    assert h.content(handle) == "Hello START" and h.final(handle).finish_reason == "stop"
    assert h.batch.cancelled == []


def test_a_stop_string_held_back_at_the_token_limit_is_flushed(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    handle = h.submit(_prepared([1, 2, 12], stops=[" STOP"], max_tokens=3))
    h.run()
    assert h.content(handle) == "Hello ST" and h.final(handle).finish_reason == "length"


# ----------------------------------------------------------------------------------------------- finish, usage
def test_reasoning_is_split_and_counted(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config, cached=2)
    handle = h.submit(_prepared([8, 9, 10, 1, 2, EOS], thinking=True))
    h.run()
    final = h.final(handle)
    assert "".join(e.reasoning for e in h.events[handle.id]) == "hmm"
    assert h.content(handle) == "Hello"
    usage = final.usage
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (6, 2, 6)
    assert usage.reasoning_tokens >= 2
    assert final.seed is None  # greedy
    stats = h.scheduler.snapshot().stats
    assert (
        stats["finished"] == {"stop": 1} and stats["completion_tokens"] == 6 and stats["cached_tokens"] == 2
    )


def test_a_tool_call_finishes_with_tool_calls(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    handle = h.submit(_prepared([1, 11, EOS], tools=tools))
    h.run()
    final = h.final(handle)
    calls = [call for e in h.events[handle.id] for call in e.tool_calls]
    assert final.finish_reason == "tool_calls" and [c.name for c in calls] == ["get_weather"]


def test_finish_reasons_are_the_wire_strings(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    handle = h.submit(_prepared([1, 2], max_tokens=2))
    h.run()
    reason = h.final(handle).finish_reason
    assert reason == "length" and isinstance(reason, str) and f"{reason}" == "length"
    assert [r.value for r in FinishReason] == ["stop", "length", "tool_calls", "cancelled", "error"]
    assert EngineState.READY == "READY" and str(EngineState.BUSY) == "BUSY"


def test_a_failed_step_fails_only_that_decoders_requests_and_resets_it(config) -> None:  # type: ignore[no-untyped-def]
    h = Harness(config)
    text = h.submit(_prepared([1] * 10))
    media = _prepared([2, 2, EOS])
    media.route = "vlm"
    image = h.submit(media)
    h.tick()
    h.batch.fail_next = True
    h.run()
    assert h.final(text).finish_reason == "error" and "RuntimeError: the batch broke" in h.final(text).error
    assert h.final(image).finish_reason == "stop" and h.batch.resets == 1 and h.vlm.resets == 0
    after = h.submit(_prepared([3, EOS]))
    h.run()
    assert h.final(after).finish_reason == "stop"  # the engine keeps serving


def test_a_failing_processor_fails_only_its_request(config) -> None:  # type: ignore[no-untyped-def]
    def broken(_tokens: Any, _logits: Any) -> Any:
        raise ValueError("bad bias")

    def controls(recipe: Any, _route: Any) -> tuple[None, list[Any]]:
        return None, [broken] if recipe.prompt[0] == 3 else []

    h = Harness(config, controls=controls)
    good = h.submit(_prepared([1, 2, EOS]))
    bad = h.submit(_prepared([3, 4, EOS]))
    h.run()
    assert h.final(good).finish_reason == "stop"
    assert h.final(bad).finish_reason == "error" and "ValueError: bad bias" in h.final(bad).error
    assert h.batch.cancelled == [bad.id]


def test_a_request_that_cannot_start_fails_alone(config) -> None:  # type: ignore[no-untyped-def]
    def controls(recipe: Any, _route: Any) -> tuple[None, list[Any]]:
        if recipe.prompt[0] == 3:
            raise ValueError("no grammar")
        return None, []

    h = Harness(config, controls=controls)
    bad = h.submit(_prepared([3, EOS]))
    good = h.submit(_prepared([1, EOS]))
    h.run()
    assert h.final(bad).finish_reason == "error" and "failed to start" in h.final(bad).error
    assert h.final(good).finish_reason == "stop"


# ----------------------------------------------------------------------------------------------- threads
def _fake_engine(config: Any, decoder: FakeDecoder, **settings: Any) -> Any:
    from runtime.engine import Engine, EngineSettings

    class FakeEngine(Engine):
        def _load(self) -> Scheduler:
            return Scheduler(
                DecoderSet(batch=decoder),
                self.config,
                _no_controls,
                max_active=self.settings.max_active,
                hard_stop=self._hard_stop,
                listeners=self.listeners,
            )

        def prepare(self, request: GenerationRequest) -> Prepared:
            return _prepared([1, 2, 3, 4] * 5 + [EOS])

    return FakeEngine(config, settings=EngineSettings(**settings)).start()


def test_status_and_shutdown_from_many_threads_while_requests_run(config) -> None:  # type: ignore[no-untyped-def]
    decoder = FakeDecoder()
    decoder.gate = threading.Semaphore(0)
    engine = _fake_engine(config, decoder, max_active=4)
    handles = [engine.submit(GenerationRequest(prompt="x")) for _ in range(12)]
    errors: list[BaseException] = []
    states: set[str] = set()
    go = threading.Event()

    def hammer_status() -> None:
        go.wait()
        try:
            for _ in range(300):
                status = engine.status()
                states.add(status["state"])
                assert status["active"] <= 4 and status["queued"] >= 0
        except BaseException as exc:  # reported below
            errors.append(exc)

    def stop() -> None:
        go.wait()
        try:
            engine.shutdown(timeout=60)
        except BaseException as exc:  # reported below
            errors.append(exc)

    readers = [threading.Thread(target=hammer_status) for _ in range(4)]
    stoppers = [threading.Thread(target=stop) for _ in range(3)]
    for thread in readers:
        thread.start()
    go.set()
    decoder.gate.release(25)  # let some steps run while the readers read
    for thread in stoppers:
        thread.start()
    while engine.status()["state"] != "STOPPING":  # requests are still running (the worker waits for permits)
        threading.Event().wait(0.001)
    decoder.gate.release(10_000)
    for thread in readers + stoppers:
        thread.join(60)
    assert not errors, errors
    finals = []
    for handle in handles:
        events = list(handle.events(timeout=30))
        assert sum(e.done for e in events) == 1
        finals.append(events[-1].finish_reason)
    assert set(finals) <= {"stop", "cancelled"} and "cancelled" in finals
    assert states <= {"READY", "BUSY", "STOPPING"}
    assert engine.idle and engine.status()["state"] == "STOPPING" and not engine.ready
    assert decoder.closed and engine.loaded is None


def test_status_reflects_a_request_as_soon_as_its_answer_arrives(config) -> None:  # type: ignore[no-untyped-def]
    engine = _fake_engine(config, FakeDecoder())
    try:
        for _ in range(20):
            completion = engine.generate(GenerationRequest(prompt="x"))
            status = engine.status()
            assert completion.finish_reason == "stop"
            assert status["state"] == "READY" and status["active"] == 0 and status["queued"] == 0
            assert engine.idle
        assert engine.status()["completed"] == 20
        assert engine.status()["stats"]["finished"] == {"stop": 20}
    finally:
        engine.shutdown()
