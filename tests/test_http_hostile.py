"""Hostile traffic against the HTTP server (issue 25): each case failed before its fix, on a real server process.

- Idle connections that never send a request are closed after the header timeout, and past the connection cap
  the oldest idle one makes room: a normal request still gets its answer (it used to wait 12 s behind 2,100).
- /metrics labels by route template: thousands of distinct unknown paths add one series, not thousands.
- Bodies are parsed off the event loop with their structure bounded: a million-item `stop`, 700-deep nesting, a
  4,301-digit number and a lone surrogate are 400s by name, and /health answers meanwhile.
- `--any-model` imports a repo on a worker thread: /health answers while the Hub is slow.
- `--max-models 1` holds under concurrent requests for two models; thirty spellings of one folder are one
  model; an alternating two-model burst gets answers or 429s, never 500.
- A non-streaming client that disconnects has its generation cancelled.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.interfaces_support import HttpProcess, running, runtime_env

pytestmark = pytest.mark.mlx
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(scripted_text_model: Path, text_qwen3_model: Path) -> Iterator[HttpProcess]:
    with running(
        HttpProcess(
            str(scripted_text_model),
            str(text_qwen3_model),
            "--max-models",
            "2",
            "--header-timeout",
            "1",
            "--max-connections",
            "40",
            # A grammar build budget no 20,000-alternative grammar meets on any machine: the "too complex"
            # refusal is then independent of this machine's speed (the default is 0.5 s).
            "-o",
            "grammar_budget_s:0.001",
        )
    ) as process:
        yield process  # type: ignore[misc]


def _post(url: str, body: bytes | str, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=timeout,
    )


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, ConnectionResetError):
        return False


def test_idle_connections_time_out_and_the_cap_makes_room(server: HttpProcess) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(60)]
    try:
        body = json.dumps({"model": "scripted-text", "messages": HI, "max_tokens": 3})
        answered = _post(server.url, body)
        assert answered.status_code == 200  # 60 idle connections over a cap of 40 do not lock anyone out
        partial = socket.create_connection(("127.0.0.1", server.port))
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        assert _closed_by_server(partial, 10)  # the header deadline closes it
        assert sum(_closed_by_server(sock, 0.01) for sock in idle) >= 20  # the oldest idle ones made room
    finally:
        for sock in idle:
            sock.close()


def test_metrics_label_routes_not_raw_paths(server: HttpProcess) -> None:
    for index in range(300):
        httpx.get(f"{server.url}/v1/probe-{index}")
    text = httpx.get(f"{server.url}/metrics").text
    series = [line for line in text.splitlines() if line.startswith("gallery_http_responses_total")]
    assert not any("probe-" in line for line in series)
    assert len(series) < 12


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (
            '{"messages": [{"role": "user", "content": "hi"}], "stop": [' + "0," * 1_000_000 + "0]}",
            "JSON values",
        ),
        ('{"messages": ' + "[" * 700 + "]" * 700 + "}", "levels deep"),
        (
            '{"messages": [{"role": "user", "content": "hi"}], "top_k": ' + "1" * 4301 + "}",
            "top_k: an integer with too many digits",
        ),
        ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
        ('{"model": "\\udfff", "messages": []}', "surrogate"),
        (
            '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": '
            + "{" * 0
            + "[" * 600
            + "]" * 600
            + "}",
            "levels deep",
        ),
    ],
    ids=["million-stops", "deep-nesting", "huge-int", "surrogate-content", "surrogate-model", "deep-kwargs"],
)
def test_bad_bodies_are_400_by_name_and_health_answers_meanwhile(
    server: HttpProcess, body: str, says: str
) -> None:
    done: dict[str, Any] = {}

    def send() -> None:
        done["response"] = _post(server.url, body)

    sender = threading.Thread(target=send)
    sender.start()
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    sender.join(60)
    response = done["response"]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert (
        _post(server.url, json.dumps({"model": "scripted-text", "messages": HI, "max_tokens": 2})).status_code
        == 200
    )


def test_a_vanished_non_streaming_client_cancels_its_generation(server: HttpProcess) -> None:
    body = json.dumps({"model": "text-qwen3", "messages": HI, "max_tokens": 4000, "ignore_eos": True})
    with pytest.raises(httpx.TimeoutException):
        _post(server.url, body, timeout=1.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics").text
        if 'finish_reason="cancelled"' in metrics:
            break
        time.sleep(0.2)
    assert any(
        line.startswith("gallery_requests_total")
        and 'finish_reason="cancelled"' in line
        and "text-qwen3" in line
        for line in metrics.splitlines()
    )


def test_max_models_holds_under_concurrency_and_spellings_are_one_model(
    scripted_text_model: Path, scripted_think_model: Path
) -> None:
    text, think = str(scripted_text_model), str(scripted_think_model)
    with running(HttpProcess("--any-model", "--max-models", "1", text)) as process:
        spellings = [text, text + "/", f"{text}//", f"{Path(text).parent}/./{Path(text).name}"]
        for spelling in spellings:
            reply = _post(process.url, json.dumps({"model": spelling, "messages": HI, "max_tokens": 2}))
            assert reply.status_code == 200, reply.text
        listed = httpx.get(f"{process.url}/v1/models").json()["data"]
        assert len(listed) == 1
        assert _post(process.url, json.dumps({"messages": HI, "max_tokens": 2})).status_code == 200

        def ask(model: str) -> int:
            body = json.dumps({"model": model, "messages": HI, "max_tokens": 2})
            return _post(process.url, body, timeout=120).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(ask, [text, think] * 12))
            resident = httpx.get(f"{process.url}/health").json()["models"]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(200) >= 2
        assert sum(state == "loaded" for state in resident.values()) <= 1


def test_any_model_imports_off_the_event_loop(hub: Any, tmp_path: Path) -> None:
    hub.inject(r"/api/models/Qwen/Qwen3-4B", delay=4.0, count=4)
    env = runtime_env(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
    with running(HttpProcess("--any-model", env=env)) as process:
        order: list[str] = []

        def slow() -> None:
            _post(process.url, json.dumps({"model": "Qwen/Qwen3-4B", "messages": HI, "max_tokens": 2}), 120)
            order.append("import")

        worker = threading.Thread(target=slow)
        worker.start()
        time.sleep(0.5)
        assert httpx.get(f"{process.url}/health", timeout=30).status_code == 200
        order.append("health")
        worker.join(120)
        assert order == ["health", "import"]


def test_a_request_prepared_while_its_model_is_freed_is_answered(scripted_text_model: Path) -> None:
    """gRPC Free (or an eviction) racing a request in preparation: the request is refused, never left hanging."""
    from gallery.errors import RuntimeFailure
    from runtime.host import ModelHost
    from runtime.request import GenerationRequest

    host = ModelHost(interface="grpc")
    host.load(str(scripted_text_model))
    engine = host.engine
    assert engine is not None
    preparing, freed = threading.Event(), threading.Event()
    real_prepare = engine.prepare

    def slow_prepare(request: GenerationRequest) -> Any:
        prepared = real_prepare(request)
        preparing.set()
        freed.wait(30)  # the Free lands while this request is still being prepared
        return prepared

    engine.prepare = slow_prepare  # type: ignore[method-assign]
    outcome: dict[str, Any] = {}

    def submit() -> None:
        try:
            outcome["handle"] = host.submit(GenerationRequest(messages=HI, max_tokens=3))
        except RuntimeFailure as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=submit)
    thread.start()
    assert preparing.wait(30)
    host.free()
    freed.set()
    thread.join(30)
    assert not thread.is_alive()
    assert "handle" not in outcome and "unloaded while this request was being prepared" in str(
        outcome["error"]
    )
    host.close()


@pytest.mark.parametrize(
    ("grammar", "says"),
    [
        ("start: " + " | ".join(f'"w{i}"' for i in range(100_000)), "over the limit"),
        ("start: " + " | ".join(f'"w{i}"' for i in range(20_000)), "too complex"),
        ("start: <[99999]>", "too large"),
    ],
    ids=["huge", "complex", "unfollowable"],
)
def test_grammars_are_bounded_before_they_reach_the_worker(
    server: HttpProcess, grammar: str, says: str
) -> None:
    body = {
        "model": "scripted-text",
        "messages": HI,
        "max_tokens": 5,
        "response_format": {"type": "lark", "lark": grammar},
    }
    response = _post(server.url, json.dumps(body))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format" and says in error["message"]


def test_a_prompt_far_over_the_context_is_refused_from_its_head(server: HttpProcess) -> None:
    """A 3.5 MB prompt over a 4,096-token context: refused from its first characters, not tokenized whole."""
    body = json.dumps(
        {
            "model": "scripted-text",
            "messages": [{"role": "user", "content": "word " * 700_000}],
            "max_tokens": 2,
        }
    )
    response = _post(server.url, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and "characters alone" in error["message"]
    truncated = json.loads(body)
    truncated["truncate"] = True  # truncation still tokenizes it all and keeps the end
    assert _post(server.url, json.dumps(truncated)).status_code == 200
