"""A separate drafter pinned in `mlx.drafter` loads, drafts text requests, and never changes a greedy answer.

The target is the tiny qwen3_5 of `vlm-qwen35-mtp`; the drafter is `drafter-qwen35-dflash`, a one-layer DFlash
drafter (mlx-vlm's qwen3_dflash) whose first draft is the target's bigram choice, so verification accepts some
drafts and rejects others. The baseline is the same config without any drafter and with `text_route: vlm`, so
both engines run mlx-vlm's code and only the drafting differs. Drafted requests run one generator each, advanced
in turn (mlx-vlm's speculative loop is per request): "batched" here means concurrent with other requests.
Schema and pairing checks need no MLX and run first.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.drafting_support import png, request

SHA = "a" * 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPTS = ["tell me about the sea", "why", "seven cats and dogs quickly", "hello hello", "42", "a " * 20]


# ----------------------------------------------------------------------------------------------- the pin
def _data(**drafter: Any) -> dict[str, Any]:
    return {
        "name": "target",
        "backend": "mlx-vlm",
        "parameters": {"model": "org/target"},
        "mlx": {
            "source": {"repo": "org/target", "revision": COMMIT},
            "model_type": "qwen3_5",
            "chat_template": {"status": "missing"},
            "drafter": drafter,
        },
    }


def _pin(**changes: Any) -> dict[str, Any]:
    pin: dict[str, Any] = {
        "repo": "org/target-DFlash",
        "revision": COMMIT,
        "kind": "dflash",
        "model_type": "qwen3_dflash",
        "files": [{"path": "model.safetensors", "size": 10, "sha256": SHA}],
    }
    pin.update(changes)
    return {k: v for k, v in pin.items() if v is not None}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "medusa"}, "mlx.drafter.kind"),
        ({"revision": "main"}, "full 40-hex commit"),
        ({"revision": None}, "revision must be pinned"),
        ({"files": [{"path": "model.safetensors"}]}, "files without sha256: model.safetensors"),
        ({"files": []}, "files must list"),
        ({"repo": None}, "needs a repo"),
    ],
)
def test_a_drafter_pin_is_refused_by_name_when_incomplete(changes: dict[str, Any], message: str) -> None:
    from gallery.config import ModelConfig
    from gallery.configfile import parse_config_text
    from gallery.errors import BadConfig

    with pytest.raises(BadConfig) as refused:
        parse_config_text(json.dumps(_data(**_pin(**changes))), filename="target.yaml")
    assert message in str(refused.value)
    assert ModelConfig.model_validate(_data(**_pin())).mlx.drafter is not None


def test_a_text_backend_or_two_drafters_are_refused_and_older_fields_still_load() -> None:
    from gallery.config import ModelConfig
    from gallery.configfile import parse_config_text
    from gallery.errors import BadConfig

    text = _data(**_pin())
    text["backend"] = "mlx"
    with pytest.raises(BadConfig, match=r"mlx\.drafter: a dflash drafter runs on mlx-vlm"):
        parse_config_text(json.dumps(text), filename="text.yaml")
    both = _data(**_pin())
    both["mlx"]["speculative"] = {"draft_model": "./drafter"}
    with pytest.raises(BadConfig, match=r"mlx\.drafter and mlx\.speculative\.draft_model"):
        parse_config_text(json.dumps(both), filename="both.yaml")
    # Configs written before mlx.drafter keep loading: a local draft_model with its kind.
    older = _data()
    del older["mlx"]["drafter"]
    older["mlx"]["speculative"] = {"draft_model": "./drafter", "draft_kind": "mtp", "num_draft_tokens": 3}
    assert ModelConfig.model_validate(older).mlx.speculative.draft_kind == "mtp"
    older["mlx"]["speculative"]["draft_kind"] = "medusa"
    with pytest.raises(BadConfig, match="draft_kind"):
        parse_config_text(json.dumps(older), filename="older.yaml")


def test_mlx_vlm_rules_refuse_a_kind_the_drafter_cannot_run_or_a_target_it_cannot_verify() -> None:
    pytest.importorskip("mlx_vlm")
    from gallery.drafters import expected_kind, pairing_problem, size_problem

    assert expected_kind("qwen3_dflash") == "dflash" and expected_kind("llama") is None
    assert expected_kind("gemma4_assistant") == "mtp" and expected_kind("eagle3") == "eagle3"
    assert pairing_problem("gemma4", "mtp", "gemma4_assistant") is None
    wrong = pairing_problem("gemma4", "dflash", "gemma4_assistant")
    assert wrong and "needs kind 'mtp'" in wrong and "DRAFTER_KIND_BY_MODEL_TYPE" in wrong
    # compatibility.validate_dflash_target: a DFlash2 drafter needs rollback_speculative_cache on the target.
    assert pairing_problem("qwen3_5", "dflash", "dflash2") is None
    refused = pairing_problem("qwen2_vl", "dflash", "dflash2")
    assert refused and "rollback_speculative_cache" in refused
    target = {"text_config": {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1088}}
    drafter = {"hidden_size": 64, "vocab_size": 1000, "dflash_config": {"num_target_layers": 2}}
    assert "vocab_size 1000" in (size_problem(target, drafter, "qwen3_dflash", "dflash") or "")


# ----------------------------------------------------------------------------------------------- the runtime
def _configs(target: Path, drafter: Path) -> tuple[Any, Any]:
    from gallery.config import Drafter
    from importers import import_model

    imported = import_model(str(target)).config
    plain_spec = imported.mlx.speculative.model_copy(update={"mtp": False, "draft_kind": None})
    plain = imported.model_copy(
        update={"mlx": imported.mlx.model_copy(update={"speculative": plain_spec, "text_route": "vlm"})}
    )
    pin = Drafter(local_path=str(drafter), kind="dflash", model_type="qwen3_dflash", num_draft_tokens=3)
    drafting = plain.model_copy(update={"mlx": plain.mlx.model_copy(update={"drafter": pin})})
    return drafting, plain


@pytest.fixture(scope="module")
def engines(mtp_vlm_model: Path, dflash_drafter_model: Path) -> Iterator[tuple[Any, Any]]:
    """The target drafting with the pinned DFlash drafter, and the same target decoding plainly."""
    from runtime.engine import Engine, EngineSettings

    drafting_config, plain_config = _configs(mtp_vlm_model, dflash_drafter_model)
    drafting = Engine(drafting_config, settings=EngineSettings()).start()
    plain = Engine(plain_config, settings=EngineSettings(prefix_cache=False)).start()
    yield drafting, plain
    drafting.shutdown()
    plain.shutdown()


@pytest.mark.mlx
def test_the_pinned_drafter_loads_and_greedy_answers_equal_plain_alone_and_concurrent(
    engines: tuple[Any, Any],
) -> None:
    drafting, plain = engines
    backend = drafting.loaded.primary
    assert type(backend.draft_model).__name__ == "DFlashDraftModel" and backend.draft_kind == "dflash"
    requests = [request(text) for text in PROMPTS]
    expected = [plain.generate(request) for request in requests]
    alone = [drafting.generate(request) for request in requests]
    together = [handle.result() for handle in [drafting.submit(request) for request in requests]]
    for want, one, many in zip(expected, alone, together, strict=True):
        for got in (one, many):
            assert got.content.encode() == want.content.encode()
            assert got.finish_reason == want.finish_reason
            assert got.usage.completion_tokens == want.usage.completion_tokens
            assert got.route == "mlx-vlm"
        # Each request drafts with its own copy of the drafter: the same drafts alone and concurrently.
        assert many.usage.draft_tokens_accepted == one.usage.draft_tokens_accepted
        assert many.usage.draft_tokens_proposed == one.usage.draft_tokens_proposed
        assert one.usage.draft_tokens_proposed >= one.usage.draft_tokens_accepted
        assert want.usage.draft_tokens_proposed == 0
    accepted = sum(a.usage.draft_tokens_accepted for a in alone)
    generated = sum(a.usage.completion_tokens for a in alone)
    assert 0 < accepted < generated  # drafts were accepted, and rejected
    status = drafting.status()["speculative"]
    assert status["accepted"] >= 2 * accepted and status["proposed"] > status["accepted"]
    assert plain.status()["speculative"] == {}


@contextlib.contextmanager
def _tower_calls(module: Any) -> Iterator[list[Any]]:
    calls: list[Any] = []
    cls = type(module)
    original = cls.__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self is module:
            calls.append(args[0].shape if args else None)
        return original(self, *args, **kwargs)

    cls.__call__ = spy
    try:
        yield calls
    finally:
        cls.__call__ = original


@pytest.mark.mlx
def test_an_image_request_reaches_the_tower_and_keeps_the_plain_answer(engines: tuple[Any, Any]) -> None:
    """A DFlash drafter never sees pixels; the target does. Image requests go to mlx-vlm (never a text route), the
    tower runs, and the drafted answer is the plain one."""
    drafting, plain = engines
    tower = drafting.loaded.primary.model.vision_tower
    image = png((10, 200, 30))
    with _tower_calls(tower) as calls:
        got = drafting.generate(request("What colour is this?", image=image))
        text_only = drafting.generate(request("What colour is this?"))
    want = plain.generate(request("What colour is this?", image=image))
    assert len(calls) == 1  # the image request ran the tower; the text one did not
    assert got.route == "mlx-vlm" and got.content == want.content
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    assert text_only.usage.draft_tokens_proposed > 0


@pytest.mark.mlx
def test_usage_json_carries_acceptance_only_when_a_drafter_ran(engines: tuple[Any, Any]) -> None:
    from runtime.openai_response import usage_json

    drafting, plain = engines
    drafted = usage_json(drafting.generate(request(PROMPTS[2])).usage)
    assert drafted["draft_tokens_proposed"] > 0
    details = drafted["completion_tokens_details"]
    assert details["rejected_prediction_tokens"] == max(
        drafted["draft_tokens_proposed"] - details["accepted_prediction_tokens"], 0
    )
    assert "draft_tokens_proposed" not in usage_json(plain.generate(request(PROMPTS[2])).usage)


@pytest.mark.mlx
def test_a_drafter_with_the_wrong_kind_fails_the_load_by_name(
    mtp_vlm_model: Path, dflash_drafter_model: Path
) -> None:
    from gallery.errors import GalleryError
    from runtime.loader import load

    drafting, _plain = _configs(mtp_vlm_model, dflash_drafter_model)
    assert drafting.mlx.drafter is not None
    wrong = drafting.mlx.drafter.model_copy(update={"kind": "eagle3", "model_type": None})
    config = drafting.model_copy(update={"mlx": drafting.mlx.model_copy(update={"drafter": wrong})})
    with pytest.raises(GalleryError) as refused:
        load(config)
    assert "mlx.drafter: a qwen3_dflash drafter needs kind 'dflash', not 'eagle3'" in str(refused.value)


def test_gallery_validate_refuses_a_pairing_mlx_vlm_would_refuse(tmp_path: Path) -> None:
    pytest.importorskip("mlx_vlm")
    from catalog.validate import validate_paths
    from gallery.config import ModelConfig
    from gallery.yamlio import dump_yaml

    data = _data(**_pin(kind="mtp"))  # a qwen3_dflash drafter run with the MTP loop
    data["mlx"]["chat_template"] = {"status": "missing", "accept_missing": True}
    path = tmp_path / "target.yaml"
    path.write_text(dump_yaml(ModelConfig.model_validate(data).to_data()), encoding="utf-8")
    report = validate_paths([path])
    codes = {(p.code, p.message) for p in report.problems if p.severity == "error"}
    assert any(
        code == "drafter-pairing" and "qwen3_dflash drafter needs kind 'dflash', not 'mtp'" in message
        for code, message in codes
    ), codes


@pytest.mark.mlx
def test_a_gemma4_assistant_drafter_keeps_text_and_image_answers_plain(
    audio_vlm_model: Path, gemma4_assistant_model: Path
) -> None:
    """The issue's example pairing, tiny: a Gemma 4 MTP "assistant" (kind mtp, its own repo) on a gemma4 target.
    Its random weights make nearly every draft wrong, so this checks that verification keeps the target's answer,
    on text and on an image request (which still runs the vision tower)."""
    from gallery.config import Drafter
    from importers import import_model
    from runtime.engine import Engine, EngineSettings

    plain_config = import_model(str(audio_vlm_model)).config
    plain_config = plain_config.model_copy(
        update={"mlx": plain_config.mlx.model_copy(update={"text_route": "vlm"})}
    )
    pin = Drafter(local_path=str(gemma4_assistant_model), kind="mtp", model_type="gemma4_assistant")
    drafting_config = plain_config.model_copy(
        update={"mlx": plain_config.mlx.model_copy(update={"drafter": pin})}
    )
    plain = Engine(plain_config, settings=EngineSettings(prefix_cache=False)).start()
    # The prefix cache is on (the default): prefix reuse is refused on models with per-layer inputs, whose reused
    # prompts changed answers on mlx-vlm 0.7.10, so the repeated prompts below answer as the plain engine does.
    drafting = Engine(drafting_config, settings=EngineSettings()).start()
    try:
        assert type(drafting.loaded.primary.draft_model).__name__ == "Gemma4AssistantDraftModel"
        requests = [request(text, max_tokens=16) for text in PROMPTS[:4]]
        expected = [plain.generate(r) for r in requests]
        alone = [drafting.generate(r) for r in requests]
        together = [h.result() for h in [drafting.submit(r) for r in requests]]
        for want, one, many in zip(expected, alone, together, strict=True):
            assert one.content == want.content and many.content == want.content
            assert one.usage.draft_tokens_proposed > 0
        image = png((200, 30, 30))
        with _tower_calls(drafting.loaded.primary.model.vision_tower) as calls:
            got = drafting.generate(request("What colour is this?", image=image, max_tokens=16))
        want = plain.generate(request("What colour is this?", image=image, max_tokens=16))
        assert len(calls) == 1 and got.content == want.content
        assert drafting.status()["prefix_cache"]["vlm"]["reuse_refused"]
    finally:
        drafting.shutdown()
        plain.shutdown()
