"""Media requests decode in one mlx-vlm batch without changing an answer; the feature cache runs a tower once per
media and never serves another media's features; a cancelled media prompt stops between its chunks.

Real parts: the tiny fixture models (`scripted-vlm` and `vlm-qwen2vl`: Qwen2-VL with mRoPE, images and video;
`vlm-gemma4-audio`: Gemma 4's layout with its audio tower and real processor; `vlm-qwen35-mtp` without its
drafter: Qwen 3.5's hybrid linear-attention layers), media made here (PNG with PIL,
WAV with the stdlib, MP4 with OpenCV), the real engine, and prometheus_client rendering /metrics. The old path
(one mlx-vlm generator per request, in turn; load option `media_batching: false`) is the reference: greedy
output alone on it = alone on the batch = inside a batch with other media and text requests, byte for byte.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_media_paths import _mp4, _tone, _wav

pytestmark = [
    pytest.mark.mlx,
    pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values:UserWarning"),
]


def _engine(folder: Path, text_route: str | None = None, **settings: Any) -> Any:
    from importers import import_model
    from runtime.engine import Engine, EngineSettings

    config = import_model(str(folder)).config
    if text_route is not None:
        config = config.model_copy(update={"mlx": config.mlx.model_copy(update={"text_route": text_route})})
    if config.mlx.speculative.mtp:  # the MTP fixture without its drafter: a hybrid (linear-attention) VLM
        speculative = config.mlx.speculative.model_copy(update={"mtp": False, "draft_kind": None})
        config = config.model_copy(update={"mlx": config.mlx.model_copy(update={"speculative": speculative})})
    return Engine(config, settings=EngineSettings(**settings)).start()


def _png(color: tuple[int, int, int], size: int = 64) -> dict[str, Any]:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def _audio(seconds: float, hz: float) -> dict[str, Any]:
    data = base64.b64encode(_wav(_tone(seconds, hz))).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def _video(tmp_path: Path, frames: int) -> dict[str, Any]:
    url = "data:video/mp4;base64," + base64.b64encode(_mp4(tmp_path, frames=frames, size=56)).decode()
    return {"type": "video_url", "video_url": {"url": url}}


def _request(text: str, *media: dict[str, Any], **fields: Any) -> Any:
    from runtime.request import GenerationRequest

    content: Any = [*media, {"type": "text", "text": text}] if media else text
    fields.setdefault("max_tokens", 8)
    fields.setdefault("temperature", 0.0)
    return GenerationRequest(messages=[{"role": "user", "content": content}], logprobs=True, **fields)


def _answer(completion: Any) -> tuple[str, list[int], str | None, int]:
    return (
        completion.content,
        [t.id for t in completion.logprobs],
        completion.finish_reason,
        completion.usage.prompt_tokens,
    )


def _requests(kind: str, tmp_path: Path) -> list[Any]:
    """Media requests of one kind (each with its own media and length), plus two text-only ones."""
    texts = ["hi", "tell me a story about the sea and the river", "why", "seven cats and dogs", "a " * 12]
    if kind == "image":
        media = [_png((i * 40, 120, 220 - i * 30)) for i in range(5)]
    elif kind == "audio":
        media = [_audio(0.3 + 0.2 * i, 220.0 + 90 * i) for i in range(5)]
    else:
        media = [_video(tmp_path, frames) for frames in (4, 8, 12, 8, 4)]
        media[3] = _png((10, 200, 30))  # an image among the clips
    out = [
        _request(text, part, max_tokens=5 + 2 * i)
        for i, (text, part) in enumerate(zip(texts, media, strict=True))
    ]
    out.insert(2, _request("hello there", max_tokens=6))
    out.append(_request("and you?", max_tokens=9))
    return out


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("scripted-vlm", "image"),
        ("vlm-qwen2vl", "image"),
        ("vlm-qwen2vl", "video"),
        ("vlm-gemma4-audio", "audio"),
        ("vlm-qwen35-mtp", "image"),
    ],
)
def test_a_media_request_alone_equals_its_output_inside_a_batch_and_on_the_old_path(
    fixture_models: dict[str, Path], model: str, kind: str, tmp_path: Path
) -> None:
    requests = _requests(kind, tmp_path)
    old = _engine(fixture_models[model], prefix_cache=False, media_batching=False)
    try:
        reference = [_answer(old.generate(r)) for r in requests]
        assert old.status()["prefix_cache"]["vlm"]["batched"] == 0
    finally:
        old.shutdown()
    engine = _engine(fixture_models[model], prefix_cache=False)
    try:
        alone = [_answer(engine.generate(r)) for r in requests]
        handles = [engine.submit(r) for r in requests]
        together = [_answer(h.result()) for h in handles]
        vlm = engine.status()["prefix_cache"]["vlm"]
        features = engine.status()["vision_cache"]
    finally:
        engine.shutdown()
    assert alone == reference  # the batch path alone = the old per-request path
    assert together == alone  # and inside a batch with other media and text requests
    assert len({a[0] for a in alone}) > 1 or model == "scripted-vlm"  # the answers depend on the media
    assert vlm["batching"] and vlm["sent_to_streams"] == 0 and vlm["batched"] >= 10
    assert vlm["batch_rows"] > vlm["batch_steps"]  # rows really decoded together
    # Each distinct media ran its tower once (a miss); every other time it came from the feature cache.
    distinct = 4 if kind == "video" else 5  # two of the clips are the same 4 frames
    assert (features["misses"], features["hits"]) == (distinct, 10 - distinct)


def test_sampling_and_log_probabilities_stay_per_request_inside_the_batch(
    fixture_models: dict[str, Path],
) -> None:
    requests = [
        _request("describe it", _png((200, 30, 30)), temperature=1.0, seed=11, top_p=0.9, max_tokens=10),
        _request("what is this", _png((30, 200, 30)), max_tokens=10, top_logprobs=3),
        _request("and this", _png((30, 30, 200)), temperature=0.8, seed=5, max_tokens=10, top_logprobs=2),
        _request("tell me", _png((90, 90, 90)), max_tokens=10, frequency_penalty=1.5, logit_bias={5: 3.0}),
    ]
    engine = _engine(fixture_models["vlm-qwen2vl"], prefix_cache=False)
    try:
        alone = [engine.generate(r) for r in requests]
        together = [h.result() for h in [engine.submit(r) for r in requests]]
    finally:
        engine.shutdown()

    def shape(completion: Any) -> list[Any]:
        return [
            (t.id, round(t.logprob, 4), [(i, round(lp, 4)) for _, i, lp in t.top])
            for t in completion.logprobs
        ]

    for single, batched in zip(alone, together, strict=True):
        assert shape(single) == shape(batched) and single.content == batched.content
    assert len(alone[1].logprobs[0].top) == 3 and len(alone[2].logprobs[0].top) == 2
    assert alone[0].seed == 11


# ----------------------------------------------------------------------------------------------- feature cache
@contextlib.contextmanager
def _tower_runs(engine: Any) -> Iterator[list[Any]]:
    """Record every real run of the vision tower (a spy on its own class, beneath the cache's subclass)."""
    import numpy as np

    tower = engine.loaded.primary.model.vision_tower
    real = type(tower).__mro__[1]
    original = real.__call__
    runs: list[Any] = []

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        runs.append(np.array(args[0]))
        return original(self, *args, **kwargs)

    real.__call__ = spy
    try:
        yield runs
    finally:
        real.__call__ = original


def test_a_second_turn_about_the_same_image_takes_its_features_from_the_cache(
    fixture_models: dict[str, Path],
) -> None:
    from runtime.metrics import ServerMetrics

    red, blue = _png((220, 20, 20)), _png((20, 20, 220))  # same size, different pixels
    folder = fixture_models["vlm-qwen2vl"]
    engine = _engine(folder, prefix_cache=False)
    reference = _engine(folder, prefix_cache=False, vision_cache_entries=0)
    try:
        first = [{"role": "user", "content": [red, {"type": "text", "text": "What is this?"}]}]

        def ask(messages: list[dict[str, Any]], on: Any) -> Any:
            from runtime.request import GenerationRequest

            return on.generate(
                GenerationRequest(messages=messages, max_tokens=8, temperature=0.0, logprobs=True)
            )

        with _tower_runs(engine) as runs:
            one = ask(first, engine)
            assert len(runs) == 1
            second = [
                *first,
                {"role": "assistant", "content": one.content},
                {"role": "user", "content": "Sure?"},
            ]
            two = ask(second, engine)
            assert len(runs) == 1  # the second turn did not run the tower
            other = ask(
                [{"role": "user", "content": [blue, {"type": "text", "text": "What is this?"}]}], engine
            )
            assert len(runs) == 2  # a different image of the same size ran it
            assert runs[0].shape == runs[1].shape and not (runs[0] == runs[1]).all()
        # Answers equal an engine without the cache, turn by turn, and the two images answer differently.
        assert [t.id for t in two.logprobs] == [t.id for t in ask(second, reference).logprobs]
        assert [t.id for t in other.logprobs] == [
            t.id
            for t in ask(
                [{"role": "user", "content": [blue, {"type": "text", "text": "What is this?"}]}], reference
            ).logprobs
        ]
        assert [t.id for t in other.logprobs] != [t.id for t in one.logprobs]
        cache = engine.status()["vision_cache"]
        assert cache["hits"] == 1 and cache["misses"] == 2 and cache["entries"] == 2 and cache["bytes"] > 0
        assert reference.status()["vision_cache"]["enabled"] is False
        metrics = ServerMetrics(lambda: {"m": engine.status()}).render().decode()
        assert 'gallery_vision_cache_hits_total{model="m"} 1.0' in metrics
        assert f'gallery_vision_cache_bytes{{model="m"}} {float(cache["bytes"])}' in metrics
    finally:
        engine.shutdown()
        reference.shutdown()


@pytest.mark.parametrize(
    "settings",
    [{"prefix_cache": False, "media_batching": False}, {"media_batching": False}, {}],
    ids=["per-request", "per-request-prefix", "batch-warm"],
)
def test_later_turns_run_the_tower_at_most_once_per_chat_on_every_path(
    fixture_models: dict[str, Path], settings: dict[str, Any]
) -> None:
    """The feature cache sits on the tower, so the per-request path's later turns take it too (with the prefix
    cache on there, mlx-vlm does not even ask: the kept prefix holds the image); the batch's warm rows still
    embed the whole prompt, and take the features from the cache."""
    engine = _engine(fixture_models["vlm-qwen2vl"], **settings)
    try:
        chat: list[dict[str, Any]] = [
            {"role": "user", "content": [_png((220, 20, 20)), {"type": "text", "text": "What is this?"}]}
        ]
        with _tower_runs(engine) as runs:
            for _turn in range(3):
                done = engine.generate(_request_messages(list(chat)))
                chat += [{"role": "assistant", "content": done.content}, {"role": "user", "content": "Sure?"}]
        assert len(runs) == 1
        features, vlm = engine.status()["vision_cache"], engine.status()["prefix_cache"]["vlm"]
        reused = settings.get("prefix_cache", True)
        assert features["misses"] == 1 and features["hits"] == (
            0 if settings == {"media_batching": False} else 2
        )
        assert vlm["hits"] == (2 if reused else 0)
    finally:
        engine.shutdown()


def test_the_feature_cache_keeps_to_its_bounds() -> None:
    import mlx.core as mx

    from backends.feature_cache import FeatureCache

    cache = FeatureCache(max_entries=2, max_bytes=3 * 400)
    runs: list[int] = []

    def tower(_module: Any, x: Any) -> Any:
        runs.append(1)
        return mx.ones((100,), dtype=mx.float32) * x  # 400 bytes

    for key in ("a", "b", "a", "c", "b"):
        with cache.scope((key,)):
            cache.call("vision_tower", tower, None, (mx.array(1.0),), {})
    assert len(runs) == 4 and cache.hits == 1  # a, b, a (hit), c (a and b kept: b goes), b again
    assert len(cache.entries) == 2 and cache.bytes == 800
    small = FeatureCache(max_entries=8, max_bytes=100)  # one output is larger than the whole bound: not kept
    with small.scope(("a",)):
        small.call("vision_tower", tower, None, (mx.array(1.0),), {})
    assert small.describe()["entries"] == 0 and small.describe()["misses"] == 1
    cache.call("vision_tower", tower, None, (mx.array(1.0),), {})  # outside a scope: never cached
    assert cache.describe()["entries"] == 2 and len(runs) == 6


# ----------------------------------------------------------------------------------------------- chunked prefill
def test_a_cancelled_media_prompt_stops_between_its_chunks(fixture_models: dict[str, Path]) -> None:
    import mlx_vlm
    from PIL import Image

    from backends.decoder import DecodeSpec, FinishReason
    from backends.feature_cache import FeatureCache
    from backends.vlm_batch import VlmBatch
    from backends.vlm_decoder import VlmStreams

    model, processor = mlx_vlm.load(str(fixture_models["vlm-qwen2vl"]))
    streams = VlmStreams(model, processor, prefix_entries=0, prefill_step=16)
    decoder = VlmBatch(model, processor, streams, FeatureCache(0, 0), prefill_step=16)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>" + "tell me about the sea " * 60
    chunks = {"n": 0}
    language = type(model.language_model)
    original = language.__call__

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        chunks["n"] += 1
        return original(self, *args, **kwargs)

    def spec(uid: int, stop: Any) -> DecodeSpec:
        return DecodeSpec(
            uid=uid,
            max_tokens=4,
            stop_ids=frozenset(),
            prompt_text=prompt,
            images=[Image.new("RGB", (64, 64), (1, 2, 3))],
            media_key=("image:x",),
            should_stop=stop,
        )

    language.__call__ = counting
    try:
        decoder.add(spec(1, lambda: chunks["n"] >= 3))  # cancelled after its third chunk
        events = []
        while decoder.busy():
            events += decoder.step()
        cancelled_after = chunks["n"]
        decoder.add(spec(2, lambda: False))  # the same prompt, not cancelled: every chunk, then 4 tokens
        chunks["n"] = 0
        finished = []
        while decoder.busy():
            finished += decoder.step()
        whole = chunks["n"]
        # Two such prompts prefilled together; one is cancelled (as the engine does, between steps) mid-prompt.
        decoder.add(spec(3, lambda: False))
        decoder.add(spec(4, lambda: False))
        for _ in range(3):
            assert decoder.step() == []
        decoder.cancel(3)
        rest = []
        while decoder.busy():
            rest += decoder.step()
        # The per-request path (the batch's fallback) stops between its chunks as well.
        chunks["n"] = 0
        streams.add(spec(5, lambda: chunks["n"] >= 3))
        on_streams = []
        while streams.busy():
            on_streams += streams.step()
    finally:
        language.__call__ = original
        decoder.close()
    assert {e.uid for e in rest} == {4}  # the other prompt went on, and answered as it does alone
    assert [e.token for e in rest] == [e.token for e in finished]
    assert [(e.uid, e.finish) for e in events] == [(1, FinishReason.CANCELLED)]
    assert [(e.uid, e.finish) for e in on_streams] == [(5, FinishReason.CANCELLED)] and chunks["n"] == 3
    assert cancelled_after == 3
    tokens = finished[-1].prompt_tokens
    assert tokens is not None and tokens > 300
    # Uncancelled, the same prompt took every 16-token chunk, the last prompt token, and one step per token.
    assert whole == -(-(tokens - 1) // 16) + 1 + 4 and finished[-1].finish is FinishReason.LENGTH
    assert len([e for e in finished if e.token is not None]) == 4


# ----------------------------------------------------------------------------------------------- fallback
def test_what_the_batch_cannot_honour_runs_on_the_per_request_path(fixture_models: dict[str, Path]) -> None:
    engine = _engine(fixture_models["scripted-vlm"], prefix_cache=False, max_kv_size=256)
    try:
        answer = engine.generate(_request("hi", _png((1, 2, 3))))
        vlm = engine.status()["prefix_cache"]["vlm"]
        warnings = engine.status()["warnings"]
    finally:
        engine.shutdown()
    assert answer.finish_reason == "stop" and answer.content
    assert vlm["batching"] is False and vlm["sent_to_streams"] == 1 and vlm["batched"] == 0
    assert any("media requests run one by one: a quantized or rotating KV cache" in w for w in warnings)


def test_text_on_a_vlm_without_a_text_route_batches_and_a_continued_chat_reuses_its_prefix(
    fixture_models: dict[str, Path],
) -> None:
    from importers import import_model
    from runtime.engine import Engine, EngineSettings

    config = import_model(str(fixture_models["vlm-qwen2vl"])).config
    config = config.model_copy(update={"mlx": config.mlx.model_copy(update={"text_route": "vlm"})})
    engine = Engine(config, settings=EngineSettings()).start()
    off = Engine(config, settings=EngineSettings(prefix_cache=False)).start()
    try:
        first = [{"role": "user", "content": "tell me about the sea and the river"}]
        one = engine.generate(_request_messages(first))
        assert one.route == "mlx-vlm"
        second = [*first, {"role": "assistant", "content": one.content}, {"role": "user", "content": "why"}]
        two = engine.generate(_request_messages(second))
        assert two.usage.cached_tokens > 0  # continued the kept state, on the per-request path
        assert [t.id for t in two.logprobs] == [
            t.id for t in off.generate(_request_messages(second)).logprobs
        ]
        # Other conversations (longer than the template's shared head, so they reuse less than half) batch.
        others = [_request(text * 12, max_tokens=6) for text in ("hi there ", "seven cats ", "a blue sky ")]
        together = [h.result() for h in [engine.submit(r) for r in others]]
        assert all(c.usage.cached_tokens == 0 for c in together)
        vlm = engine.status()["prefix_cache"]["vlm"]
    finally:
        engine.shutdown()
        off.shutdown()
    assert vlm["sent_to_streams"] == 1 and vlm["batched"] == 4  # unrelated conversations batched


def _request_messages(messages: list[dict[str, Any]]) -> Any:
    from runtime.request import GenerationRequest

    return GenerationRequest(messages=messages, max_tokens=8, temperature=0.0, logprobs=True)


def test_gemma4_per_layer_inputs_are_never_reused_from_a_wrong_offset(
    fixture_models: dict[str, Path],
) -> None:
    """mlx-vlm 0.7.10 feeds a prefix hit's suffix the wrong per-layer inputs (Gemma 4 E2B/E4B): no reuse there."""
    from runtime.request import GenerationRequest

    folder = fixture_models["vlm-gemma4-audio"]
    on, off = _engine(folder), _engine(folder, prefix_cache=False)
    try:
        history: list[dict[str, Any]] = [
            {"role": "user", "content": [_audio(0.5, 300.0), {"type": "text", "text": "What is this?"}]}
        ]
        for _turn in range(3):
            ask = GenerationRequest(messages=list(history), max_tokens=8, temperature=0.0, logprobs=True)
            cached, plain = on.generate(ask), off.generate(ask)
            assert _answer(cached) == _answer(plain)
            history += [{"role": "assistant", "content": cached.content}, {"role": "user", "content": "and?"}]
        vlm = on.status()["prefix_cache"]["vlm"]
        assert vlm["reuse_refused"] and not vlm["enabled"] and on.status()["vision_cache"]["hits"] == 2
    finally:
        on.shutdown()
        off.shutdown()


def test_gemma4_gives_a_repeated_prompt_the_same_greedy_answer_with_the_prefix_cache_on_and_off(
    fixture_models: dict[str, Path],
) -> None:
    """The same prompt sent again (text, image, audio) answers as with the cache off: with the per-layer-inputs
    refusal, no request on the Gemma 4 fixture is served from a kept prefix (the drafter test once saw it)."""
    folder = fixture_models["vlm-gemma4-audio"]
    # Text on mlx-vlm too (`text_route: vlm`), where the drafter test's repeated prompts once changed answers.
    on, off = _engine(folder, text_route="vlm"), _engine(folder, text_route="vlm", prefix_cache=False)
    try:
        prompts: list[Any] = [
            "tell me about the sea",
            "why",
            [_png((200, 30, 30)), {"type": "text", "text": "What colour is this?"}],
            [_audio(0.5, 440.0), {"type": "text", "text": "What is this?"}],
        ]
        for content in prompts:
            ask = _request_messages([{"role": "user", "content": content}])
            want = _answer(off.generate(ask))
            assert [_answer(on.generate(ask)) for _ in range(3)] == [want] * 3
        vlm = on.status()["prefix_cache"]["vlm"]
        assert vlm["reuse_refused"] and vlm["entries"] == 0 and vlm["reused_tokens"] == 0
    finally:
        on.shutdown()
        off.shutdown()


@pytest.mark.parametrize("model", ["vlm-qwen2vl", "vlm-qwen35-mtp"])
def test_later_turns_of_media_chats_start_their_batch_rows_from_the_kept_prefix(
    fixture_models: dict[str, Path], model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three media chats at once, three turns each: a later turn starts its batch row from its chat's kept
    cache (only the new part is prefilled) and answers as with the prefix cache off, and as alone."""
    from backends.vlm_batch import _warm_start_class

    warm_class = _warm_start_class()
    admitted: list[int] = []  # rows of each admission that had a warm row
    build = warm_class._build_mixed_prompt_batch

    def spy(self: Any, sequences: list[Any]) -> Any:
        if any(sequence[0] in self.warm for sequence in sequences):
            admitted.append(len(sequences))
        return build(self, sequences)

    monkeypatch.setattr(warm_class, "_build_mixed_prompt_batch", spy)
    media = [_png((200, 40, 40)), _png((40, 200, 40), size=96)]
    if model == "vlm-qwen2vl":
        media.append(_video(tmp_path, 8))
    else:
        media.append(_png((40, 40, 200), size=80))
    folder = fixture_models[model]
    on, off, lone = _engine(folder), _engine(folder, prefix_cache=False), _engine(folder)
    try:
        chats: list[list[dict[str, Any]]] = [
            [{"role": "user", "content": [part, {"type": "text", "text": f"What is this, {i}?"}]}]
            for i, part in enumerate(media)
        ]
        for turn in range(3):
            asks = [_request_messages(list(chat)) for chat in chats]
            # Penalties over the whole prompt: a warm row's processors see it all, not just the new part.
            asks[1] = dataclasses.replace(
                asks[1],
                repeat_penalty=1.5,
                repetition_context_size=200,
                presence_penalty=1.0,
                presence_context_size=200,
            )
            together = [h.result() for h in [on.submit(a) for a in asks]]
            plain = [_answer(h.result()) for h in [off.submit(a) for a in asks]]
            alone = [_answer(lone.generate(a)) for a in asks]
            assert [_answer(c) for c in together] == plain == alone
            if model == "vlm-qwen2vl":
                assert all((c.usage.cached_tokens > 0) == (turn > 0) for c in together)
            for chat, done in zip(chats, together, strict=True):
                chat += [{"role": "assistant", "content": done.content}, {"role": "user", "content": "and?"}]
        # A later turn admitted beside first turns (a new image, a text-only request) starts warm beside them.
        asks = [
            _request_messages(chats[0]),
            _request_messages(chats[0][:1]),
            _request_messages(
                [{"role": "user", "content": [_png((90, 90, 30)), {"type": "text", "text": "And this?"}]}]
            ),
            _request("hello there", max_tokens=6),
        ]
        together = [_answer(h.result()) for h in [on.submit(a) for a in asks]]
        assert together == [_answer(off.generate(a)) for a in asks]
        assert max(admitted, default=0) > 1 or model != "vlm-qwen2vl"  # warm rows admitted beside others
        vlm = on.status()["prefix_cache"]["vlm"]
        if model == "vlm-qwen2vl":  # every turn batched, each later one from its chat's kept prefix
            assert (vlm["sent_to_streams"], vlm["batched"], vlm["warm_started"]) == (0, 12, 7)
            assert lone.status()["prefix_cache"]["vlm"]["warm_started"] == 6
        else:  # linear-attention state never starts a batch row: later turns batch cold
            assert (vlm["sent_to_streams"], vlm["batched"], vlm["warm_started"]) == (0, 12, 0)
        assert vlm["batch_rows"] > vlm["batch_steps"]  # later turns decoded together too
    finally:
        on.shutdown()
        off.shutdown()
        lone.shutdown()
