"""What an OpenAI client is promised, over HTTP on a real server process (issue 19) and the browser boundary.

- The second turn of a tool loop (`content: null` + `tool_calls`, then the tool result) answers 200 on every
  scripted model and on SmolLM2, streaming and not.
- Tools are honoured or refused, never dropped: a config without a tool-call format answers 400 `param: tools`;
  `tool_choice: "required"` and a named function are enforced (a call comes out of a model whose free answer is
  prose); `parallel_tool_calls: false` gives at most one call.
- `strict: true` schemas admit no extra keys; with no max_tokens an answer runs to its end (the rest of the
  context), and a cut answer says `finish_reason: "length"`.
- Every error is OpenAI's JSON (404, 405, 422, 415, 403); `GET /v1/models/{id}`; no filesystem path in
  `/v1/models`; one access-log line per request (none with `--quiet`).
- Without an API key, a foreign Host or Origin is refused (DNS rebinding, cross-site pages) and a non-JSON body
  is refused; with a key, the key is the boundary; refusals carry CORS headers where CORS is on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.interfaces_support import HttpProcess, running

pytestmark = pytest.mark.mlx

CALL_TURN = [
    {"role": "user", "content": "weather?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]
# A parameter schema with no free strings: a scripted model forced into a call cannot ramble inside one.
UNIT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {
                "type": "object",
                "properties": {"unit": {"enum": ["C", "F"]}},
                "required": ["unit"],
                "additionalProperties": False,
            },
        },
    }
    for name in ("get_weather", "get_time")
]


@pytest.fixture(scope="module")
def server(
    scripted_text_model: Path,
    scripted_think_model: Path,
    scripted_tool_model: Path,
    smollm2_model: Path,
) -> Iterator[HttpProcess]:
    with running(
        HttpProcess(
            str(scripted_text_model),
            str(scripted_think_model),
            str(scripted_tool_model),
            str(smollm2_model),
            "--max-models",
            "4",
            "--cors-origin",
            "http://app.example",
        )
    ) as process:
        yield process  # type: ignore[misc]


def _post(
    server: HttpProcess, body: Any, path: str = "/v1/chat/completions", **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}",
        content=json.dumps(body),
        headers={"content-type": "application/json", **headers},
        timeout=120,
    )


@pytest.mark.parametrize("model", ["scripted-text", "scripted-think", "scripted-tool", "smollm2"])
def test_second_turn_of_a_tool_loop_answers(server: HttpProcess, model: str) -> None:
    whole = _post(server, {"model": model, "max_tokens": 10, "messages": CALL_TURN})
    assert whole.status_code == 200, whole.text
    assert whole.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    stream = server.client.chat.completions.create(
        model=model,
        max_tokens=10,
        messages=CALL_TURN,
        stream=True,  # type: ignore[arg-type]
    )
    finishes = [chunk.choices[0].finish_reason for chunk in stream if chunk.choices]
    assert finishes[-1] in ("stop", "length", "tool_calls")


def test_tools_to_a_model_without_a_tool_format_are_refused_by_name(server: HttpProcess) -> None:
    response = _post(
        server, {"model": "smollm2", "max_tokens": 5, "messages": CALL_TURN[:1], "tools": UNIT_TOOLS}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tools" and "tool-call format" in error["message"]
    hidden = _post(
        server,
        {
            "model": "smollm2",
            "max_tokens": 2,
            "messages": CALL_TURN[:1],
            "tools": UNIT_TOOLS,
            "tool_choice": "none",
        },
    )
    assert hidden.status_code == 200  # "none": the tools are not offered, so nothing is dropped


def test_required_tool_choice_makes_a_prose_model_call(server: HttpProcess) -> None:
    free = server.client.chat.completions.create(
        model="scripted-text",
        messages=[{"role": "user", "content": "hi"}],
        tools=UNIT_TOOLS,
        max_tokens=80,  # type: ignore[arg-type]
    )
    assert free.choices[0].message.tool_calls is None and free.choices[0].message.content
    forced = server.client.chat.completions.create(
        model="scripted-text",
        messages=[{"role": "user", "content": "hi"}],
        tools=UNIT_TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        max_tokens=200,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        assert json.loads(call.function.arguments)["unit"] in ("C", "F")
    named = server.client.chat.completions.create(
        model="scripted-text",
        messages=[{"role": "user", "content": "hi"}],
        tools=UNIT_TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        max_tokens=200,
        stream=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    deltas = [d for chunk in named if chunk.choices for d in chunk.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas] == ["get_time"]


def test_parallel_tool_calls_false_gives_one_call(server: HttpProcess) -> None:
    result = server.client.chat.completions.create(
        model="scripted-tool",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        parallel_tool_calls=False,
        max_tokens=60,
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls or []) == 1


def test_required_tool_choice_needs_tools_and_an_enforceable_format(server: HttpProcess) -> None:
    response = _post(
        server,
        {"model": "scripted-text", "messages": CALL_TURN[:1], "tool_choice": "required", "max_tokens": 5},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"


def test_strict_schema_admits_no_extra_keys_and_answers_end() -> None:
    from runtime.request import response_format

    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}},
    }
    strict = response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    )
    assert strict is not None and isinstance(strict.value, dict)
    assert strict.value["additionalProperties"] is False
    assert strict.value["properties"]["a"]["additionalProperties"] is False
    loose = response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert loose is not None and isinstance(loose.value, dict) and "additionalProperties" not in loose.value
    from gallery.errors import RequestError

    with pytest.raises(RequestError, match="additionalProperties"):
        response_format(
            {
                "type": "json_schema",
                "json_schema": {"schema": {"type": "object", "additionalProperties": True}, "strict": True},
            }
        )


def test_no_max_tokens_runs_to_the_end_and_a_cut_answer_says_length(server: HttpProcess) -> None:
    whole = server.client.chat.completions.create(
        model="scripted-think", messages=[{"role": "user", "content": "hi"}]
    )
    assert (
        whole.choices[0].finish_reason == "stop" and whole.choices[0].message.content == "The answer is 42."
    )
    cut = server.client.chat.completions.create(
        model="scripted-text", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert cut.choices[0].finish_reason == "length"


def test_errors_are_openai_shaped(server: HttpProcess) -> None:
    for response, status in (
        (httpx.get(f"{server.url}/v1/nothing-here"), 404),
        (httpx.get(f"{server.url}/v1/chat/completions"), 405),
        (httpx.delete(f"{server.url}/v1/models"), 405),
        (httpx.get(f"{server.url}/v1/models/no-such-model"), 404),
    ):
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    card = httpx.get(f"{server.url}/v1/models/scripted-tool").json()
    assert card["id"] == "scripted-tool" and card["object"] == "model" and card["tool_format"] == "json_tools"
    listing = httpx.get(f"{server.url}/v1/models").text
    assert "/" not in "".join(json.dumps(m["aliases"]) for m in json.loads(listing)["data"])
    assert str(Path.cwd()) not in listing and ".models" not in listing
    assert _post(server, {"messages": "nope"}).status_code == 400


def test_browser_boundary_without_a_key(server: HttpProcess) -> None:
    body = {"model": "scripted-text", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    rebound = _post(server, body, host="rebind.attacker.example")
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "forbidden"
    cross_site = _post(server, body, origin="http://evil.example")
    assert cross_site.status_code == 403
    plain = httpx.post(
        f"{server.url}/v1/chat/completions", content=json.dumps(body), headers={"content-type": "text/plain"}
    )
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    assert _post(server, body, host=f"localhost:{server.port}").status_code == 200
    allowed = _post(server, body, origin="http://app.example")
    assert (
        allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.example"
    )
    assert _post(server, body, origin=f"http://127.0.0.1:{server.port}").status_code == 200


def test_access_log_has_one_line_per_request(server: HttpProcess) -> None:
    marker = "/v1/models/access-log-probe"
    httpx.get(f"{server.url}{marker}")
    server.client.chat.completions.create(
        model="scripted-text", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    ).close()
    assert server.stderr.wait_for(re.compile(re.escape(f'"GET {marker}" 404')), 10)
    line = server.stderr.wait_for(
        re.compile(r'"POST /v1/chat/completions" 200 \d+ms model=scripted-text'), 10
    )
    assert line is not None


def test_keyed_server_is_bounded_by_its_key(scripted_text_model: Path) -> None:
    with running(
        HttpProcess(
            str(scripted_text_model),
            "--quiet",
            "--cors-origin",
            "http://app.example",
            "--api-key",
            "k3y",
            api_key="k3y",
        )
    ) as process:
        body = {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        keyed = {"authorization": "Bearer k3y"}
        assert _post(process, body, host="my-box.lan", **keyed).status_code == 200  # the key is the boundary
        refused = _post(process, body, origin="http://app.example")
        assert refused.status_code == 401
        assert refused.headers.get("access-control-allow-origin") == "http://app.example"
        assert "POST /v1/chat/completions" not in process.stderr.text  # --quiet: no access log


def test_tools_without_a_tool_format_are_refused_by_name_on_grpc_and_stdio(smollm2_model: Path) -> None:
    import grpc

    from runtime.proto import backend_pb2 as pb
    from tests.interfaces_support import GrpcProcess, StdioProcess, rpc_error, wait_for_grpc_state

    with running(StdioProcess(str(smollm2_model))) as stdio:
        reply = stdio.call("chat", {"messages": CALL_TURN[:1], "tools": UNIT_TOOLS, "max_tokens": 3})
        assert reply["error"]["data"] == {"kind": "invalid_request", "field": "tools"}
        assert "tool-call format" in reply["error"]["message"]
        assert "result" in stdio.call(
            "chat", {"messages": CALL_TURN, "max_tokens": 3}
        )  # the second turn renders
    with running(GrpcProcess("--model", str(smollm2_model))) as process:
        wait_for_grpc_state(process.stub, "READY")
        options = pb.PredictOptions(
            UseTokenizerTemplate=True,
            Messages=[pb.Message(role="user", content="weather?")],
            Tools=json.dumps(UNIT_TOOLS),
            Tokens=3,
        )
        error = rpc_error(lambda: process.stub.Predict(options, timeout=60))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "tool-call format" in error.details()
