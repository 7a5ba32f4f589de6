"""Bundled multi-token-prediction (MTP) layers really draft, and drafting never changes a greedy answer.

The fixture (`vlm-qwen35-mtp`) is a tiny qwen3_5 whose weights carry one MTP layer as `mtp.*` tensors; the
importer pins `mlx.speculative.mtp: true` from its weights index, the loader hands the model folder to
mlx-vlm's `load_drafter`, and every request of the config runs on mlx-vlm's speculative loop. Its drafter
predicts the model's bigram choice, which the context often overrides, so some drafts are accepted and
others rejected (both verification paths run), and answers depend on the prompt. Seeded sampled requests
draft too, and stay reproducible alone or in a batch.

The baseline is the same config with `mtp: false` and `text_route: vlm`, so both engines run the same
mlx-vlm code and only the drafting differs (the shared-weights text route is mlx-lm's, whose detokenizer
renders an unfinished UTF-8 tail at max_tokens as U+FFFD where mlx-vlm's drops it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.drafting_support import png, request
from tests.plugins.models import fixture_info

pytestmark = pytest.mark.mlx

PROMPTS = [
    "tell me about the sea",
    "why",
    "seven cats and dogs quickly",
    "a " * 30,
    "hello hello",
    "the sky is blue or red or not",
    "42",
    "Describe the picture in one sentence.",
]


def _config(folder: Path):  # type: ignore[no-untyped-def]
    from importers import import_model

    return import_model(str(folder)).config


def _without_mtp(config):  # type: ignore[no-untyped-def]
    speculative = config.mlx.speculative.model_copy(update={"mtp": False, "draft_kind": None})
    return config.model_copy(
        update={"mlx": config.mlx.model_copy(update={"speculative": speculative, "text_route": "vlm"})}
    )


def _engine(config, **settings: Any):  # type: ignore[no-untyped-def]
    from runtime.engine import Engine, EngineSettings

    return Engine(config, settings=EngineSettings(**settings)).start()


def _streamed(handle) -> tuple[str, Any]:  # type: ignore[no-untyped-def]
    """Content as the event stream delivered it, piece by piece, and the final event."""
    pieces, final = [], None
    for event in handle:
        pieces.append(event.content)
        final = event
    return "".join(pieces), final


@pytest.fixture(scope="module")
def engines(mtp_vlm_model: Path) -> Iterator[tuple[Any, Any]]:
    """The imported config drafting with its MTP layer, and the same config decoding plainly (no prefix cache)."""
    config = _config(mtp_vlm_model)
    drafting, plain = _engine(config), _engine(_without_mtp(config), prefix_cache=False)
    yield drafting, plain
    drafting.shutdown()
    plain.shutdown()


def test_the_importer_pins_mtp_from_the_weights_and_the_drafter_loads(
    mtp_vlm_model: Path, tmp_path: Path, engines: tuple[Any, Any]
) -> None:
    import json
    import shutil

    from gallery.config import Speculative
    from importers import import_model

    imported = import_model(str(mtp_vlm_model))
    assert imported.config.backend == "mlx-vlm"
    assert imported.config.mlx.speculative == Speculative(mtp=True, draft_kind="mtp")
    evidence = {(e.source, e.detail) for e in imported.config.mlx.decisions["speculative"].evidence}
    tensors = fixture_info(mtp_vlm_model)["mtp_tensors"]
    assert ("model.safetensors.index.json", f"{tensors} mtp.* tensors bundled") in evidence
    # The same config.json with the mtp.* tensors stripped from the weights (as many conversions do): not pinned.
    stripped = tmp_path / "stripped"
    shutil.copytree(mtp_vlm_model, stripped, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((stripped / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    (stripped / "model.safetensors.index.json").write_text(json.dumps(index))
    without = import_model(str(stripped)).config
    assert without.mlx.speculative.mtp is False
    assert "stripped" in " ".join(without.mlx.decisions["speculative"].conflicts)

    drafting, plain = engines
    backend = drafting.loaded.primary
    assert type(backend.draft_model).__name__ == "Qwen3_5MTPDraftModel" and backend.draft_kind == "mtp"
    assert plain.loaded.primary.draft_model is None


def test_drafting_never_changes_a_greedy_answer_alone_streaming_or_concurrent(
    engines: tuple[Any, Any],
) -> None:
    drafting, plain = engines
    requests = [request(text) for text in PROMPTS]
    # and drafting after a prompt with an image in it
    requests.append(request("What colour is this?", image=png((200, 30, 30))))
    expected = [plain.generate(request) for request in requests]
    alone = [drafting.generate(request) for request in requests]
    streamed = [_streamed(drafting.submit(request)) for request in requests]
    handles = [drafting.submit(request) for request in requests]
    together = [handle.result() for handle in handles]
    stream_handles = [drafting.submit(request) for request in requests]
    streamed_together = [_streamed(handle) for handle in stream_handles]

    assert len({answer.content for answer in expected}) >= len(requests) // 2  # answers depend on the prompt
    for index, want in enumerate(expected):
        assert want.usage.draft_tokens_accepted == 0
        for got in (alone[index], together[index]):
            assert got.content == want.content, (index, got.content, want.content)
            assert got.finish_reason == want.finish_reason
            assert got.usage.completion_tokens == want.usage.completion_tokens
            assert got.usage.prompt_tokens == want.usage.prompt_tokens
        for text, final in (streamed[index], streamed_together[index]):
            assert text == want.content and final.finish_reason == want.finish_reason
        # Each request drafts with its own drafter: the same drafts are accepted alone and in a batch.
        accepted = alone[index].usage.draft_tokens_accepted
        assert together[index].usage.draft_tokens_accepted == accepted
        assert streamed_together[index][1].usage.draft_tokens_accepted == accepted

    generated = sum(answer.usage.completion_tokens for answer in alone)
    accepted = sum(answer.usage.draft_tokens_accepted for answer in alone)
    assert 0 < accepted < generated  # drafts were accepted, and rejected
    status = drafting.status()["speculative"]
    assert status["draft_tokens"] >= 4 * generated and status["accepted"] >= 4 * accepted
    assert status["accepted"] < status["proposed"]  # mlx-vlm proposed more drafts than the model accepted
    # The acceptance rate, for the record (`pytest -s` shows it); random weights make it a property of the fixture.
    print(
        f"\nMTP acceptance: {status['accepted']}/{status['proposed']} drafts "
        f"({status['accepted'] / status['proposed']:.1%}); {accepted}/{generated} answer tokens from drafts"
    )
    assert plain.status()["speculative"] == {}


def test_a_seeded_sampled_request_drafts_and_is_the_same_alone_or_in_a_batch(
    engines: tuple[Any, Any],
) -> None:
    drafting, _plain = engines
    requests = [
        request(text, temperature=0.8, top_p=0.9, seed=7 + index) for index, text in enumerate(PROMPTS[:4])
    ]
    before = drafting.status()["speculative"]["draft_tokens"]
    alone = [drafting.generate(request) for request in requests]
    together = [handle.result() for handle in [drafting.submit(request) for request in requests]]
    assert [a.content for a in alone] == [t.content for t in together]
    assert [a.seed for a in alone] == [7, 8, 9, 10]
    assert drafting.status()["speculative"]["draft_tokens"] - before == 2 * sum(
        a.usage.completion_tokens for a in alone
    )  # every one of them drafted


def test_requests_drafting_cannot_honour_decode_without_drafts(engines: tuple[Any, Any]) -> None:
    """mlx-vlm's speculative loop applies logits processors to the first token only and gives no log-probs
    after it: such requests run without the drafter and get exactly the plain answer."""
    drafting, plain = engines
    unbiased = plain.generate(request(PROMPTS[0], logprobs=True))
    second = unbiased.logprobs[1].id  # the token the plain answer picks second
    for fields in ({"logit_bias": {second: -100.0}}, {"repeat_penalty": 1.3}, {"top_logprobs": 2}):
        want = plain.generate(request(PROMPTS[0], logprobs=True, **fields))
        got = drafting.generate(request(PROMPTS[0], logprobs=True, **fields))
        assert [t.id for t in got.logprobs] == [t.id for t in want.logprobs], fields
        assert got.content == want.content and got.usage.draft_tokens_accepted == 0
        if "logit_bias" in fields:  # the processor matters after the first token: ignoring it would show
            assert second not in [t.id for t in got.logprobs] and got.content != unbiased.content


def test_num_draft_tokens_sets_the_drafts_per_round_not_the_answer(engines: tuple[Any, Any]) -> None:
    from gallery.errors import RequestError

    drafting, plain = engines
    want = plain.generate(request(PROMPTS[2]))
    proposed = {}
    for drafts in (1, 4):
        before = drafting.status()["speculative"].get("proposed", 0)
        got = drafting.generate(request(PROMPTS[2], num_draft_tokens=drafts))
        assert got.content == want.content
        proposed[drafts] = drafting.status()["speculative"]["proposed"] - before
    # One draft per verification round against four: the longer blocks propose more drafts in all.
    assert proposed[4] > proposed[1] > 0
    # Without a drafter (and no text route to take it), the field is refused by name, not ignored.
    with pytest.raises(RequestError) as refused:
        plain.submit(request(PROMPTS[2], num_draft_tokens=4))
    assert refused.value.field == "num_draft_tokens"


def test_a_multi_turn_chat_with_the_prefix_cache_on_keeps_the_plain_answers(engines: tuple[Any, Any]) -> None:
    """The drafting engine keeps its VLM prefix cache on; a conversation still gets the plain answers. (mlx-vlm
    cannot trim a gated-delta state back to a shared prefix, so for this family it prefills each turn anew.)"""
    from runtime.request import GenerationRequest

    drafting, plain = engines
    assert drafting.status()["prefix_cache"]["vlm"]["enabled"]
    history: list[dict[str, Any]] = []
    for text in ("tell me about the river", "and the sea", "why is the sky blue"):
        history.append({"role": "user", "content": text})
        request = GenerationRequest(messages=[dict(m) for m in history], max_tokens=16, temperature=0.0)
        got, want = drafting.generate(request), plain.generate(request)
        assert got.content == want.content and got.finish_reason == want.finish_reason
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
        history.append({"role": "assistant", "content": got.content})
