"""The serving engine on real tiny models: optimisations never change answers, and every sampling control works.

- Prefix reuse: greedy output with the prefix cache on equals the output with it off, byte for byte, over
  random multi-turn conversations, on every route (mlx text model, a VLM's shared-weight text route, the
  mlx-vlm path with an image in the conversation) — and the cache really is used (cached tokens > 0).
- Continuous batching: each of 8 mixed-length prompts alone equals its output when all 8 run together, on
  every route; a seeded sampled request gives the same tokens alone or in a batch.
- Sampling controls: penalties, logit bias, log-probabilities, IgnoreEOS, structured output, thinking
  budget, context size, KV-cache options; and one bad value never poisons the next request.

The random-weight models have nearly flat logits, so greedy decoding is sensitive to the smallest numeric
difference: equal token streams here mean equal computations, not a lucky model.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.plugins.models import fixture_info

pytestmark = pytest.mark.mlx

WORDS = [
    "sea",
    "river",
    "mountain",
    "red",
    "blue",
    "seven",
    "tell",
    "me",
    "about",
    "the",
    "a",
    "story",
    "why",
    "is",
    "sky",
    "cold",
    "warm",
    "cats",
    "dogs",
    "quickly",
    "slowly",
    "and",
    "or",
    "not",
    "42",
    "hello",
]


def _config(folder: Path, **changes: Any):  # type: ignore[no-untyped-def]
    from importers import import_model

    config = import_model(str(folder)).config
    return config.model_copy(update=changes) if changes else config


def _engine(config, **settings: Any):  # type: ignore[no-untyped-def]
    from runtime.engine import Engine, EngineSettings

    return Engine(config, settings=EngineSettings(**settings)).start()


def _png(color: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _request(messages: list[dict[str, Any]], **fields: Any):  # type: ignore[no-untyped-def]
    from runtime.request import GenerationRequest

    fields.setdefault("max_tokens", 10)
    fields.setdefault("temperature", 0.0)
    return GenerationRequest(messages=[dict(m) for m in messages], logprobs=True, **fields)


def _ids(completion) -> list[int]:  # type: ignore[no-untyped-def]
    return [t.id for t in completion.logprobs]


# ----------------------------------------------------------------------------------------------- engines
@pytest.fixture(scope="module")
def text_pair(text_qwen3_model: Path) -> Iterator[tuple[Any, Any]]:
    config = _config(text_qwen3_model)
    on, off = _engine(config), _engine(config, prefix_cache=False)
    yield on, off
    on.shutdown()
    off.shutdown()


@pytest.fixture(scope="module")
def vlm_pair(vlm_model: Path) -> Iterator[tuple[Any, Any]]:
    config = _config(vlm_model)
    on, off = _engine(config), _engine(config, prefix_cache=False)
    yield on, off
    on.shutdown()
    off.shutdown()


conversations = st.lists(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join), min_size=2, max_size=4
)


def _converse(
    engines: tuple[Any, Any], turns: list[str], *, system: str | None, image: str | None
) -> list[int]:
    """Run a conversation on both engines turn by turn; assert equal answers; return cached tokens per turn."""
    on, off = engines
    history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    cached = []
    for index, text in enumerate(turns):
        content: Any = text
        if image is not None and index == 0:
            content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]
        history.append({"role": "user", "content": content})
        with_cache = on.generate(_request(history))
        without = off.generate(_request(history))
        assert _ids(with_cache) == _ids(without), (index, text)
        assert with_cache.content == without.content and with_cache.reasoning == without.reasoning
        assert with_cache.finish_reason == without.finish_reason
        assert (
            with_cache.usage.prompt_tokens == without.usage.prompt_tokens
        )  # the whole prompt, cached or not
        assert without.usage.cached_tokens == 0
        cached.append(with_cache.usage.cached_tokens)
        history.append({"role": "assistant", "content": with_cache.content})
    return cached


# ----------------------------------------------------------------------------------------------- prefix reuse
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=conversations, system=st.sampled_from([None, "You are terse.", "Answer about the sea only."]))
def test_prefix_cache_never_changes_greedy_output_on_the_text_model(
    text_pair, turns: list[str], system: str | None
) -> None:
    cached = _converse(text_pair, turns, system=system, image=None)
    assert all(count > 0 for count in cached[1:])  # every later turn reused the conversation so far


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=conversations)
def test_prefix_cache_never_changes_greedy_output_on_the_vlm_text_route(vlm_pair, turns: list[str]) -> None:
    cached = _converse(vlm_pair, turns, system=None, image=None)
    assert all(count > 0 for count in cached[1:])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=conversations, color=st.sampled_from([(200, 30, 30), (20, 200, 40)]))
def test_prefix_cache_never_changes_greedy_output_on_the_vision_path(
    vlm_pair, turns: list[str], color: tuple[int, int, int]
) -> None:
    cached = _converse(vlm_pair, turns, system=None, image=_png(color))
    assert all(count > 0 for count in cached[1:])  # same image in the prefix: reused


def test_a_different_image_is_never_served_from_the_cache(vlm_pair) -> None:
    on, off = vlm_pair
    for color in ((250, 250, 10), (10, 10, 250)):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _png(color)}},
                    {"type": "text", "text": "What colour is this?"},
                ],
            }
        ]
        first = on.generate(_request(messages))
        assert first.usage.cached_tokens == 0  # a new image: nothing of this prompt was computed before
        assert _ids(first) == _ids(off.generate(_request(messages)))


def test_status_reports_prefix_cache_hits(text_pair) -> None:
    on, _off = text_pair
    history = [{"role": "user", "content": "tell me about the sea"}]
    answer = on.generate(_request(history))
    history += [
        {"role": "assistant", "content": answer.content},
        {"role": "user", "content": "and the river"},
    ]
    second = on.generate(_request(history))
    assert second.usage.cached_tokens > 0
    cache = on.status()["prefix_cache"]["text"]
    assert cache["enabled"] and cache["hits"] >= 1 and cache["reused_tokens"] >= second.usage.cached_tokens
    assert cache["bytes"] > 0 and cache["entries"] >= 1


# ----------------------------------------------------------------------------------------------- batching
PROMPTS = [
    "hi",
    "tell me a story about the sea and the mountain and the river",
    "why",
    "seven cats and dogs",
    "a " * 40,
    "hello hello",
    "the sky is blue or red or not",
    "42",
]


def _alone_and_together(engine, requests: list[Any]) -> tuple[list[Any], list[Any]]:  # type: ignore[no-untyped-def]
    alone = [engine.generate(request) for request in requests]
    handles = [engine.submit(request) for request in requests]
    together = [handle.result() for handle in handles]
    return alone, together


@pytest.mark.parametrize("route", ["text", "text-route", "vision"])
def test_each_request_alone_equals_its_output_inside_a_batch(
    route: str, text_qwen3_model: Path, vlm_model: Path
) -> None:
    folder = text_qwen3_model if route == "text" else vlm_model
    engine = _engine(_config(folder), prefix_cache=False)
    try:
        image = _png() if route == "vision" else None
        requests = []
        for index, text in enumerate(PROMPTS):
            content: Any = text
            if image is not None:
                content = [
                    {"type": "image_url", "image_url": {"url": _png((index * 30, 100, 200 - index * 20))}},
                    {"type": "text", "text": text},
                ]
            requests.append(_request([{"role": "user", "content": content}], max_tokens=6 + index * 2))
        alone, together = _alone_and_together(engine, requests)
        for single, batched in zip(alone, together, strict=True):
            assert _ids(single) == _ids(batched) and single.content == batched.content
            assert single.finish_reason == batched.finish_reason
        assert {c.route for c in together} == {
            "mlx" if route == "text" else "text-route" if route == "text-route" else "mlx-vlm"
        }
        if route != "vision":
            assert (
                engine.status()["stats"]["batch_rows"] > engine.status()["stats"]["batch_steps"]
            )  # really batched
    finally:
        engine.shutdown()


def test_a_seeded_sampled_request_is_the_same_alone_or_in_any_batch(text_pair) -> None:
    engine, _off = text_pair
    seeded = [
        _request([{"role": "user", "content": text}], temperature=1.0, seed=7 + i, top_p=0.9, max_tokens=12)
        for i, text in enumerate(PROMPTS[:6])
    ]
    alone, together = _alone_and_together(engine, seeded)
    for single, batched in zip(alone, together, strict=True):
        assert _ids(single) == _ids(batched)
    other_seed = engine.generate(
        _request([{"role": "user", "content": PROMPTS[0]}], temperature=1.0, seed=8, top_p=0.9, max_tokens=12)
    )
    assert _ids(other_seed) != _ids(alone[0])  # the seed matters
    unseeded = engine.generate(
        _request([{"role": "user", "content": PROMPTS[0]}], temperature=1.0, max_tokens=12)
    )
    assert unseeded.seed is not None  # the seed drawn for it is reported, so it can be replayed
    replay = engine.generate(
        _request(
            [{"role": "user", "content": PROMPTS[0]}], temperature=1.0, max_tokens=12, seed=unseeded.seed
        )
    )
    assert _ids(replay) == _ids(unseeded)


# ----------------------------------------------------------------------------------------------- sampling controls
def test_logprobs_are_the_chosen_tokens_and_sorted_alternatives(text_pair) -> None:
    engine, _off = text_pair
    result = engine.generate(_request([{"role": "user", "content": "tell me"}], top_logprobs=5, max_tokens=8))
    assert len(result.logprobs) == result.usage.completion_tokens - (
        1 if result.finish_reason == "stop" else 0
    )
    for item in result.logprobs:
        assert len(item.top) == 5
        values = [lp for _text, _id, lp in item.top]
        assert values == sorted(values, reverse=True)
        assert item.top[0][1] == item.id and item.logprob == pytest.approx(values[0])  # greedy: the best one
        assert item.token == engine.detokenize([item.id])


def test_penalties_and_logit_bias_change_the_answer_deterministically(text_pair) -> None:
    engine, _off = text_pair
    messages = [{"role": "user", "content": "hello"}]
    plain = _ids(engine.generate(_request(messages, max_tokens=12)))
    assert len(set(plain)) < len(plain)  # the random model repeats itself: penalties have something to do
    for fields in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repeat_penalty": 3.0}):
        first = _ids(engine.generate(_request(messages, max_tokens=12, **fields)))
        assert first != plain, fields
        assert first == _ids(engine.generate(_request(messages, max_tokens=12, **fields)))
        assert len(set(first)) > len(set(plain)), fields  # fewer repeats
    forced = _ids(engine.generate(_request(messages, max_tokens=5, logit_bias={300: 100.0})))
    assert forced == [300] * 5


def test_ignore_eos_runs_past_the_pinned_stop_but_stop_strings_still_stop(scripted_text_model: Path) -> None:
    info = fixture_info(scripted_text_model)
    engine = _engine(_config(scripted_text_model))
    try:
        messages = [{"role": "user", "content": "hi"}]
        normal = engine.generate(_request(messages, max_tokens=40))
        assert normal.content == info["answer"] and normal.finish_reason == "stop"
        ignored = engine.generate(_request(messages, max_tokens=40, ignore_eos=True))
        assert ignored.finish_reason == "length" and ignored.usage.completion_tokens == 40
        assert ignored.content.startswith(info["answer"]) and info["junk"].split()[0] in ignored.content
        junk_word = info["junk"].split()[0]
        cut = engine.generate(_request(messages, max_tokens=40, ignore_eos=True, stop=[junk_word]))
        assert cut.finish_reason == "stop" and junk_word not in cut.content
    finally:
        engine.shutdown()


def test_structured_output_follows_the_json_schema(text_pair) -> None:
    from runtime.request import ResponseFormat

    engine, _off = text_pair
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"enum": [1, 2, 3]}},
        "required": ["answer", "count"],
        "additionalProperties": False,
    }
    for temperature in (0.0, 1.0):
        result = engine.generate(
            _request(
                [{"role": "user", "content": "is the sky blue?"}],
                max_tokens=60,
                temperature=temperature,
                seed=3,
                enable_thinking=False,
                response_format=ResponseFormat("json_schema", schema),
            )
        )
        parsed = json.loads(result.content)
        assert (
            parsed["answer"] in ("yes", "no")
            and parsed["count"] in (1, 2, 3)
            and set(parsed) == {"answer", "count"}
        )
        assert result.finish_reason == "stop"  # the answer ended where the schema did, on a pinned stop token
    free = engine.generate(
        _request(
            [{"role": "user", "content": "is the sky blue?"}],
            max_tokens=20,
            enable_thinking=False,
            response_format=ResponseFormat("json_object"),
        )
    )
    assert free.content.startswith("{")


def test_structured_output_leaves_the_reasoning_free(scripted_think_model: Path) -> None:
    from runtime.request import ResponseFormat

    info = fixture_info(scripted_think_model)
    engine = _engine(_config(scripted_think_model))
    try:
        schema = {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        }
        result = engine.generate(
            _request(
                [{"role": "user", "content": "hi"}],
                max_tokens=40,
                enable_thinking=True,
                response_format=ResponseFormat("json_schema", schema),
            )
        )
        assert result.reasoning == info["reasoning"]  # the model's own reasoning, unconstrained
        assert isinstance(json.loads(result.content)["ok"], bool)  # the answer follows the schema
    finally:
        engine.shutdown()


def test_a_bad_schema_is_refused_before_it_queues(text_pair) -> None:
    from gallery.errors import RequestError
    from runtime.request import ResponseFormat

    engine, _off = text_pair
    with pytest.raises(RequestError, match="response_format"):
        engine.submit(
            _request(
                [{"role": "user", "content": "x"}],
                response_format=ResponseFormat("json_schema", {"type": "nope"}),
            )
        )


def test_thinking_budget_closes_the_reasoning_block(scripted_think_model: Path) -> None:
    info = fixture_info(scripted_think_model)
    engine = _engine(_config(scripted_think_model))
    try:
        messages = [{"role": "user", "content": "hi"}]
        full = engine.generate(_request(messages, max_tokens=40, enable_thinking=True))
        assert full.reasoning == info["reasoning"] and full.content == info["answer"]
        short = engine.generate(_request(messages, max_tokens=40, enable_thinking=True, thinking_budget=2))
        assert short.reasoning and short.reasoning != info["reasoning"]
        assert info["reasoning"].startswith(short.reasoning.strip()) and short.content == info["answer"]
        assert short.usage.reasoning_tokens <= 3
    finally:
        engine.shutdown()


def test_the_context_size_is_enforced_before_queueing(text_qwen3_model: Path) -> None:
    from gallery.errors import RequestError

    engine = _engine(_config(text_qwen3_model), context_size=64)
    try:
        long = [{"role": "user", "content": " ".join(WORDS * 4)}]
        with pytest.raises(RequestError, match="context"):
            engine.submit(_request(long))
        truncated = engine.generate(_request(long, truncate=True, max_tokens=8))
        assert truncated.usage.prompt_tokens + truncated.usage.completion_tokens <= 64
        fits = engine.generate(_request([{"role": "user", "content": "hi"}], max_tokens=500))
        assert (
            fits.usage.prompt_tokens + fits.usage.completion_tokens <= 64 and fits.finish_reason == "length"
        )
    finally:
        engine.shutdown()


@pytest.mark.parametrize("options", [{"max_kv_size": 64}, {"batching": False}])
def test_kv_cache_options_and_unbatched_decoding_serve_correct_answers(
    options: dict[str, Any], scripted_text_model: Path
) -> None:
    info = fixture_info(scripted_text_model)
    engine = _engine(_config(scripted_text_model), **options)
    try:
        handles = [
            engine.submit(_request([{"role": "user", "content": f"hi {i}"}], max_tokens=40)) for i in range(4)
        ]
        for handle in handles:
            result = handle.result()
            assert result.content == info["answer"] and result.finish_reason == "stop"
    finally:
        engine.shutdown()


def test_a_quantized_kv_cache_serves_the_real_model(smollm2_model: Path, text_qwen3_model: Path) -> None:
    from gallery.errors import RuntimeFailure

    engine = _engine(_config(smollm2_model), kv_bits=8, kv_group_size=64)
    try:
        answer = engine.generate(
            _request([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
        )
        assert "Paris" in answer.content
    finally:
        engine.shutdown()
    with pytest.raises(RuntimeFailure, match="head size 16"):  # refused at load, not request by request
        _engine(_config(text_qwen3_model), kv_bits=8, kv_group_size=32)


def test_out_of_range_values_are_refused_and_never_poison_the_next_request(text_pair) -> None:
    from gallery.errors import RequestError

    engine, _off = text_pair
    messages = [{"role": "user", "content": "hello"}]
    bad = [
        {"top_k": 2**31},
        {"min_p": 5.0},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": 1e308},
        {"temperature": -1.0},
        {"top_p": 7.0},
        {"top_k": -3},
        {"top_p": 0.0},
        {"presence_penalty": 9.0},
        {"seed": -5},
        {"logit_bias": {99999: 1.0}},
        {"max_tokens": 0},
        {"top_logprobs": 50},
        {"repeat_penalty": 0.0},
    ]
    for fields in bad:
        with pytest.raises(RequestError):
            engine.submit(_request(messages, **fields))
    plain = {"temperature": 0.7, "seed": 1, "top_p": 1.0, "min_p": 0.0}
    huge_k = engine.generate(_request(messages, top_k=2**31 - 1, **plain))  # k above the vocabulary
    assert huge_k.finish_reason in ("stop", "length") and not huge_k.error
    sampled = engine.generate(_request(messages, top_k=0, **plain))
    assert _ids(sampled) == _ids(huge_k)  # a top-k wider than the vocabulary filters nothing
    assert engine.status()["state"] == "READY"
