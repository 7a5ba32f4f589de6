"""The APIs agents and apps speak (issue 21): OpenAI Responses, Anthropic Messages and Ollama's API, each driven
by its official client against a real server process on the tiny scripted models.

- `openai`: `responses.create` and `responses.stream` (the full event sequence, reasoning as its own item), a
  function-call round trip, `previous_response_id` (reusing the prefix cache: cached input tokens), the store
  (`GET` / `DELETE`, `store: false`), hosted tools refused by name.
- `anthropic`: `messages.create` and `messages.stream`, a tool_use → tool_result round trip, `count_tokens`,
  thinking on the scripted thinking models with no marker ever in a text block, `stop_sequence`, Anthropic's
  error shape, and `x-api-key` / `Authorization: Bearer` on a keyed server.
- `ollama`: `list`, `chat`, streamed chat, `show`, `ps`, tools, `format`, `keep_alive: 0`, `GET /`,
  `HEAD /api/tags`, options refused by name in Ollama's error shape.
- The equality rule across doors: the same greedy request through Chat Completions, Responses, Messages and
  Ollama chat gives the same text (scripted-text and text-qwen3).
- A real agent program (pydantic-ai's Agent, on the Responses API and on the Messages API) drives a multi-step tool
  loop (the openai-agents SDK has no release that installs beside openai 3.x and websockets 17).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.interfaces_support import HttpProcess, running

pytestmark = pytest.mark.mlx

MARKERS = ("<think>", "</think>", "<th|ink>", "</|think>", "think>")
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
UNIT_SCHEMA = {
    "type": "object",
    "properties": {"unit": {"enum": ["C", "F"]}},
    "required": ["unit"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(
    scripted_text_model: Path,
    scripted_think_model: Path,
    scripted_textthink_model: Path,
    scripted_tool_model: Path,
    scripted_toolloop_model: Path,
    text_qwen3_model: Path,
    vlm_model: Path,
) -> Iterator[HttpProcess]:
    with running(
        HttpProcess(
            str(scripted_text_model),
            str(scripted_think_model),
            str(scripted_textthink_model),
            str(scripted_tool_model),
            str(scripted_toolloop_model),
            str(text_qwen3_model),
            str(vlm_model),
            "--max-models",
            "7",
        )
    ) as process:
        yield process  # type: ignore[misc]


@pytest.fixture(scope="module")
def claude(server: HttpProcess) -> Iterator[Any]:
    import anthropic

    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def llama(server: HttpProcess) -> Any:
    import ollama

    return ollama.Client(host=server.url, timeout=120)


def _no_marker(text: str) -> None:
    assert not any(marker in text for marker in MARKERS), text


# ----------------------------------------------------------------------------------------------- Responses
def test_responses_create_splits_reasoning_from_text(server: HttpProcess) -> None:
    response = server.client.responses.create(model="scripted-think", input="Hi", max_output_tokens=40)
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output_text == "The answer is 42."
    reasoning = response.output[0]
    assert reasoning.content is not None and reasoning.content[0].text == "Let me think about it."
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens > 0
    cut = server.client.responses.create(model="scripted-text", input="Hi", max_output_tokens=2)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    with server.client.responses.stream(model="scripted-text", input="Hi", max_output_tokens=2) as stream:
        last = list(stream)[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"


@pytest.mark.parametrize("model", ["scripted-think", "scripted-textthink"])
def test_responses_stream_has_the_full_event_sequence(server: HttpProcess, model: str) -> None:
    with server.client.responses.stream(model=model, input="Hi", max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert kind in kinds, kind
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == final.output_text == "The answer is 42."
    _no_marker(text)


def test_responses_function_call_round_trip_and_previous_response_id(server: HttpProcess) -> None:
    client = server.client
    first = client.responses.create(
        model="scripted-tool",
        input="Weather in Paris?",
        tools=[WEATHER_TOOL],
        max_output_tokens=60,  # type: ignore[list-item]
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    # The result, by id (the stored turns are rendered again in front of it) …
    by_id = client.responses.create(
        model="scripted-tool",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18C"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        max_output_tokens=60,
    )
    assert by_id.status == "completed" and by_id.previous_response_id == first.id
    assert by_id.usage is not None and by_id.usage.input_tokens > first.usage.input_tokens  # type: ignore[union-attr]
    # … and the same turn sent in full as items (what stateless agents do).
    items: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    items += [item.model_dump(exclude_none=True) for item in first.output]
    items.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "18C"})
    whole = client.responses.create(
        model="scripted-tool",
        input=items,
        tools=[WEATHER_TOOL],
        max_output_tokens=60,
        store=False,  # type: ignore[list-item]
    )
    assert whole.usage is not None and whole.usage.input_tokens == by_id.usage.input_tokens
    # The stream of a call: arguments as function_call_arguments events.
    with client.responses.stream(
        model="scripted-tool",
        input="Weather?",
        tools=[WEATHER_TOOL],
        max_output_tokens=60,  # type: ignore[list-item]
    ) as stream:
        kinds = [event.type for event in stream]
    assert (
        "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    )


def test_previous_response_id_reuses_the_prefix_cache_and_the_store_is_honoured(server: HttpProcess) -> None:
    client = server.client
    first = client.responses.create(model="scripted-text", input="Tell me a story.", max_output_tokens=20)
    second = client.responses.create(
        model="scripted-text", input="And another.", previous_response_id=first.id, max_output_tokens=20
    )
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 2
    fetched = httpx.get(f"{server.url}/v1/responses/{second.id}").json()
    assert fetched["id"] == second.id and fetched["output"][0]["content"][0]["text"] == second.output_text
    deleted = httpx.delete(f"{server.url}/v1/responses/{first.id}")
    assert deleted.json() == {"id": first.id, "object": "response.deleted", "deleted": True}
    assert httpx.get(f"{server.url}/v1/responses/{first.id}").status_code == 404
    unstored = client.responses.create(model="scripted-text", input="Hi", max_output_tokens=5, store=False)
    assert httpx.get(f"{server.url}/v1/responses/{unstored.id}").status_code == 404


def test_responses_refuse_by_name(server: HttpProcess) -> None:
    import openai

    for body, param in (
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"background": True}, "background"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
        ({"made_up": 1}, "made_up"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            server.client.responses.create(
                model="scripted-text",
                input="Hi",
                extra_body=body,
                max_output_tokens=5,  # type: ignore[arg-type]
            )
        assert param in str(caught.value), (body, caught.value)


# ----------------------------------------------------------------------------------------------- Messages
def test_messages_create_and_stream_keep_thinking_out_of_text(claude: Any) -> None:
    for model in ("scripted-think", "scripted-textthink"):
        message = claude.messages.create(
            model=model,
            max_tokens=60,
            thinking={"type": "enabled", "budget_tokens": 40},
            messages=[{"role": "user", "content": "Hi"}],
        )
        assert [block.type for block in message.content] == ["thinking", "text"], model
        assert message.content[0].thinking == "Let me think about it."
        assert message.content[1].text == "The answer is 42." and message.stop_reason == "end_turn"
        with claude.messages.stream(
            model=model, max_tokens=60, messages=[{"role": "user", "content": "Hi"}]
        ) as stream:
            events = list(stream)
            final = stream.get_final_message()
        kinds = [event.type for event in events]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert "message_delta" in kinds and kinds.count("content_block_start") == kinds.count(
            "content_block_stop"
        )
        text_deltas = [
            event.delta.text
            for event in events
            if event.type == "content_block_delta" and event.delta.type == "text_delta"
        ]
        for piece in text_deltas:
            _no_marker(piece)
        assert "".join(text_deltas) == "The answer is 42."
        for block in final.content:
            if block.type == "text":
                _no_marker(block.text)


def test_messages_thinking_budget_closes_the_thinking_block(claude: Any) -> None:
    message = claude.messages.create(
        model="scripted-think",
        max_tokens=60,
        thinking={"type": "enabled", "budget_tokens": 2},
        messages=[{"role": "user", "content": "Hi"}],
    )
    thinking, text = message.content[0].thinking, message.content[-1].text
    assert len(thinking) < len("Let me think about it.") and "Let me think about it.".startswith(thinking)
    _no_marker(text)
    assert text.endswith("The answer is 42.")


def test_messages_stream_raw_choreography(server: HttpProcess) -> None:
    body = {
        "model": "scripted-text",
        "max_tokens": 20,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=60) as response:
        names = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"]
    assert names[2:5] == ["content_block_start", "content_block_delta", "content_block_delta"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_messages_tool_use_round_trip_count_tokens_and_stops(claude: Any) -> None:
    tools = [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "input_schema": WEATHER_TOOL["parameters"],
        }
    ]
    first = claude.messages.create(
        model="scripted-tool", max_tokens=60, tools=tools, messages=[{"role": "user", "content": "Weather?"}]
    )
    assert first.stop_reason == "tool_use"
    use = next(block for block in first.content if block.type == "tool_use")
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    conversation = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    second = claude.messages.create(model="scripted-tool", max_tokens=60, tools=tools, messages=conversation)
    assert second.stop_reason == "tool_use"
    counted = claude.messages.count_tokens(model="scripted-tool", tools=tools, messages=conversation)
    assert counted.input_tokens == second.usage.input_tokens + second.usage.cache_read_input_tokens
    with claude.messages.stream(
        model="scripted-tool", max_tokens=60, tools=tools, messages=conversation
    ) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "input_json_delta" in deltas and final.content[-1].input == {"city": "Paris"}
    stopped = claude.messages.create(
        model="scripted-text",
        max_tokens=60,
        stop_sequences=["scripted"],
        messages=[{"role": "user", "content": "Hi"}],
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "scripted"
    assert stopped.content[0].text == "Hello from the "
    short = claude.messages.create(
        model="scripted-text", max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
    )
    assert short.stop_reason == "max_tokens"


def test_messages_errors_are_anthropics_shape(claude: Any, server: HttpProcess) -> None:
    import anthropic

    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(
            model="scripted-text",
            max_tokens=5,
            messages=[{"role": "user", "content": "Hi"}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "server tool" in caught.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError, match="prefill"):
        claude.messages.create(
            model="scripted-text",
            max_tokens=5,
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        )
    missing = httpx.post(f"{server.url}/v1/messages", json={"model": "nope", "max_tokens": 5, "messages": []})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.models.retrieve(
            "nope"
        )  # /v1/models/{id} stays OpenAI's route, but the client still reads a 404


def test_messages_take_x_api_key_and_bearer_and_a_second_address_serves_ollama(
    scripted_text_model: Path,
) -> None:
    import anthropic

    with running(
        HttpProcess(str(scripted_text_model), "--api-key", "sekret", "--ollama-addr", "127.0.0.1:0")
    ) as keyed:
        body = {"model": "scripted-text", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
        ok = anthropic.Anthropic(base_url=keyed.url, api_key="sekret", max_retries=0)
        assert ok.messages.create(**body).content[0].text  # type: ignore[arg-type]
        bearer = httpx.post(f"{keyed.url}/v1/messages", json=body, headers={"authorization": "Bearer sekret"})
        assert bearer.status_code == 200
        wrong = httpx.post(f"{keyed.url}/v1/messages", json=body, headers={"x-api-key": "nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        both = httpx.post(
            f"{keyed.url}/v1/messages",
            json=body,
            headers={"x-api-key": "sekret", "authorization": "Bearer sekret"},
        )
        assert both.status_code == 401
        elsewhere = httpx.post(
            f"{keyed.url}/v1/chat/completions",
            json={"messages": [], "model": "x"},
            headers={"x-api-key": "sekret"},
        )
        assert elsewhere.status_code == 401  # x-api-key is Anthropic's header, only on its paths
        # The same app on a second address (what --ollama does on 127.0.0.1:11434), behind the same key.
        import re

        import ollama

        second = re.search(r"Ollama's API also on (http://\S+)", keyed.stderr.text)
        assert second is not None
        client = ollama.Client(host=second.group(1), headers={"Authorization": "Bearer sekret"})
        assert [model.model for model in client.list().models] == ["scripted-text:latest"]
        with pytest.raises(ollama.ResponseError) as refused:
            ollama.Client(host=second.group(1)).list()
        assert refused.value.status_code == 401


# ----------------------------------------------------------------------------------------------- Ollama
def test_ollama_list_show_chat_stream_and_ps(llama: Any, server: HttpProcess) -> None:
    names = [model.model for model in llama.list().models]
    assert "scripted-text:latest" in names and "scripted-tool:latest" in names
    shown = llama.show("scripted-think")
    assert "thinking" in (shown.capabilities or []) and "<|im_start|>" in (shown.template or "")
    assert shown.modelinfo["general.context_length"] > 0
    assert 'stop "<|im_end|>"' in (shown.parameters or "")
    assert "chat_template" in shown.modelinfo["mlx_gallery.decisions"]
    verbose = httpx.post(f"{server.url}/api/show", json={"model": "scripted-think", "verbose": True}).json()
    assert verbose["model_info"]["mlx_gallery.decisions"]["stop_tokens"]["evidence"]
    answer = llama.chat(model="scripted-think", messages=[{"role": "user", "content": "Hi"}], think=True)
    assert (
        answer.message.content == "The answer is 42." and answer.message.thinking == "Let me think about it."
    )
    assert answer.done and answer.done_reason == "stop" and answer.eval_count > 0
    pieces = list(
        llama.chat(
            model="scripted-textthink:latest", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
    )
    assert pieces[-1].done and "".join(p.message.content for p in pieces) == "The answer is 42."
    for piece in pieces:
        _no_marker(piece.message.content or "")
    generated = llama.generate(
        model="scripted-text", prompt="Hi", options={"num_predict": 3, "temperature": 0}
    )
    assert generated.done_reason == "length" and generated.eval_count == 3
    running_models = {model.model: model for model in llama.ps().models}
    assert running_models["scripted-text:latest"].size_vram > 0
    assert running_models["scripted-text:latest"].context_length > 0
    assert httpx.get(f"{server.url}/").text == "Ollama is running"
    assert httpx.head(f"{server.url}/api/tags").status_code == 200
    assert httpx.head(f"{server.url}/api/version").status_code == 200


def test_ollama_tools_format_and_keep_alive(llama: Any) -> None:
    tools = [{"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}]
    called = llama.chat(
        model="scripted-tool", messages=[{"role": "user", "content": "Weather?"}], tools=tools
    )
    call = called.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    again = llama.chat(
        model="scripted-tool",
        tools=tools,
        messages=[
            {"role": "user", "content": "Weather?"},
            called.message,
            {"role": "tool", "content": "18C", "tool_name": "get_weather"},
        ],
    )
    assert again.message.tool_calls
    shaped = llama.chat(
        model="scripted-text",
        messages=[{"role": "user", "content": "Unit?"}],
        format=UNIT_SCHEMA,
        think=False,  # a scripted model let into a reasoning block first may fill it to the limit
        options={"num_predict": 40},
    )
    assert json.loads(shaped.message.content)["unit"] in ("C", "F")
    llama.chat(model="scripted-text", messages=[{"role": "user", "content": "Hi"}], keep_alive="5m")
    expiry = {model.model: model.expires_at for model in llama.ps().models}["scripted-text:latest"]
    assert expiry is not None and expiry.year < 9999  # a deadline, not "forever"
    loaded = llama.generate(model="scripted-text", keep_alive=-1)
    assert loaded.done_reason == "load"
    unloaded = llama.generate(model="scripted-text", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "scripted-text:latest" not in {model.model for model in llama.ps().models}


def test_keep_alive_durations() -> None:
    from gallery.errors import RequestError
    from runtime.ollama_api import keep_alive_seconds

    assert keep_alive_seconds("5m") == 300 and keep_alive_seconds("1h30m") == 5400
    assert keep_alive_seconds(0) == 0 and keep_alive_seconds("-1") == -1 and keep_alive_seconds(None) is None
    with pytest.raises(RequestError, match="keep_alive"):
        keep_alive_seconds("soon")


def test_ollama_refuses_in_its_error_shape(llama: Any, server: HttpProcess) -> None:
    import ollama

    with pytest.raises(ollama.ResponseError) as caught:
        llama.chat(
            model="scripted-text", messages=[{"role": "user", "content": "Hi"}], options={"mirostat": 2}
        )
    assert caught.value.status_code == 400 and "options.mirostat" in caught.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        llama.chat(model="nope", messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as thinking:
        llama.chat(model="scripted-text", messages=[{"role": "user", "content": "Hi"}], think="extreme")
    assert thinking.value.status_code == 400 and "think" in thinking.value.error
    with pytest.raises(ollama.ResponseError, match="final assistant"):
        llama.chat(
            model="scripted-text",
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        )
    unknown = httpx.post(f"{server.url}/api/embed", json={"model": "scripted-text", "input": "x"})
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}


# ----------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("model", ["scripted-text", "text-qwen3"])
def test_the_same_greedy_request_gives_the_same_text_through_every_door(
    server: HttpProcess, claude: Any, llama: Any, model: str
) -> None:
    prompt, system, limit = "Write one line about the sea.", "Be brief.", 12
    chat = server.client.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=limit,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
    )
    reference = chat.choices[0].message
    responses = server.client.responses.create(
        model=model, instructions=system, input=prompt, temperature=0, max_output_tokens=limit
    )
    messages = claude.messages.create(
        model=model,
        system=system,
        max_tokens=limit,
        messages=[{"role": "user", "content": prompt}],
        extra_body={"temperature": 0},
    )
    ollama_chat = llama.chat(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        options={"temperature": 0, "num_predict": limit},
    )
    text = reference.content or ""
    assert responses.output_text == text
    assert "".join(block.text for block in messages.content if block.type == "text") == text
    assert ollama_chat.message.content == text
    reasoning = getattr(reference, "reasoning_content", None) or ""
    assert (ollama_chat.message.thinking or "") == reasoning


def _png_base64() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 8, 7)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_an_image_reaches_the_vlm_through_every_door(
    server: HttpProcess, claude: Any, llama: Any, vlm_model: Path
) -> None:
    from tests.plugins.models import fixture_info

    image, question = _png_base64(), "What is this?"
    url = f"data:image/png;base64,{image}"
    text_only = server.client.chat.completions.create(
        model="vlm-qwen2vl", messages=[{"role": "user", "content": question}], max_tokens=3
    )
    chat = server.client.chat.completions.create(
        model="vlm-qwen2vl",
        max_tokens=3,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    )
    assert chat.usage is not None and text_only.usage is not None
    prompt_tokens = chat.usage.prompt_tokens
    assert prompt_tokens >= text_only.usage.prompt_tokens + fixture_info(vlm_model)["image_tokens_for_64x64"]
    responses = server.client.responses.create(
        model="vlm-qwen2vl",
        max_output_tokens=3,
        temperature=0,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": url, "detail": "auto"},
                    {"type": "input_text", "text": question},
                ],
            }
        ],
    )
    messages = claude.messages.create(
        model="vlm-qwen2vl",
        max_tokens=3,
        extra_body={"temperature": 0},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    )
    ollama_chat = llama.chat(
        model="vlm-qwen2vl",
        messages=[{"role": "user", "content": question, "images": [image]}],
        options={"temperature": 0, "num_predict": 3},
    )
    assert responses.usage is not None and responses.usage.input_tokens == prompt_tokens
    assert messages.usage.input_tokens + messages.usage.cache_read_input_tokens == prompt_tokens
    assert ollama_chat.prompt_eval_count == prompt_tokens
    text = chat.choices[0].message.content
    assert (
        responses.output_text == text
        and messages.content[0].text == text
        and ollama_chat.message.content == text
    )


def test_structured_output_through_responses_and_messages(server: HttpProcess, claude: Any) -> None:
    response = server.client.responses.create(
        model="scripted-text",
        input="Unit?",
        max_output_tokens=40,
        reasoning={"effort": "none"},
        text={"format": {"type": "json_schema", "name": "unit", "schema": UNIT_SCHEMA, "strict": True}},
    )
    assert json.loads(response.output_text)["unit"] in ("C", "F")
    message = claude.messages.create(
        model="scripted-text",
        max_tokens=40,
        thinking={"type": "disabled"},
        output_config={"format": {"type": "json_schema", "schema": UNIT_SCHEMA}},
        messages=[{"role": "user", "content": "Unit?"}],
    )
    assert json.loads(message.content[0].text)["unit"] in ("C", "F")


# ----------------------------------------------------------------------------------------------- an agent
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("door", ["responses", "messages"])
def test_an_agent_program_drives_a_tool_loop(server: HttpProcess, door: str, streamed: bool) -> None:
    """pydantic-ai's Agent on the Responses API and on the Messages API: call → tool → result → answer.

    scripted-toolloop calls get_weather while no tool result is in its prompt and answers once one is, so the
    agent's whole loop runs: the call, the tool, the result sent back in the API's own items/blocks, the answer.
    """
    from pydantic_ai import Agent, UsageLimits
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.anthropic import AnthropicProvider
    from pydantic_ai.providers.openai import OpenAIProvider

    model: Any
    if door == "responses":
        model = OpenAIResponsesModel(
            "scripted-toolloop", provider=OpenAIProvider(base_url=f"{server.url}/v1", api_key="unused")
        )
    else:
        model = AnthropicModel(
            "scripted-toolloop", provider=AnthropicProvider(base_url=server.url, api_key="unused")
        )
    agent = Agent(model, instructions="Answer with the weather.")
    seen: list[str] = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"18C in {city}"

    limits = UsageLimits(request_limit=4)
    if streamed:
        import asyncio

        async def stream() -> str:
            async with agent.run_stream("Weather in Paris?", usage_limits=limits) as run:
                return await run.get_output()

        output = asyncio.run(stream())
    else:
        output = agent.run_sync("Weather in Paris?", usage_limits=limits).output
    assert seen == ["Paris"]
    assert output == "It is sunny in Paris."
