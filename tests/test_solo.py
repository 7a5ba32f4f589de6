"""A lone text request decodes alone and joins the batch mid-answer when another arrives: answers unchanged.

The reference for every answer is the same request decoded through the batch only (`solo: false`), on a
second engine over the same model: greedy, seeded sampling, penalties, log-probabilities and a JSON schema
(a grammar processor) must give the same tokens alone, when the request is handed over mid-answer, and when
it is handed over while its prompt is still being processed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.request import Answer, Completion, ResponseFormat

KINDS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "seeded": {"temperature": 1.0, "top_p": 0.9, "seed": 11},
    "penalties": {"repeat_penalty": 1.5, "presence_penalty": 0.5},
    "top-logprobs": {"top_logprobs": 3},
    "json-schema": {
        "response_format": ResponseFormat(
            "json_schema",
            {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
        )
    },
}


def _request(text: str, max_tokens: int, **fields: Any):  # type: ignore[no-untyped-def]
    from runtime.request import GenerationRequest

    fields.setdefault("temperature", 0.0)
    return GenerationRequest(
        messages=[{"role": "user", "content": text}], logprobs=True, max_tokens=max_tokens, **fields
    )


def _ids(completion: Completion) -> list[int]:
    return [t.id for t in completion.logprobs]


@pytest.fixture(scope="module")
def engines(text_qwen3_model: Path) -> Iterator[tuple[Any, Any]]:
    """(solo on, solo off), prefix caches off so every answer starts from the same empty cache."""
    from importers import import_model
    from runtime.engine import Engine, EngineSettings

    config = import_model(str(text_qwen3_model)).config
    solo = Engine(config, settings=EngineSettings(prefix_cache=False, prefill_step=16)).start()
    batch = Engine(config, settings=EngineSettings(prefix_cache=False, prefill_step=16, solo=False)).start()
    yield solo, batch
    solo.shutdown()
    batch.shutdown()


def _joined_after(engine: Any, first: Any, second: Any, events_before: int) -> tuple[Completion, Completion]:
    """Run `first`, submit `second` once `first` has delivered `events_before` events; both answers."""
    handle = engine.submit(first)
    answer = Answer()
    other = None
    for seen, event in enumerate(handle.events(timeout=120), start=1):
        answer.add(event)
        if other is None and seen >= events_before:
            other = engine.submit(second)
    if other is None:
        other = engine.submit(second)
    return answer.completion(), other.result()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_lone_request_answers_the_same_alone_and_when_it_joins_the_batch(
    engines: tuple[Any, Any], kind: str
) -> None:
    solo, batch = engines
    fields = KINDS[kind]
    first = _request("tell me a story about the sea and the mountain", 40, **fields)
    second = _request("why is the sky blue", 24, **{**fields, "seed": 5} if "seed" in fields else fields)
    reference = batch.generate(first)
    reference_second = batch.generate(second)
    assert batch.status()["stats"]["solo_tokens"] == 0  # the reference never decodes alone

    before = solo.status()["stats"]
    alone = solo.generate(first)
    assert _ids(alone) == _ids(reference) and alone.content == reference.content
    assert alone.finish_reason == reference.finish_reason
    if kind == "top-logprobs":
        assert [t.top for t in alone.logprobs] == [t.top for t in reference.logprobs]
    middle = solo.status()["stats"]
    assert middle["solo_tokens"] - before["solo_tokens"] == alone.usage.completion_tokens  # really alone

    joined, other = _joined_after(solo, first, second, events_before=6)
    after = solo.status()["stats"]
    assert after["handovers"] > middle["handovers"]  # really handed over mid-answer
    assert _ids(joined) == _ids(reference) and joined.content == reference.content
    assert joined.finish_reason == reference.finish_reason
    assert _ids(other) == _ids(reference_second)


def test_a_request_handed_over_while_its_prompt_is_processed_answers_the_same(
    engines: tuple[Any, Any],
) -> None:
    solo, batch = engines
    long_prompt = " ".join(f"word{i}" for i in range(150))  # many prefill steps of 16 tokens
    first = _request(long_prompt, 16)
    second = _request("hello", 8)
    reference = batch.generate(first)
    handle = solo.submit(first)
    other = solo.submit(second)  # arrives while the first is still processing its prompt
    joined = handle.result()
    assert _ids(joined) == _ids(reference)
    assert _ids(other.result()) == _ids(batch.generate(second))


def test_cancelling_a_lone_request_frees_the_engine_for_the_next(engines: tuple[Any, Any]) -> None:
    solo, batch = engines
    handle = solo.submit(_request("tell me a long story", 200, ignore_eos=True))
    for _event in handle.events(timeout=120):
        handle.cancel()
    assert solo.status()["active"] == 0
    after = solo.generate(_request("why", 8))
    assert _ids(after) == _ids(batch.generate(_request("why", 8)))


# ----------------------------------------------------------------------------------------------- 16-bit weights
def test_dequantized_weights_are_opt_in_off_cuda_and_answer_the_same_alone_and_batched(
    smollm2_model: Path, text_qwen3_model: Path
) -> None:
    import mlx.nn as nn

    from importers import import_model
    from runtime.engine import Engine, EngineSettings

    config = import_model(str(smollm2_model)).config
    auto = Engine(config, settings=EngineSettings(prefix_cache=False)).start()
    try:
        weights = auto.status()["weights"]
        assert weights["applied"] is False and "CUDA" in weights["reason"]  # auto: only with MLX CUDA
    finally:
        auto.shutdown()
    engine = Engine(config, settings=EngineSettings(prefix_cache=False, dequantize=True)).start()
    try:
        weights = engine.status()["weights"]
        assert weights["applied"] is True and weights["dense_bytes"] > 0
        assert engine.loaded is not None
        model = engine.loaded.primary.model
        assert not any(isinstance(m, nn.QuantizedLinear) for _n, m in model.named_modules())
        requests = [_request(text, 8) for text in ("hello", "why is the sky blue")]
        alone = [engine.generate(r) for r in requests]
        together = [h.result() for h in [engine.submit(r) for r in requests]]
        assert [_ids(a) for a in alone] == [_ids(t) for t in together]
        assert all(a.usage.completion_tokens > 0 for a in alone)
    finally:
        engine.shutdown()
    plain = Engine(
        import_model(str(text_qwen3_model)).config, settings=EngineSettings(dequantize=True)
    ).start()
    try:
        assert plain.status()["weights"] == {
            "applied": False,
            "reason": "the weights are not quantized",
            "dense_bytes": 0,
        }
    finally:
        plain.shutdown()
