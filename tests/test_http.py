"""The OpenAI-compatible HTTP server as a real process, driven by the real `openai` client (and curl).

Chat (streaming and not) on SmolLM2 and on a tiny VLM with an image, tool calls, reasoning_content that never
leaks a marker, structured output, the pinned stop set, logprobs, cached tokens in usage, disconnects that free
the slot, 16 concurrent clients, every bad input with its status and OpenAI's error shape (and the server keeps
serving), the API key, several models with LRU unloading, /v1/models, /health and /metrics.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interfaces_support import HttpProcess, running
from tests.plugins.models import fixture_info

pytestmark = pytest.mark.mlx
HI = [{"role": "user", "content": "hi"}]


def _png(color: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(
    scripted_text_model: Path,
    scripted_think_model: Path,
    scripted_tool_model: Path,
    text_qwen3_model: Path,
    vlm_model: Path,
) -> Iterator[HttpProcess]:
    """Five tiny models behind one server (at most three resident at once)."""
    with running(
        HttpProcess(
            str(scripted_text_model),
            str(scripted_think_model),
            str(scripted_tool_model),
            str(text_qwen3_model),
            str(vlm_model),
            "--max-models",
            "3",
            "--max-message-mb",
            "2",
        )
    ) as process:
        yield process  # type: ignore[misc]


def _post(server: HttpProcess, path: str, body: Any, **headers: str) -> Any:
    import httpx

    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server.url}{path}",
        content=content,
        timeout=120,
        headers={"content-type": "application/json", **headers},
    )


def _stream_text(stream: Any) -> tuple[str, str, list[Any], Any, Any]:
    """Content, reasoning, tool-call deltas, finish reason and usage of a streamed chat."""
    content, reasoning, calls, finish, usage = [], [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            content.append(delta.content or "")
            reasoning.append(getattr(delta, "reasoning_content", None) or "")
            calls.extend(delta.tool_calls or [])
            finish = choice.finish_reason or finish
    return "".join(content), "".join(reasoning), calls, finish, usage


def test_chat_stops_on_the_pinned_end_of_turn_streaming_and_not(
    server: HttpProcess, scripted_text_model: Path
) -> None:
    info = fixture_info(scripted_text_model)
    whole = server.client.chat.completions.create(model="scripted-text", messages=HI, max_tokens=40)
    assert whole.choices[0].message.content == info["answer"] and whole.choices[0].finish_reason == "stop"
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens == len(info["turn_ids"]) + 1
    stream = server.client.chat.completions.create(
        model="scripted-text", messages=HI, max_tokens=40, stream=True, stream_options={"include_usage": True}
    )
    content, _reasoning, _calls, finish, usage = _stream_text(stream)
    assert (
        content == info["answer"]
        and finish == "stop"
        and usage.completion_tokens == whole.usage.completion_tokens
    )
    assert (
        usage.prompt_tokens_details.cached_tokens > 0
    )  # the same prompt again: its prefix came from the cache


def test_the_real_smollm2_answers_streaming_and_not(smollm2_model: Path) -> None:
    """The real SmolLM2-135M-Instruct behind its own server: the answer, the stop, usage, the cache."""
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with running(HttpProcess(str(smollm2_model))) as process:
        assert isinstance(process, HttpProcess)
        whole = process.client.chat.completions.create(
            model="smollm2", messages=question, max_tokens=24, temperature=0
        )
        answer = whole.choices[0].message.content or ""
        assert "Paris" in answer and whole.choices[0].finish_reason == "stop"
        stream = process.client.chat.completions.create(
            model="smollm2",
            messages=question,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        content, _reasoning, _calls, finish, usage = _stream_text(stream)
        assert content == answer and finish == "stop"
        assert (
            usage.prompt_tokens == whole.usage.prompt_tokens and usage.prompt_tokens_details.cached_tokens > 0
        )


def test_reasoning_is_split_and_no_marker_ever_leaks(server: HttpProcess, scripted_think_model: Path) -> None:
    info = fixture_info(scripted_think_model)
    whole = server.client.chat.completions.create(
        model="scripted-think",
        messages=HI,
        max_tokens=40,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    message = whole.choices[0].message
    assert message.content == info["answer"] and message.reasoning_content == info["reasoning"]
    stream = server.client.chat.completions.create(
        model="scripted-think", messages=HI, max_tokens=40, stream=True
    )
    content, reasoning, _calls, _finish, _usage = _stream_text(stream)
    assert content == info["answer"] and reasoning == info["reasoning"]
    off = server.client.chat.completions.create(
        model="scripted-think",
        messages=HI,
        max_tokens=40,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert off.choices[0].message.content == info["answer"] and not getattr(
        off.choices[0].message, "reasoning_content", None
    )
    for text in (message.content, content, off.choices[0].message.content):
        assert "<think>" not in text and "</think>" not in text


def test_tool_calls_come_back_structured_streaming_and_not(server: HttpProcess) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    whole = server.client.chat.completions.create(
        model="scripted-tool", messages=messages, tools=tools, max_tokens=60
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("call_")
    stream = server.client.chat.completions.create(
        model="scripted-tool", messages=messages, tools=tools, max_tokens=60, stream=True
    )
    content, _reasoning, deltas, finish, _usage = _stream_text(stream)
    assert finish == "tool_calls" and content == ""
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    forced = server.client.chat.completions.create(  # enforced by the grammar of the config's call syntax
        model="scripted-tool", messages=messages, tools=tools, tool_choice="required", max_tokens=60
    )
    assert forced.choices[0].finish_reason == "tool_calls"
    assert json.loads(forced.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_json_schema_output_parses_and_validates(server: HttpProcess) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer", "count"],
        "additionalProperties": False,
    }
    result = server.client.chat.completions.create(
        model="text-qwen3",
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    parsed = json.loads(result.choices[0].message.content)
    assert (
        parsed["answer"] in ("yes", "no") and 0 <= parsed["count"] <= 9 and set(parsed) == {"answer", "count"}
    )


def test_logprobs_and_seeded_sampling(server: HttpProcess) -> None:
    result = server.client.chat.completions.create(
        model="text-qwen3", messages=HI, max_tokens=6, logprobs=True, top_logprobs=3, temperature=0
    )
    items = result.choices[0].logprobs.content
    assert len(items) == 6 and all(len(item.top_logprobs) == 3 for item in items)
    assert all(item.top_logprobs[0].token == item.token for item in items)  # greedy: the most likely token
    text = "".join(item.token for item in items)
    assert text == result.choices[0].message.content
    first = server.client.chat.completions.create(
        model="text-qwen3",
        messages=HI,
        max_tokens=8,
        temperature=1.0,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    again = server.client.chat.completions.create(
        model="text-qwen3",
        messages=HI,
        max_tokens=8,
        temperature=1.0,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    assert first.choices[0].message.content == again.choices[0].message.content


def test_an_image_reaches_the_vlm_and_counts_as_prompt_tokens(server: HttpProcess, vlm_model: Path) -> None:
    text_only = server.client.chat.completions.create(
        model="vlm-qwen2vl", messages=[{"role": "user", "content": "What is this?"}], max_tokens=4
    )
    with_image = server.client.chat.completions.create(
        model="vlm-qwen2vl",
        max_tokens=4,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _png((9, 8, 7))}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    )
    image_tokens = fixture_info(vlm_model)["image_tokens_for_64x64"]
    assert with_image.usage.prompt_tokens >= text_only.usage.prompt_tokens + image_tokens
    stream = server.client.chat.completions.create(
        model="vlm-qwen2vl",
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": _png((9, 8, 7))},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    )
    _content, _reasoning, _calls, finish, usage = _stream_text(stream)
    assert usage.prompt_tokens == with_image.usage.prompt_tokens and finish in ("stop", "length")


def test_legacy_completions_endpoint(server: HttpProcess, scripted_text_model: Path) -> None:
    info = fixture_info(scripted_text_model)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    result = server.client.completions.create(model="scripted-text", prompt=prompt, max_tokens=40, logprobs=2)
    choice = result.choices[0]
    assert choice.text == info["answer"] and choice.finish_reason == "stop"
    assert len(choice.logprobs.tokens) == len(info["turn_ids"]) and len(choice.logprobs.top_logprobs[0]) == 2
    streamed = "".join(
        c.choices[0].text
        for c in server.client.completions.create(
            model="scripted-text", prompt=prompt, max_tokens=40, stream=True
        )
        if c.choices
    )
    assert streamed == info["answer"]


def test_sixteen_concurrent_clients_all_get_complete_correct_answers(
    server: HttpProcess, scripted_text_model: Path
) -> None:
    info = fixture_info(scripted_text_model)

    def ask(i: int) -> tuple[str | None, str | None]:
        result = server.client.chat.completions.create(
            model="scripted-text",
            messages=[{"role": "user", "content": f"hello {i}"}],
            max_tokens=40,
            stream=i % 2 == 0,
        )
        if i % 2 == 0:
            content, _r, _c, finish, _u = _stream_text(result)
            return content, finish
        return result.choices[0].message.content, result.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == [(info["answer"], "stop")] * 16


def test_each_answer_alone_equals_the_answer_under_concurrency(server: HttpProcess) -> None:
    prompts = [
        f"tell me about {word}" for word in ("the sea", "a", "seven cold dogs", "why the sky", "hello")
    ]

    def ask(text: str) -> str | None:
        result = server.client.chat.completions.create(
            model="text-qwen3", max_tokens=8, temperature=0, messages=[{"role": "user", "content": text}]
        )
        return result.choices[0].message.content

    alone = [ask(text) for text in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def _metric(server: HttpProcess, name: str, labels: str) -> float:
    import httpx

    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_disconnect_frees_the_slot(server: HttpProcess) -> None:
    import httpx

    body = {"model": "text-qwen3", "messages": HI, "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)  # the answer is under way
    deadline = time.monotonic() + 60
    while _metric(server, "gallery_active_requests", 'model="text-qwen3"') > 0:
        assert time.monotonic() < deadline, "the abandoned generation was never cancelled"
        time.sleep(0.2)
    assert _metric(server, "gallery_requests_total", 'finish_reason="cancelled"') >= 1
    after = server.client.chat.completions.create(model="text-qwen3", messages=HI, max_tokens=3)
    assert after.choices[0].finish_reason == "length"


def test_a_full_queue_answers_429_with_retry_after_and_cors_only_when_asked(
    server: HttpProcess, text_qwen3_model: Path
) -> None:
    import httpx

    origin = "http://app.example"
    with running(
        HttpProcess(str(text_qwen3_model), "-o", "max_active:1", "-o", "max_queue:1", "--cors-origin", origin)
    ) as busy:
        assert isinstance(busy, HttpProcess)
        long = {"model": "text-qwen3", "messages": HI, "max_tokens": 3000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{busy.url}/v1/chat/completions", json=long, timeout=120) as running_one:
            lines = running_one.iter_lines()
            for _ in range(2):
                next(lines)  # the only slot is taken
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                queued = pool.submit(
                    busy.client.chat.completions.create, model="text-qwen3", messages=HI, max_tokens=5
                )
                deadline = time.monotonic() + 30
                while _metric(busy, "gallery_queue_depth", 'model="text-qwen3"') < 1:
                    assert time.monotonic() < deadline, "the second request never queued"
                    time.sleep(0.1)
                refused = _post(busy, "/v1/chat/completions", {"model": "text-qwen3", "messages": HI})
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert (
                    refused.json()["error"]["type"] == "rate_limit_error"
                    and refused.json()["error"]["code"] == "busy"
                )
                running_one.close()  # the client leaves: the queued request gets the slot
                assert queued.result(timeout=120).choices[0].finish_reason == "length"
        # CORS: the configured origin is allowed (preflight and answer); any other origin is not.
        preflight = {
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        }
        allowed = httpx.options(f"{busy.url}/v1/chat/completions", headers={"origin": origin, **preflight})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == origin
        other = httpx.options(
            f"{busy.url}/v1/chat/completions", headers={"origin": "http://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in other.headers
        answered = _post(
            busy,
            "/v1/chat/completions",
            {"model": "text-qwen3", "messages": HI, "max_tokens": 2},
            origin=origin,
        )
        assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == origin
    # Off by default: the shared server names no origin.
    plain = _post(
        server,
        "/v1/chat/completions",
        {"model": "text-qwen3", "messages": HI, "max_tokens": 2},
        origin=origin,
    )
    # A keyless server without that origin allowed refuses the cross-site call outright (browser boundary).
    assert plain.status_code == 403 and "access-control-allow-origin" not in plain.headers


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_request", None),
        ({"model": "no-such-model", "messages": HI}, 404, "not_found", None),
        ({"model": "scripted-text", "messages": HI, "n": 2}, 400, "invalid_request", "n"),
        (
            {"model": "scripted-text", "messages": HI, "best_of_luck": 1},
            400,
            "invalid_request",
            "best_of_luck",
        ),
        (
            {"model": "scripted-text", "messages": HI, "temperature": -1},
            400,
            "invalid_request",
            "temperature",
        ),
        (
            {
                "model": "scripted-text",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}],
                    }
                ],
            },
            400,
            "invalid_request",
            None,
        ),
        (
            {
                "model": "vlm-qwen2vl",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}],
                    }
                ],
            },
            400,
            "invalid_request",
            None,
        ),
        (
            {"model": "scripted-text", "messages": [{"role": "user", "content": "x" * 3_000_000}]},
            413,
            "too_large",
            None,
        ),
    ],
)
def test_bad_requests_get_their_status_and_the_server_keeps_serving(
    server: HttpProcess, body: Any, status: int, code: str, param: str | None
) -> None:
    response = _post(server, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    ok = server.client.chat.completions.create(model="scripted-text", messages=HI, max_tokens=40)
    assert ok.choices[0].finish_reason == "stop"


def test_models_health_and_metrics(server: HttpProcess) -> None:
    import httpx

    cards = {card.id: card for card in server.client.models.list().data}
    assert set(cards) >= {"scripted-text", "scripted-think", "scripted-tool", "text-qwen3", "vlm-qwen2vl"}
    vlm = cards["vlm-qwen2vl"].model_dump()
    assert vlm["backend"] == "mlx-vlm" and "image" in vlm["input_modalities"] and vlm["context_length"]
    assert cards["scripted-think"].model_dump()["reasoning"] is True
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in (
        "gallery_requests_total",
        "gallery_tokens_total",
        "gallery_time_to_first_token_seconds_bucket",
        "gallery_time_per_output_token_seconds_bucket",
        "gallery_queue_depth",
        "gallery_batch_size",
        "gallery_prefix_cache_hits_total",
    ):
        assert name in text, name
    resident = sum(1 for card in server.client.models.list().data if card.model_dump()["loaded"])
    assert resident <= 3  # --max-models 3: the least recently used idle model was unloaded


def test_curl_gets_an_answer(server: HttpProcess, scripted_text_model: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "scripted-text", "messages": HI, "max_tokens": 40})
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            f"{server.url}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (
        json.loads(done.stdout)["choices"][0]["message"]["content"]
        == fixture_info(scripted_text_model)["answer"]
    )


def test_the_api_key_is_required_and_one_header_only(scripted_text_model: Path) -> None:
    import httpx

    with running(HttpProcess(str(scripted_text_model), "--api-key", "s3cret", api_key="s3cret")) as process:
        assert isinstance(process, HttpProcess)
        assert process.client.chat.completions.create(
            model="scripted-text", messages=HI, max_tokens=5
        ).choices
        url = f"{process.url}/v1/models"
        assert httpx.get(url, timeout=10).status_code == 401
        assert httpx.get(url, headers={"authorization": "Bearer wrong"}, timeout=10).status_code == 401
        two = httpx.get(
            url, headers=[("authorization", "Bearer wrong"), ("authorization", "Bearer s3cret")], timeout=10
        )
        assert two.status_code == 401 and two.json()["error"]["code"] == "unauthenticated"
        assert httpx.get(f"{process.url}/health", timeout=10).json() == {
            "status": "ok"
        }  # no model list without it
