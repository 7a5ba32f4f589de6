"""Reasoning markers that are plain text (not tokens) work end to end like special-token markers.

The scripted-textthink model writes `<th|ink>…</|think>` (each tag split over two tokens, neither of which is
a `<think>` token) and its template injects "detailed thinking on/off" by `enable_thinking`. The importer must
find the markers and the switch; the engine must split reasoning_content, honour the switch, and never let a
fragment of a tag reach content, streaming or not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.models import fixture_info

pytestmark = pytest.mark.mlx


@pytest.fixture(scope="module")
def engine(scripted_textthink_model: Path) -> Iterator:
    from importers import import_model
    from runtime.engine import Engine, EngineSettings

    config = import_model(str(scripted_textthink_model)).config
    started = Engine(config, settings=EngineSettings()).start()
    yield started
    started.shutdown()


def _chat() -> list[dict[str, str]]:
    return [{"role": "user", "content": "What is six times seven?"}]


def test_premise_the_tags_are_not_tokens(scripted_textthink_model: Path) -> None:
    from tokenizers import Tokenizer

    info = fixture_info(scripted_textthink_model)
    tokenizer = Tokenizer.from_file(str(scripted_textthink_model / "tokenizer.json"))
    assert tokenizer.token_to_id("<think>") is None and tokenizer.token_to_id("</think>") is None
    assert "<think>" in info["completion"] and "</think>" in info["completion"]
    assert len(tokenizer.encode("<think>", add_special_tokens=False).ids) > 1


def test_importer_finds_text_markers_switch_and_default(engine) -> None:  # type: ignore[no-untyped-def]
    reasoning = engine.config.mlx.reasoning
    assert (reasoning.start, reasoning.end, reasoning.switch) == ("<think>", "</think>", "enable_thinking")
    assert reasoning.default_enabled is True
    details = " ".join(e.detail for e in engine.config.mlx.decisions["reasoning"].evidence)
    assert "plain text, matched as text at runtime" in details


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_split_and_no_marker_leaks(engine, scripted_textthink_model: Path, stream: bool) -> None:  # type: ignore[no-untyped-def]
    from runtime.request import GenerationRequest

    info = fixture_info(scripted_textthink_model)
    request = GenerationRequest(messages=_chat(), enable_thinking=True, max_tokens=40)
    if stream:
        events = list(engine.submit(request))
        content = "".join(e.content for e in events)
        reasoning = "".join(e.reasoning for e in events)
        pieces = [e.content for e in events] + [e.reasoning for e in events]
    else:
        answer = engine.generate(request)
        content, reasoning, pieces = answer.content, answer.reasoning, [answer.content, answer.reasoning]
    assert content == info["answer"] and reasoning == info["reasoning"]
    for piece in pieces:
        for fragment in ("<th", "ink>", "</", "think>"):
            assert fragment not in piece


def test_switch_is_honoured_in_the_prompt_and_the_output(engine, scripted_textthink_model: Path) -> None:  # type: ignore[no-untyped-def]
    from runtime.request import GenerationRequest

    info = fixture_info(scripted_textthink_model)
    off_request = GenerationRequest(messages=_chat(), enable_thinking=False, max_tokens=40)
    assert "detailed thinking off" in engine.prepare(off_request).prompt_text
    default = engine.prepare(GenerationRequest(messages=_chat(), max_tokens=40))
    assert "detailed thinking on" in default.prompt_text and default.thinking
    # the scripted model reasons anyway: with thinking off the block is dropped, tags and all
    events = list(engine.submit(off_request))
    assert "".join(e.content for e in events) == info["answer"]
    assert not any(e.reasoning for e in events)
    assert all("<th" not in e.content and "think>" not in e.content for e in events)
