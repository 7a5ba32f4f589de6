"""The runtime core on real tiny MLX models: stops, routes, media, reasoning, tools, usage, lifecycle."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.models import fixture_info

pytestmark = pytest.mark.mlx
ROOT = Path(__file__).resolve().parent.parent


def _config(folder: Path, **changes):  # type: ignore[no-untyped-def]
    from importers import import_model

    config = import_model(str(folder)).config
    return config.model_copy(update=changes) if changes else config


def _engine(config, **settings):  # type: ignore[no-untyped-def]
    from runtime.engine import Engine, EngineSettings

    return Engine(config, settings=EngineSettings(**settings)).start()


def _png(color: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(text: str = "Hi there", image: str | None = None) -> list[dict]:
    if image is None:
        return [{"role": "user", "content": text}]
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}],
        }
    ]


@pytest.fixture(scope="module")
def text_engine(scripted_text_model: Path) -> Iterator:
    engine = _engine(_config(scripted_text_model))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def vlm_engine(scripted_vlm_model: Path) -> Iterator:
    engine = _engine(_config(scripted_vlm_model))
    yield engine
    engine.shutdown()


def test_end_of_turn_declared_only_in_generation_config_stops_on_every_route(
    scripted_text_model: Path, scripted_vlm_model: Path, text_engine, vlm_engine
) -> None:
    from runtime.request import GenerationRequest

    info = fixture_info(scripted_text_model)
    config = text_engine.config
    # the premise: only generation_config.json names the end-of-turn token
    eot = next(t for t in config.mlx.stop_tokens if t.id == info["end_of_turn_id"])
    assert eot.sources == ["generation_config.json:eos_token_id"]
    routes = {}
    for engine, image in ((text_engine, None), (vlm_engine, None), (vlm_engine, _png())):
        for stream in (False, True):
            handle = engine.submit(GenerationRequest(messages=_chat(image=image), max_tokens=40))
            events = list(handle)
            answer = "".join(e.content for e in events)
            final = events[-1]
            assert answer == info["answer"], (final.route, answer)
            assert final.finish_reason == "stop"
            assert (
                final.usage.completion_tokens == len(info["turn_ids"]) + 1
            )  # the answer plus the stop token
            assert final.usage.prompt_tokens > 0
            assert info["junk"] not in answer
            routes[final.route] = final.usage.prompt_tokens
            del stream
    assert set(routes) == {"mlx", "text-route", "mlx-vlm"}


def test_without_the_pinned_end_of_turn_the_answer_runs_into_junk(scripted_text_model: Path) -> None:
    from runtime.request import GenerationRequest

    info = fixture_info(scripted_text_model)
    config = _config(scripted_text_model)
    mlx = config.mlx.model_copy(
        update={"stop_tokens": [t for t in config.mlx.stop_tokens if t.id != info["end_of_turn_id"]]}
    )
    engine = _engine(config.model_copy(update={"mlx": mlx, "stopwords": []}))
    try:
        result = engine.generate(GenerationRequest(messages=_chat(), max_tokens=40))
    finally:
        engine.shutdown()
    assert info["junk"].split()[0] in result.content  # what users see when a stop token is lost


def test_stop_strings_never_leak_while_streaming(text_engine, scripted_text_model: Path) -> None:
    from runtime.request import GenerationRequest

    info = fixture_info(scripted_text_model)
    stop = " scripted model"
    events = list(text_engine.submit(GenerationRequest(messages=_chat(), stop=[stop], max_tokens=40)))
    streamed = [e.content for e in events]
    text = "".join(streamed)
    assert text == info["answer"][: info["answer"].index(stop)]
    for i in range(1, len(stop) + 1):  # no prefix of the stop string was ever sent
        assert not text.endswith(stop[:i])
    assert events[-1].finish_reason == "stop" and events[-1].usage.prompt_tokens > 0


def test_image_reaches_the_vision_tower_and_counts_as_prompt_tokens(
    vlm_engine, scripted_vlm_model: Path
) -> None:
    from runtime.request import GenerationRequest

    tower = vlm_engine.loaded.primary.model.vision_tower
    calls = []
    original = type(tower).__call__

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0].shape if args else None)
        return original(self, *args, **kwargs)

    type(tower).__call__ = spy
    try:
        # An image no earlier test sent: a cached prefix holding it would (rightly) skip the tower.
        with_image = vlm_engine.generate(
            GenerationRequest(messages=_chat("Describe.", image=_png((1, 2, 3))), max_tokens=5)
        )
        without = vlm_engine.generate(GenerationRequest(messages=_chat("Describe."), max_tokens=5))
    finally:
        type(tower).__call__ = original
    assert len(calls) == 1  # the tower ran once: for the image request, not for the text one
    assert with_image.route == "mlx-vlm" and without.route == "text-route"
    image_tokens = fixture_info(scripted_vlm_model).get("image_tokens_for_64x64", 1)
    assert with_image.usage.prompt_tokens >= without.usage.prompt_tokens + image_tokens


def test_text_route_shares_weights_and_matches_the_vlm_path(vlm_model: Path) -> None:
    from backends.text_route import shares_weights
    from runtime.request import GenerationRequest

    config = _config(vlm_model)
    assert config.mlx.text_route == "shared-weights"
    engine = _engine(config)
    vlm_only = _engine(config.model_copy(update={"mlx": config.mlx.model_copy(update={"text_route": "vlm"})}))
    try:
        loaded = engine.loaded
        assert loaded.text_route is not None and shares_weights(loaded.text_route, loaded.primary.model)
        prompt = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
        assert loaded.text_route.tokenize(prompt) == loaded.primary.tokenize(prompt)
        request = GenerationRequest(prompt=prompt, max_tokens=24, temperature=0.0, logprobs=True)
        via_text, via_vlm = engine.generate(request), vlm_only.generate(request)
        assert (via_text.route, via_vlm.route) == ("text-route", "mlx-vlm")
        assert [t.id for t in via_text.logprobs] == [t.id for t in via_vlm.logprobs]
        assert via_text.content == via_vlm.content and via_text.usage == via_vlm.usage
    finally:
        engine.shutdown()
        vlm_only.shutdown()


def _greedy(decoder, spec) -> list[int]:  # type: ignore[no-untyped-def]
    decoder.add(spec)
    tokens: list[int] = []
    while decoder.busy():
        for token in decoder.step():
            if token.token is not None:
                tokens.append(token.token)
    return tokens


def test_quantized_vlm_text_route_still_shares_weights(vlm_model: Path) -> None:
    import mlx.nn as nn

    from backends.decoding import DecodeSpec, PrefixCache, TextBatcher, VlmStreams
    from backends.mlx_vlm_backend import MlxVlmBackend
    from backends.text_route import build_shared_text_backend, shares_weights

    def build() -> bool:
        import json

        vlm = MlxVlmBackend.load(vlm_model)
        nn.quantize(vlm.model.language_model, group_size=32, bits=4)
        config = json.loads((vlm_model / "config.json").read_text())
        text = build_shared_text_backend(vlm.model, config, vlm_model)
        quantized = sum(
            isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in text.model.named_modules()
        )
        prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        stops = frozenset({1026})
        via_text = _greedy(
            TextBatcher(text.model, PrefixCache(entries=0, max_bytes=0)),
            DecodeSpec(uid=1, max_tokens=8, stop_ids=stops, prompt=text.tokenize(prompt)),
        )
        via_vlm = _greedy(
            VlmStreams(vlm.model, vlm.processor, prefix_entries=0),
            DecodeSpec(uid=1, max_tokens=8, stop_ids=stops, prompt_text=prompt),
        )
        return quantized > 0 and via_text == via_vlm and shares_weights(text, vlm.model)

    from backends import run_on_mlx_thread

    result: list[bool] = []
    run_on_mlx_thread(lambda: result.append(build())).wait(120)
    assert result == [True]


def test_media_to_a_text_config_is_a_clear_error(text_engine) -> None:
    from gallery.errors import RequestError
    from runtime.request import GenerationRequest

    with pytest.raises(RequestError, match=r"text-only\) backend and cannot take image"):
        text_engine.submit(GenerationRequest(messages=_chat(image=_png())))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,!!!notbase64", "not valid base64"),
        ("data:image/png;base64,AAAA", "not a decodable image"),
        ("http://example.com/cat.png", "remote URLs are disabled"),
        ("/no/such/file.png", "no such file"),
    ],
)
def test_bad_media_is_rejected_before_queueing(vlm_engine, url: str, message: str) -> None:
    from gallery.errors import RequestError
    from runtime.request import GenerationRequest

    with pytest.raises(RequestError, match=message):
        vlm_engine.submit(GenerationRequest(messages=_chat(image=url)))
    assert vlm_engine.status()["state"] == "READY"


def test_thinking_off_strips_markers_the_model_emits_anyway(scripted_think_model: Path) -> None:
    from runtime.request import GenerationRequest

    info = fixture_info(scripted_think_model)
    engine = _engine(_config(scripted_think_model))
    try:
        on = engine.generate(GenerationRequest(messages=_chat(), enable_thinking=True))
        off_events = list(engine.submit(GenerationRequest(messages=_chat(), enable_thinking=False)))
    finally:
        engine.shutdown()
    assert on.reasoning == info["reasoning"] and on.content == info["answer"]
    off = "".join(e.content for e in off_events)
    assert off == info["answer"]
    assert all(
        "<think>" not in e.content and "</think>" not in e.content and not e.reasoning for e in off_events
    )


def test_tool_calls_become_structured(scripted_tool_model: Path) -> None:
    import json

    from runtime.request import GenerationRequest

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    engine = _engine(_config(scripted_tool_model))
    try:
        with_tools = engine.generate(GenerationRequest(messages=_chat("Weather in Paris?"), tools=tools))
        without = engine.generate(GenerationRequest(messages=_chat("Weather in Paris?")))
    finally:
        engine.shutdown()
    assert with_tools.finish_reason == "tool_calls" and with_tools.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in with_tools.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert "<tool_call>" in without.content and not without.tool_calls  # no tools offered: plain text


def test_strict_template_accepts_real_client_traffic(scripted_text_model: Path) -> None:
    from gallery.chat_template import template_sha256
    from runtime.request import GenerationRequest

    strict = (
        "{% if messages[0].role == 'system' %}{% set rest = messages[1:] %}<<SYS>>{{ messages[0].content }}<</SYS>>"
        "{% else %}{% set rest = messages %}{% endif %}"
        "{% for m in rest %}{% if m.role == 'system' %}{{ raise_exception('System message must be at the beginning') }}"
        "{% endif %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    config = _config(scripted_text_model)
    template = config.mlx.chat_template.model_copy(update={"text": strict, "sha256": template_sha256(strict)})
    engine = _engine(
        config.model_copy(update={"mlx": config.mlx.model_copy(update={"chat_template": template})})
    )
    try:
        messy = [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {"role": "system", "content": "Answer in English."},
            {"role": "user", "content": [{"type": "text", "text": "Still there?"}]},
            {"role": "user", "content": "Say hi."},
        ]
        result = engine.generate(GenerationRequest(messages=messy, max_tokens=20))
        assert (
            result.content == fixture_info(scripted_text_model)["answer"] and result.usage.prompt_tokens > 0
        )
        from runtime.messages import normalize_messages

        well_formed = [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "U2"},
        ]
        assert normalize_messages(well_formed).messages == well_formed  # unchanged
    finally:
        engine.shutdown()


def test_cancel_frees_the_worker_and_the_next_request_succeeds(smollm2_model: Path) -> None:
    from runtime.request import GenerationRequest

    engine = _engine(_config(smollm2_model))
    try:
        handle = engine.submit(
            GenerationRequest(
                messages=_chat("Write a long story about the sea."), max_tokens=400, temperature=0.0
            )
        )
        events = handle.events()
        first = next(events)
        assert first.content or first.reasoning
        cancelled_at = time.perf_counter()
        handle.cancel()
        final = [e for e in events][-1]
        assert final.finish_reason == "cancelled" and time.perf_counter() - cancelled_at < 5
        assert engine.status()["state"] == "READY"
        answer = engine.generate(
            GenerationRequest(messages=_chat("What is the capital of France?"), max_tokens=30)
        )
        assert "Paris" in answer.content and answer.finish_reason == "stop"
    finally:
        engine.shutdown()


def test_concurrent_requests_all_complete_correctly(text_engine, scripted_text_model: Path) -> None:
    from runtime.request import GenerationRequest

    answer = fixture_info(scripted_text_model)["answer"]
    handles = [
        text_engine.submit(GenerationRequest(messages=_chat(f"hello {i}"), max_tokens=30)) for i in range(16)
    ]
    results = [h.result() for h in handles]
    assert all(
        r.content == answer and r.finish_reason == "stop" and r.usage.prompt_tokens > 0 for r in results
    )


def test_speculative_draft_model_gives_the_same_answer(scripted_text_model: Path) -> None:
    from gallery.config import Speculative
    from runtime.request import GenerationRequest

    config = _config(scripted_text_model)
    spec = Speculative(draft_model=str(scripted_text_model), num_draft_tokens=3)
    engine = _engine(config.model_copy(update={"mlx": config.mlx.model_copy(update={"speculative": spec})}))
    try:
        result = engine.generate(GenerationRequest(messages=_chat(), max_tokens=30))
    finally:
        engine.shutdown()
    assert result.content == fixture_info(scripted_text_model)["answer"] and result.finish_reason == "stop"


def test_missing_template_loads_loudly_and_refuses_chat(text_notemplate_model: Path, caplog) -> None:
    from gallery.errors import RequestError, StrictFailure
    from runtime.engine import Engine
    from runtime.request import GenerationRequest

    config = _config(text_notemplate_model)
    assert config.mlx.chat_template.status == "missing"
    with pytest.raises(StrictFailure):
        Engine(config, strict=True).start()
    engine = _engine(config)
    try:
        # logged as a warning on the "runtime" logger (servers log it; the CLI shows its own one warning instead)
        assert any(
            "HAS NO CHAT TEMPLATE" in r.getMessage() and r.levelname == "WARNING" and r.name == "runtime"
            for r in caplog.records
        )
        assert any("NO CHAT TEMPLATE" in w for w in engine.status()["warnings"])
        with pytest.raises(RequestError, match="no chat template"):
            engine.submit(GenerationRequest(messages=_chat()))
        raw = engine.generate(
            GenerationRequest(prompt="<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", max_tokens=20)
        )
        assert raw.content and raw.usage.prompt_tokens > 0
    finally:
        engine.shutdown()


def test_smollm2_answers_a_factual_question(smollm2_model: Path) -> None:
    from runtime.request import GenerationRequest

    engine = _engine(_config(smollm2_model))
    try:
        result = engine.generate(
            GenerationRequest(messages=_chat("What is the capital of France?"), max_tokens=30)
        )
    finally:
        engine.shutdown()
    assert "Paris" in result.content and result.usage.prompt_tokens > 0 and result.finish_reason == "stop"


def test_text_config_never_imports_mlx_vlm(scripted_text_model: Path) -> None:
    code = (
        "import sys\nfrom importers import import_model\nfrom runtime.engine import Engine\n"
        "from runtime.request import GenerationRequest\n"
        f"e = Engine(import_model({str(scripted_text_model)!r}).config).start()\n"
        "print(e.generate(GenerationRequest(messages=[{'role': 'user', 'content': 'hi'}])).content)\n"
        "e.shutdown()\nprint('mlx_vlm' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_gallery_run_streams_and_reports_usage(
    scripted_think_model: Path, scripted_vlm_model: Path, scripted_text_model: Path, tmp_path: Path
) -> None:
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", "run", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
        )

    think = run(str(scripted_think_model), "--prompt", "hi")
    assert think.returncode == 0 and think.stdout.strip() == "The answer is 42."
    assert "[reasoning] Let me think about it." in think.stderr and "completion" in think.stderr
    off = run(str(scripted_think_model), "--prompt", "hi", "--no-thinking")
    assert off.stdout.strip() == "The answer is 42." and "[reasoning]" not in off.stderr
    vision = run(str(scripted_vlm_model), "--prompt", "what?", "--image", str(image))
    assert vision.returncode == 0 and "route mlx-vlm" in vision.stderr
    refused = run(str(scripted_text_model), "--prompt", "what?", "--image", str(image))
    assert (
        refused.returncode == 2
        and "cannot take image" in refused.stderr
        and "Traceback" not in refused.stderr
    )
