"""The stdio JSON-RPC interface, through a real subprocess (`python -m runtime --stdio`).

Each test speaks the protocol line by line and checks the two promises a parent relies on: every
request with an id gets exactly one response (notifications get none), and stdout carries nothing but
protocol lines (the helper records any line that is not a JSON-RPC object, and the tests assert there
are none).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.interfaces_support import StdioProcess, no_traceback, running
from tests.plugins.models import fixture_info

pytestmark = pytest.mark.mlx

HI = [{"role": "user", "content": "Hi"}]


def _clean(process: StdioProcess) -> None:
    assert process.bad_lines == [], process.bad_lines
    assert no_traceback(process.stderr.text), process.stderr.text


def _error_code(response: dict[str, Any]) -> int:
    assert "error" in response and "result" not in response, response
    assert "\n" not in response["error"]["message"]
    return int(response["error"]["code"])


@pytest.fixture(scope="module")
def scripted(scripted_text_model: Path) -> Any:
    process = StdioProcess(str(scripted_text_model))
    try:
        yield process
    finally:
        process.kill()
        _clean(process)


def test_chat_streams_deltas_then_exactly_one_result(
    scripted: StdioProcess, scripted_text_model: Path
) -> None:
    info = fixture_info(scripted_text_model)
    request_id = scripted.send("chat", {"messages": HI, "max_tokens": 30, "temperature": 0})
    response, deltas, others = scripted.collect(request_id)
    assert others == []
    assert "".join(d.get("content", "") for d in deltas) == info["answer"] and len(deltas) >= 2
    result = response["result"]
    assert result["message"] == {"role": "assistant", "content": info["answer"]}
    assert result["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == len(info["turn_ids"]) + 1
    assert (
        result["usage"]["total_tokens"]
        == result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]
    )
    # stream=false: no deltas, the same answer; string ids work as well as numbers.
    response, deltas, _ = scripted.collect(
        scripted.send("chat", {"messages": HI, "temperature": 0, "stream": False}, request_id="no-stream")
    )
    assert deltas == [] and response["result"]["message"]["content"] == info["answer"]


def test_complete_tokenize_detokenize_status_metadata(
    scripted: StdioProcess, scripted_text_model: Path
) -> None:
    info = fixture_info(scripted_text_model)
    tokens = scripted.call("tokenize", {"messages": HI})["result"]
    prompt = scripted.call("detokenize", {"tokens": tokens["tokens"]})["result"]["text"]
    assert prompt.endswith("<|im_start|>assistant\n") and tokens["length"] == len(tokens["tokens"])
    response, deltas, _ = scripted.collect(
        scripted.send("complete", {"prompt": prompt, "temperature": 0, "stop": info["stop_string_example"]})
    )
    result = response["result"]
    assert (
        result["text"]
        == "".join(d["content"] for d in deltas)
        == info["answer"].split(info["stop_string_example"])[0]
    )
    assert result["usage"]["prompt_tokens"] == tokens["length"]
    status = scripted.call("status")["result"]
    assert status["state"] == "READY" and status["model"] == "scripted-text" and status["memory"]["total"] > 0
    meta = scripted.call("metadata")["result"]
    assert meta["supports_thinking"] and "Hello!" in meta["rendered_template"]


def test_malformed_lines_each_get_one_error_and_the_loop_goes_on(
    scripted: StdioProcess, scripted_text_model: Path
) -> None:
    bad_lines = [
        (b"this is not json\n", -32700),
        (b"\xff\xfe not utf-8\n", -32700),
        (b"[1, 2, 3]\n", -32600),
        (b"[]\n", -32600),
        (b"42\n", -32600),
        (b'"a string"\n', -32600),
        (b'{"jsonrpc": "2.0", "id": 7}\n', -32600),
        (b'{"id": 8, "method": "status"}\n', -32600),
        (b'{"jsonrpc": "2.0", "id": {"no": 1}, "method": "status"}\n', -32600),
        (b'{"jsonrpc": "2.0", "id": 9, "method": "status", "params": [1]}\n', -32602),
        (b'{"jsonrpc": "2.0", "id": 10, "method": "no_such_method"}\n', -32601),
        (b'{"jsonrpc": "2.0", "id": 11, "method": "chat", "params": {"messages": "hi"}}\n', -32602),
        (
            b'{"jsonrpc": "2.0", "id": 12, "method": "chat", "params": {"messages": [], "max_tokens": 0}}\n',
            -32602,
        ),
        (
            b'{"jsonrpc": "2.0", "id": 13, "method": "chat", "params": {"messages": [{"role": "user", "content": "x"}], '
            b'"images": ["AAAA"]}}\n',
            -32602,
        ),
        (
            b'{"jsonrpc": "2.0", "id": 14, "method": "chat", "params": {"messages": [{"role": "user", "content": "x"}], '
            b'"tools": [{"function": {}}]}}\n',
            -32602,
        ),
        (b'{"jsonrpc": "2.0", "id": 15, "method": "detokenize", "params": {"tokens": [-1]}}\n', -32602),
        (
            b'{"jsonrpc": "2.0", "id": 16, "method": "chat", "params": {"messages": [{"role": "user", "content": "x"}], '
            b'"model": "another-model"}}\n',
            -32005,
        ),
        (b'{"jsonrpc": "2.0", "id": 17, "method": "cancel", "params": {}}\n', -32602),
    ]
    for line, code in bad_lines:
        scripted.write(line)
        response = scripted.next()
        assert _error_code(response) == code, (line, response)
        expected_id = json.loads(line).get("id") if code not in (-32700,) and line.startswith(b"{") else None
        if isinstance(expected_id, dict):
            expected_id = None
        assert response["id"] == expected_id, (line, response)
    # Notifications get no response, even broken or unknown ones; the next request is answered next.
    scripted.write(
        b'{"jsonrpc": "2.0", "method": "status"}\n{"jsonrpc": "2.0", "method": "nope"}\n'
        b'{"jsonrpc": "2.0", "method": "chat", "params": {"messages": []}}\n'
    )
    assert scripted.call("status")["result"]["state"] in ("READY", "BUSY")
    answer = scripted.call("chat", {"messages": HI, "temperature": 0})["result"]["message"]["content"]
    assert answer == fixture_info(scripted_text_model)["answer"]


def test_a_huge_line_is_refused_and_skipped(scripted_text_model: Path) -> None:
    with running(StdioProcess(str(scripted_text_model), "--max-line-mb", "1")) as process:
        assert isinstance(process, StdioProcess)
        huge = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "chat",
                "params": {"messages": [{"role": "user", "content": "x" * (3 << 20)}]},
            }
        )
        process.write(huge + "\n")
        response = process.next()
        assert _error_code(response) == -32600 and "longer than" in response["error"]["message"]
        assert process.call("status")["result"]["state"] == "READY"
        process.close_stdin()
        assert process.wait() == 0
    _clean(process)


def test_requests_run_concurrently_and_cancel_gets_the_one_response(
    text_qwen3_model: Path, scripted_text_model: Path
) -> None:
    with running(StdioProcess()) as process:
        assert isinstance(process, StdioProcess)
        not_loaded = process.call("chat", {"messages": HI})
        assert _error_code(not_loaded) == -32001
        missing = process.call("load", {"model": "nobody/no-such-model"})
        assert _error_code(missing) == -32003 and missing["error"]["data"]["kind"] == "not_found"
        assert (
            _error_code(process.call("load", {"model": str(text_qwen3_model), "options": ["max_queue:x"]}))
            == -32602
        )
        loaded = process.call(
            "load", {"model": str(text_qwen3_model), "options": {"max_active": 4}}, timeout=120
        )
        assert loaded["result"]["model"] == "text-qwen3"
        long_id = process.send("chat", {"messages": HI, "max_tokens": 4000, "temperature": 0})
        first = process.next()  # a delta: the generation is running
        assert first["method"] == "chat.delta" and first["params"]["id"] == long_id
        # A chat in flight does not block status (it answers, and shows the work).
        status, _, _ = process.collect(process.send("status"))
        assert status["result"]["state"] == "BUSY" and status["result"]["in_flight"] == 1
        cancel, _, _ = process.collect(process.send("cancel", {"id": long_id}))
        assert cancel["result"] == {"cancelled": True}
        response, _, _ = process.collect(long_id)
        assert response["result"]["finish_reason"] == "cancelled"
        assert response["result"]["usage"]["completion_tokens"] < 4000
        assert process.call("cancel", {"id": long_id})["result"]["cancelled"] is False
        # Switching models, then eight concurrent chats: each gets its own complete answer.
        process.call("load", {"model": str(scripted_text_model)}, timeout=120)
        ids = [process.send("chat", {"messages": HI, "temperature": 0}) for _ in range(8)]
        answers: dict[Any, str] = {}
        deltas: dict[Any, str] = {i: "" for i in ids}
        while len(answers) < len(ids):
            message = process.next()
            if message.get("method") == "chat.delta":
                deltas[message["params"]["id"]] += message["params"].get("content", "")
            else:
                answers[message["id"]] = message["result"]["message"]["content"]
        expected = fixture_info(scripted_text_model)["answer"]
        assert set(answers.values()) == {expected} and set(deltas.values()) == {expected}
        assert process.call("free")["result"] == {"freed": "scripted-text"}
        assert process.call("status")["result"]["state"] == "UNINITIALIZED"
        process.close_stdin()
        assert process.wait() == 0
    _clean(process)


def test_end_of_input_finishes_in_flight_work_then_exits_0(scripted_text_model: Path) -> None:
    with running(StdioProcess(str(scripted_text_model))) as process:
        assert isinstance(process, StdioProcess)
        ids = [process.send("chat", {"messages": HI, "temperature": 0}) for _ in range(3)]
        process.close_stdin()
        responses = {}
        while len(responses) < 3:
            message = process.next()
            if "id" in message:
                responses[message["id"]] = message
        assert sorted(responses) == ids
        assert all(r["result"]["finish_reason"] == "stop" for r in responses.values())
        assert process.wait() == 0
        with pytest.raises(EOFError):
            process.next(timeout=5)
    _clean(process)


def test_shutdown_drains_refuses_new_work_and_exits_0(text_qwen3_model: Path) -> None:
    with running(StdioProcess(str(text_qwen3_model))) as process:
        assert isinstance(process, StdioProcess)
        busy_id = process.send("chat", {"messages": HI, "max_tokens": 1000, "temperature": 0})
        assert process.next()["method"] == "chat.delta"
        shutdown, _, _ = process.collect(process.send("shutdown"))
        assert shutdown["result"] == {"ok": True, "in_flight": 1, "mode": "drain"}
        late, _, _ = process.collect(process.send("chat", {"messages": HI}))
        assert _error_code(late) == -32004  # refused while the runtime drains
        response, _, _ = process.collect(busy_id)
        assert response["result"]["finish_reason"] == "length"  # in-flight work finished, not cut
        assert process.wait() == 0
    _clean(process)


def test_sigterm_drains_and_every_request_still_gets_its_response(text_qwen3_model: Path) -> None:
    with running(StdioProcess(str(text_qwen3_model), "--grace", "1")) as process:
        assert isinstance(process, StdioProcess)
        long_id = process.send("chat", {"messages": HI, "max_tokens": 4000, "temperature": 0})
        assert process.next()["method"] == "chat.delta"
        process.signal(signal.SIGTERM)
        response, _, _ = process.collect(long_id)
        assert response["result"]["finish_reason"] == "cancelled"  # cut at the end of the grace period
        assert process.wait() == 0
    log = process.stderr.text
    assert "SIGTERM: draining" in log
    _clean(process)


def test_chat_params_become_generation_requests() -> None:
    from pydantic import ValidationError

    from gallery.errors import RequestError
    from runtime.openai_request import ChatParams, CompleteParams, chat_request, complete_request
    from runtime.request import RequestLimits, check_request

    request = chat_request(
        ChatParams.model_validate(
            {
                "messages": HI,
                "max_completion_tokens": 7,
                "repetition_penalty": 1.2,
                "stop": "END",
                "images": ["QUJD"],
                "chat_template_kwargs": {"enable_thinking": False, "foo": 1},
                "n": 1,
                "user": "someone",
                "logit_bias": {"3": 2.5},
                "logprobs": True,
                "top_logprobs": 2,
                "presence_penalty": 0.3,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object"}},
                },
            }
        )
    )
    assert request.max_tokens == 7 and request.repeat_penalty == 1.2 and request.stop == ["END"]
    assert request.enable_thinking is False and request.template_kwargs == {"foo": 1}
    assert request.messages[0]["content"][0] == {"type": "image", "image": "QUJD"}
    assert request.logit_bias == {3: 2.5} and request.logprobs and request.top_logprobs == 2
    assert request.response_format is not None and request.response_format.kind == "json_schema"
    raw = complete_request(CompleteParams.model_validate({"prompt": "p", "temperature": 0.5, "logprobs": 2}))
    assert raw.prompt == "p" and raw.temperature == 0.5 and raw.logprobs and raw.top_logprobs == 2
    with pytest.raises(RequestError, match="max_request_bytes"):
        check_request(
            complete_request(CompleteParams.model_validate({"prompt": "p" * 11})),
            RequestLimits(max_request_bytes=10),
        )
    for body in (
        {"messages": HI, "n": 2},
        {"messages": HI, "mystery_field": 1},
        {"prompt": "p", "echo": True},
    ):
        with pytest.raises(ValidationError):
            (ChatParams if "messages" in body else CompleteParams).model_validate(body)
