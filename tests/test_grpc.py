"""The LocalAI-compatible gRPC backend, through a real gRPC client over loopback.

The end-to-end tests run the runtime as a real subprocess (`python -m runtime --addr 127.0.0.1:0`, or
`gallery serve`) on the tiny fixture models; pure helpers (options, wire conversion, bind policy, error
classification, the generated code) are tested in-process. No timing assertions: "promptly" means
"within an RPC deadline", and waits poll for a state with a generous limit.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")

from runtime.proto import backend_pb2 as pb  # noqa: E402
from tests.interfaces_support import (  # noqa: E402
    ROOT,
    GrpcProcess,
    chat,
    grpc_state,
    no_traceback,
    rpc_error,
    running,
    runtime_env,
    wait_for_grpc_state,
)
from tests.plugins.models import fixture_info  # noqa: E402

pytestmark = pytest.mark.mlx

EMPTY = pb.HealthMessage()


def _code(call: Any) -> grpc.StatusCode:
    return rpc_error(call).code()


_error = rpc_error
_state = grpc_state
_wait_state = wait_for_grpc_state


def _stream_text(replies: list[Any]) -> tuple[str, Any]:
    return "".join(r.message.decode() for r in replies), replies[-1]


def _png_base64() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Server:
    """The shared runtime process; `use()` loads a model only when another one is loaded."""

    def __init__(self, process: GrpcProcess) -> None:
        self.process = process
        self.stub = process.stub
        self.current: tuple[str, tuple[str, ...]] | None = None

    def use(self, folder: Path, *options: str) -> Any:
        key = (str(folder), options)
        if self.current != key:
            result = self.stub.LoadModel(
                pb.ModelOptions(Model=str(folder), Options=list(options)), timeout=120
            )
            assert result.success, result.message
            self.current = key
        return self.stub


@pytest.fixture(scope="module")
def server() -> Any:
    process = GrpcProcess()
    try:
        yield Server(process)
    finally:
        process.close()
        assert no_traceback(process.stderr.text), process.stderr.text


# ----- no model yet -----
def test_health_status_and_requests_before_any_load(server: Server) -> None:
    stub = server.stub
    stub.Free(EMPTY, timeout=30)
    server.current = None
    assert stub.Health(EMPTY, timeout=10).message == b"OK"
    assert _state(stub) == "UNINITIALIZED"
    status = stub.Status(EMPTY, timeout=10)
    assert status.memory.total > 0 and status.memory.breakdown["rss"] == status.memory.total
    error = _error(lambda: stub.Predict(chat(Tokens=5), timeout=10))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "LoadModel" in error.details()
    assert (
        _code(lambda: stub.PredictStream(chat(Tokens=5), timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        _code(lambda: stub.TokenizeString(pb.PredictOptions(Prompt="x"), timeout=10))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        _code(lambda: stub.ModelMetadata(pb.ModelOptions(), timeout=10))
        == grpc.StatusCode.FAILED_PRECONDITION
    )


# ----- loading -----
def test_load_model_specs_options_and_failures(
    server: Server, scripted_text_model: Path, tmp_path: Path
) -> None:
    stub = server.stub
    server.current = None
    # A folder relative to ModelPath (LocalAI's models directory), with an unknown option reported back.
    result = stub.LoadModel(
        pb.ModelOptions(
            Model=scripted_text_model.name,
            ModelPath=str(scripted_text_model.parent),
            Options=["max_active:4", "gpu_layers:99"],
        ),
        timeout=120,
    )
    assert result.success, result.message
    assert "scripted-text" in result.message and "gpu_layers" in result.message
    assert _state(stub) == "READY"
    # The same load again is a no-op.
    again = stub.LoadModel(
        pb.ModelOptions(
            Model=scripted_text_model.name,
            ModelPath=str(scripted_text_model.parent),
            Options=["max_active:4", "gpu_layers:99"],
        ),
        timeout=60,
    )
    assert again.success and "already loaded" in again.message
    # A config file, written by the importer.
    from gallery.configfile import write_config
    from importers import import_model

    config_path = tmp_path / "scripted.yaml"
    write_config(import_model(str(scripted_text_model)).config, config_path)
    result = stub.LoadModel(pb.ModelOptions(Model=str(config_path)), timeout=120)
    assert result.success, result.message
    # Unknown models and bad options fail the load (success=false, as LocalAI's Python backends do) and
    # leave the loaded model alone; the fault kind rides along as trailing metadata.
    for spec, options, kind, words in (
        ("nobody/no-such-model", [], "not_found", "not in the local cache"),
        ("no-such-config.yaml", [], "not_found", "no such config file"),
        ("just-a-word", [], "not_found", "not a config file, catalog entry"),
        (str(scripted_text_model), ["max_active:many"], "invalid_request", "expected an integer"),
    ):
        reply, call = stub.LoadModel.with_call(pb.ModelOptions(Model=spec, Options=options), timeout=60)
        assert not reply.success and words in reply.message, reply.message
        assert ("x-gallery-fault", kind) in tuple(call.trailing_metadata())
        assert stub.Health(EMPTY, timeout=10).message == b"OK"
    assert _state(stub) == "READY"
    text, _ = _stream_text(list(stub.PredictStream(chat(Tokens=20), timeout=30)))
    assert text == fixture_info(scripted_text_model)["answer"]
    server.current = None  # loaded from the YAML with no options: let the next test reload as it likes


# ----- generation -----
def test_predict_stream_and_predict(server: Server, scripted_text_model: Path) -> None:
    stub = server.use(scripted_text_model)
    info = fixture_info(scripted_text_model)
    replies = list(stub.PredictStream(chat(Tokens=30, CorrelationId="corr-42"), timeout=30))
    text, last = _stream_text(replies)
    assert text == info["answer"]
    assert "".join(d.content for r in replies for d in r.chat_deltas) == info["answer"]
    assert last.tokens == len(info["turn_ids"]) + 1  # the answer plus the end-of-turn token
    assert last.prompt_tokens > 0 and last.timing_token_generation > 0
    assert all(r.tokens == 0 for r in replies[:-1])  # counts only on the last reply
    whole = stub.Predict(chat(Tokens=30), timeout=30)
    assert whole.message.decode() == info["answer"] and whole.chat_deltas[0].content == info["answer"]
    assert (whole.tokens, whole.prompt_tokens) == (last.tokens, last.prompt_tokens)
    # A raw prompt (the template already applied by the caller) and an extra stop string.
    tokens = stub.TokenizeString(chat(), timeout=10)
    prompt = stub.Detokenize(pb.DetokenizeRequest(tokens=tokens.tokens), timeout=10).content
    raw = stub.Predict(
        pb.PredictOptions(Prompt=prompt, Tokens=30, StopPrompts=[info["stop_string_example"]]), timeout=30
    )
    assert raw.message.decode() == info["answer"].split(info["stop_string_example"])[0]
    assert raw.prompt_tokens == tokens.length == whole.prompt_tokens
    assert "[corr-42] PredictStream done: stop" in server.process.stderr.text
    # Cached prompt tokens travel in trailing metadata (LocalAI's Reply has no field for them): the same
    # conversation again reuses the prefix the first answer left in the cache.
    _reply, call = stub.Predict.with_call(chat(Tokens=30), timeout=30)
    trailing = dict(call.trailing_metadata())
    assert int(trailing["x-gallery-cached-tokens"]) > 0 and trailing["x-gallery-finish-reason"] == "stop"
    assert trailing["x-gallery-reasoning-tokens"] == "0"


def test_32_concurrent_streams_all_complete(server: Server, scripted_text_model: Path) -> None:
    stub = server.use(scripted_text_model)
    info = fixture_info(scripted_text_model)
    single = stub.Predict(chat(Tokens=30), timeout=30)

    def one(index: int) -> tuple[str, int, int, int]:
        replies = list(stub.PredictStream(chat(Tokens=30, CorrelationId=f"s{index}"), timeout=120))
        text, last = _stream_text(replies)
        return text, last.tokens, last.prompt_tokens, len(replies)

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        futures = [pool.submit(one, i) for i in range(32)]
        health = [stub.Health(EMPTY, timeout=10).message for _ in range(5)]  # answered while streams run
        results = [f.result(timeout=180) for f in futures]
    assert health == [b"OK"] * 5
    for text, tokens, prompt_tokens, count in results:
        assert text == info["answer"]
        assert (tokens, prompt_tokens) == (single.tokens, single.prompt_tokens)
        assert count >= 2  # pieces as they came, then the last reply with the counts
    assert _wait_state(stub, "READY") == "READY"
    log = server.process.stderr.text
    assert all(f"[s{i}] PredictStream done: stop" in log for i in range(32))


def test_tokenize_detokenize_and_metadata(server: Server, scripted_text_model: Path) -> None:
    stub = server.use(scripted_text_model)
    tokens = stub.TokenizeString(pb.PredictOptions(Prompt="Hello from the scripted model."), timeout=10)
    assert tokens.length == len(tokens.tokens) > 0
    assert (
        stub.Detokenize(pb.DetokenizeRequest(tokens=tokens.tokens), timeout=10).content
        == "Hello from the scripted model."
    )
    assert (
        _code(lambda: stub.Detokenize(pb.DetokenizeRequest(tokens=[-5]), timeout=10))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    meta = stub.ModelMetadata(pb.ModelOptions(), timeout=10)
    assert meta.supports_thinking
    assert "Hello!" in meta.rendered_template and meta.rendered_template.endswith("<|im_start|>assistant\n")
    assert meta.media_marker == ""
    # Another model's metadata, from its config alone (nothing is loaded for it).
    assert (
        stub.ModelMetadata(pb.ModelOptions(Model="scripted-text"), timeout=30).rendered_template
        == meta.rendered_template
    )


def test_bad_requests_get_error_statuses_and_the_server_keeps_serving(
    server: Server, scripted_text_model: Path
) -> None:
    stub = server.use(scripted_text_model)
    info = fixture_info(scripted_text_model)
    cases = [
        (chat(Tokens=5, Images=[_png_base64()]), grpc.StatusCode.INVALID_ARGUMENT, "cannot take image input"),
        (chat(Tokens=5, Tools="[{not json"), grpc.StatusCode.INVALID_ARGUMENT, "Tools: not valid JSON"),
        (chat(Tokens=5, Tools='{"a": 1}'), grpc.StatusCode.INVALID_ARGUMENT, "Tools: must be a JSON array"),
        (
            chat(Tokens=5, Metadata={"chat_template_kwargs": "[1"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "chat_template_kwargs",
        ),
        (
            chat(Tokens=5, Metadata={"enable_thinking": "perhaps"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "enable_thinking",
        ),
        (
            pb.PredictOptions(Prompt="x" * (5 << 20), Tokens=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_request_bytes",
        ),
        (chat(Tokens=10**6), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be between 1 and"),
        (pb.PredictOptions(Tokens=5), grpc.StatusCode.INVALID_ARGUMENT, "empty request"),
        (chat(Tokens=5, ModelIdentity="someone/else"), grpc.StatusCode.FAILED_PRECONDITION, "someone/else"),
    ]
    for request, code, words in cases:
        for rpc in (stub.Predict, stub.PredictStream):
            error = _error(
                lambda rpc=rpc, request=request: (
                    list(rpc(request, timeout=30)) if rpc is stub.PredictStream else rpc(request, timeout=30)
                )
            )
            assert error.code() == code, (words, error.details())
            assert words in error.details() and "\n" not in error.details()
        assert stub.Health(EMPTY, timeout=10).message == b"OK"
    # The identities that do name the loaded model are accepted.
    for identity in ("scripted-text", str(scripted_text_model)):
        assert (
            stub.Predict(chat(Tokens=30, ModelIdentity=identity), timeout=30).message.decode()
            == info["answer"]
        )
    assert _state(stub) == "READY"
    assert no_traceback(server.process.stderr.text)


def test_unknown_rpcs_answer_unimplemented(server: Server) -> None:
    channel = server.process.channel
    for method in ("Embedding", "GenerateImage", "TTS", "Rerank", "NoSuchMethod"):
        call = channel.unary_unary(f"/backend.Backend/{method}")  # raw bytes in, raw bytes out
        error = _error(lambda call=call: call(b"", timeout=10))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED, method
    assert server.stub.Health(EMPTY, timeout=10).message == b"OK"


def test_thinking_and_tool_calls_arrive_as_chat_deltas(
    server: Server, scripted_think_model: Path, scripted_tool_model: Path
) -> None:
    stub = server.use(scripted_think_model)
    info = fixture_info(scripted_think_model)
    replies = list(stub.PredictStream(chat(Tokens=40, Metadata={"enable_thinking": "true"}), timeout=30))
    assert "".join(d.reasoning_content for r in replies for d in r.chat_deltas) == info["reasoning"]
    assert "".join(r.message.decode() for r in replies) == info["answer"]  # message: the answer only
    stub = server.use(scripted_tool_model)
    info = fixture_info(scripted_tool_model)
    tools = json.dumps(
        [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ]
    )
    replies = list(
        stub.PredictStream(chat("Weather in Paris?", Tokens=60, Tools=tools, ToolChoice='"auto"'), timeout=30)
    )
    calls = [call for r in replies for d in r.chat_deltas for call in d.tool_calls]
    assert [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == info["tool_call"]["arguments"] and calls[0].id
    error = _error(
        lambda: stub.Predict(
            chat(Tokens=5, Tools=tools, ToolChoice='{"function": {"name": "nope"}}'), timeout=30
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in error.details()


def test_images_reach_a_vision_model_and_bad_base64_is_refused(
    server: Server, scripted_vlm_model: Path
) -> None:
    stub = server.use(scripted_vlm_model)
    meta = stub.ModelMetadata(pb.ModelOptions(), timeout=10)
    assert meta.media_marker
    text_only = stub.Predict(chat("Describe.", Tokens=8), timeout=60)
    with_image = stub.Predict(chat("Describe.", Tokens=8, Images=[_png_base64()]), timeout=120)
    assert with_image.prompt_tokens > text_only.prompt_tokens  # the image's tokens reached the prompt
    for images, words in (
        (["@@@not base64@@@" * 8], "not valid base64"),
        (["aGVsbG8gd29ybGQ="], "not a decodable image"),
        (["/etc/passwd"], "local file paths are disabled"),
    ):
        error = _error(lambda images=images: stub.Predict(chat(Tokens=5, Images=images), timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details(), error.details()
    error = _error(lambda: stub.Predict(chat(Tokens=5, Images=[_png_base64()] * 17), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "too many media inputs" in error.details()
    assert stub.Health(EMPTY, timeout=10).message == b"OK"


# ----- cancellation, load and the queue -----
def _first_replies(call: Any, count: int) -> list[Any]:
    iterator = iter(call)
    return [next(iterator) for _ in range(count)]


def test_cancel_mid_stream_frees_the_worker(server: Server, text_qwen3_model: Path) -> None:
    stub = server.use(text_qwen3_model)
    call = stub.PredictStream(chat(Tokens=4000), timeout=300)
    assert len(_first_replies(call, 5)) == 5
    assert _state(stub) == "BUSY"
    call.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert _wait_state(stub, "READY", timeout=10) == "READY"  # the generation stopped: the worker is free
    answer = stub.Predict(chat(Tokens=5), timeout=20)  # and the next request is served at once
    assert answer.tokens == 5


def test_a_full_queue_answers_resource_exhausted(server: Server, text_qwen3_model: Path) -> None:
    stub = server.use(text_qwen3_model, "max_active:1", "max_queue:1")
    running_call = stub.PredictStream(chat(Tokens=4000), timeout=300)
    _first_replies(running_call, 1)
    queued_call = stub.PredictStream(chat(Tokens=5), timeout=300)
    time.sleep(0.5)  # let the queued request reach the engine's queue
    error = _error(lambda: stub.Predict(chat(Tokens=5), timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in error.details()
    running_call.cancel()
    queued = list(queued_call)  # the queued request runs once the worker is free
    assert queued[-1].tokens == 5
    assert _wait_state(stub, "READY", timeout=10) == "READY"


def test_loading_another_model_cancels_streams_on_the_old_one(
    server: Server, text_qwen3_model: Path, scripted_text_model: Path
) -> None:
    stub = server.use(text_qwen3_model)
    call = stub.PredictStream(chat(Tokens=4000), timeout=300)
    _first_replies(call, 2)
    stub = server.use(scripted_text_model)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert (
        stub.Predict(chat(Tokens=30), timeout=30).message.decode()
        == fixture_info(scripted_text_model)["answer"]
    )


# ----- separate processes: a Hub repo id, auth, limits, signals, parent death, binding -----
def test_a_hub_repo_id_is_imported_on_the_fly_and_missing_weights_fail_cleanly(
    hub_session: Any, tmp_path: Path
) -> None:
    """Through the recorded Hub (metadata only): the import works, the weights are not cached, Status says ERROR."""
    env = runtime_env(
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=hub_session.url,
        HF_HUB_CACHE=str(tmp_path / "cache"),
        GALLERY_HTTP_BACKOFF="0.01",
    )
    with running(GrpcProcess(env=env)) as process:
        stub = process.stub
        meta = stub.ModelMetadata(pb.ModelOptions(Model="Qwen/Qwen3-4B"), timeout=120)  # the config alone
        assert meta.supports_thinking and "<|im_start|>assistant" in meta.rendered_template
        reply, call = stub.LoadModel.with_call(pb.ModelOptions(Model="Qwen/Qwen3-4B"), timeout=120)
        assert not reply.success and "Qwen/Qwen3-4B@" in reply.message, reply.message
        assert "not in the local cache" in reply.message and "gallery install" in reply.message, reply.message
        assert ("x-gallery-fault", "load_failed") in tuple(call.trailing_metadata())
        assert _state(stub) == "ERROR"
        error = _error(lambda: stub.Predict(chat(Tokens=5), timeout=10))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "last load failed" in error.details()
        assert stub.Health(EMPTY, timeout=10).message == b"OK"
    assert no_traceback(process.stderr.text)


def test_bearer_token_is_required_on_every_rpc_and_message_size_is_bounded() -> None:
    with running(
        GrpcProcess("--max-message-mb", "1", env=runtime_env(LOCALAI_GRPC_AUTH_TOKEN="s3cret"))
    ) as process:
        stub = process.stub
        good = (("authorization", "Bearer s3cret"),)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            error = _error(lambda metadata=metadata: stub.Health(EMPTY, metadata=metadata, timeout=10))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert (
                _code(lambda metadata=metadata: stub.PredictStream(chat(), metadata=metadata, timeout=10))
                == grpc.StatusCode.UNAUTHENTICATED
            )
            assert (
                _code(
                    lambda metadata=metadata: stub.LoadModel(
                        pb.ModelOptions(Model="x"), metadata=metadata, timeout=10
                    )
                )
                == grpc.StatusCode.UNAUTHENTICATED
            )
        raw = process.channel.unary_unary("/backend.Backend/Embedding")
        assert _error(lambda: raw(b"", timeout=10)).code() == grpc.StatusCode.UNAUTHENTICATED
        assert _error(lambda: raw(b"", metadata=good, timeout=10)).code() == grpc.StatusCode.UNIMPLEMENTED
        assert stub.Health(EMPTY, metadata=good, timeout=10).message == b"OK"
        # Over the channel's message limit (--max-message-mb 1): refused by gRPC itself.
        error = _error(
            lambda: stub.Predict(pb.PredictOptions(Prompt="y" * (2 << 20)), metadata=good, timeout=10)
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Health(EMPTY, metadata=good, timeout=10).message == b"OK"
        process.signal(signal.SIGTERM)
        assert process.wait() == 0
    assert no_traceback(process.stderr.text)


def test_sigterm_drains_in_flight_streams_then_exits_0(text_qwen3_model: Path) -> None:
    """`gallery serve` (model loaded at start): SIGTERM lets a short stream finish and cancels a long one at the grace."""
    with running(
        GrpcProcess("--grace", "3", module=("-m", "cli", "serve", str(text_qwen3_model)))
    ) as process:
        stub = process.stub
        assert _wait_state(stub, "READY", timeout=60) == "READY"
        short = stub.PredictStream(chat(Tokens=60), timeout=120)
        long = stub.PredictStream(chat(Tokens=4000), timeout=120)
        first_short, first_long = _first_replies(short, 1), _first_replies(long, 1)
        process.signal(signal.SIGTERM)
        short_rest = list(short)  # finishes normally within the grace period
        assert short_rest[-1].tokens == 60 and first_short
        with pytest.raises(grpc.RpcError) as caught:
            list(long)
        assert caught.value.code() == grpc.StatusCode.CANCELLED and first_long  # cut at the end of the grace
        assert "runtime is stopping" in caught.value.details()
        assert process.wait(60) == 0
    log = process.stderr.text
    assert "SIGTERM: draining" in log and no_traceback(log)


def test_sigint_cancels_and_exits_130(text_qwen3_model: Path) -> None:
    with running(GrpcProcess("--model", str(text_qwen3_model))) as process:
        stub = process.stub
        assert _wait_state(stub, "READY", timeout=60) == "READY"
        call = stub.PredictStream(chat(Tokens=4000), timeout=120)
        _first_replies(call, 1)
        process.signal(signal.SIGINT)
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
        assert process.wait(30) == 130
    assert no_traceback(process.stderr.text)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in ("Z", "X")  # exited (a zombie waits for whoever adopted it to reap it)


def test_the_runtime_exits_when_its_parent_dies(tmp_path: Path) -> None:
    log = tmp_path / "runtime.log"
    parent_code = (
        "import subprocess, sys, time\n"
        f"log = open({str(log)!r}, 'wb')\n"
        "child = subprocess.Popen([sys.executable, '-m', 'runtime', '--addr', '127.0.0.1:0'], stderr=log)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], cwd=ROOT, env=runtime_env(), stdout=subprocess.PIPE
    )
    child_pid: int | None = None
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 60
        while "listening on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "listening on" in log.read_text()
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while not _gone(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child_pid), "the runtime outlived its parent"
        assert "parent process died" in log.read_text()
    finally:
        parent.kill()
        parent.wait(10)
        if child_pid is not None and not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--addr", "0.0.0.0:0"], {}, "not a loopback address"),
        (["--addr", "0.0.0.0:0", "--allow-remote"], {}, "without LOCALAI_GRPC_AUTH_TOKEN"),
        (["--addr", "no-port"], {}, "expected HOST:PORT"),
    ],
)
def test_binding_beyond_loopback_needs_explicit_flags(
    args: list[str], env: dict[str, str], words: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        cwd=ROOT,
        env=runtime_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and words in result.stderr and no_traceback(result.stderr)


# ----- in-process: the generated code, options, wire conversion, binding, faults -----
def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    from runtime.proto import build

    for generated in build.generate(tmp_path):
        committed = ROOT / "runtime" / "proto" / generated.name
        assert generated.read_bytes() == committed.read_bytes(), (
            f"{generated.name} is stale: run python -m runtime.proto.build"
        )


def test_wire_names_match_the_localai_contract() -> None:
    service = pb.DESCRIPTOR.services_by_name["Backend"]
    assert service.full_name == "backend.Backend"
    assert {m.name for m in service.methods} == {
        "Health",
        "Free",
        "Predict",
        "LoadModel",
        "PredictStream",
        "TokenizeString",
        "Detokenize",
        "Status",
        "ModelMetadata",
    }
    fields = {f.name: f.number for f in pb.PredictOptions.DESCRIPTOR.fields}
    assert (
        fields["Images"],
        fields["UseTokenizerTemplate"],
        fields["Messages"],
        fields["Metadata"],
        fields["MinP"],
        fields["ModelIdentity"],
        fields["Tools"],
        fields["ToolChoice"],
    ) == (42, 43, 44, 52, 53, 54, 48, 49)
    assert {f.name: f.number for f in pb.Reply.DESCRIPTOR.fields}["chat_deltas"] == 8
    assert {f.name: f.number for f in pb.ModelOptions.DESCRIPTOR.fields}["Options"] == 62
    assert pb.StatusResponse.ERROR == -1 and pb.StatusResponse.READY == 2


def test_load_options_parse_and_reject_bad_values() -> None:
    from runtime.load_options import OptionError, options_table, parse_options

    parsed = parse_options(
        [
            "max_active:2",
            "allow_download:true",
            "temp:0.3",
            "model_identity:a",
            "model_identity:b",
            "weird:1",
            "context_size: 4096",
        ]
    )
    assert parsed.get("max_active") == 2 and parsed.get("allow_download") is True
    assert parsed.get("temperature") == 0.3 and parsed.get("model_identity") == ("a", "b")
    assert parsed.get("context_size") == 4096 and parsed.unknown == ["weird"]
    assert parse_options({"strict": True}).get("strict") is True
    for bad in (["max_active:0"], ["strict:maybe"], ["noseparator"], ["top_p:x"]):
        with pytest.raises(OptionError):
            parse_options(bad)
    assert "| `max_active` |" in options_table()


def test_predict_options_become_generation_requests() -> None:
    from gallery.errors import RequestError
    from runtime.grpc_request import predict_request
    from runtime.request import RequestLimits, check_request

    request = predict_request(
        chat(
            "hi",
            Temperature=0.0,
            TopP=0.9,
            TopK=0,
            Penalty=1.1,
            Seed=-1,
            Repeat=64,
            StopPrompts=["x", ""],
            Images=["QUJD"],
            LogitBias='{"5": -100}',
            NDraft=4,
            IgnoreEOS=True,
            Logprobs=1,
            TopLogprobs=3,
            PresencePenalty=0.5,
            FrequencyPenalty=0.25,
            MinP=0.05,
            Metadata={
                "chat_template_kwargs": '{"enable_thinking": false, "x": 1}',
                "reasoning_effort": "low",
                "thinking_budget": "16",
                "truncate": "true",
            },
            Grammar='root ::= "yes" | "no"',
        )
    )
    assert request.temperature == 0.0 and request.top_p == pytest.approx(0.9) and request.top_k is None
    assert request.seed is None and request.stop == ["x"] and request.repeat_penalty == pytest.approx(1.1)
    assert request.repetition_context_size == 64 and request.logit_bias == {5: -100.0}
    assert request.ignore_eos and request.num_draft_tokens == 4 and request.min_p == pytest.approx(0.05)
    assert (
        request.logprobs and request.top_logprobs == 3 and request.thinking_budget == 16 and request.truncate
    )
    assert request.presence_penalty == pytest.approx(0.5) and request.frequency_penalty == pytest.approx(0.25)
    assert request.enable_thinking is False and request.template_kwargs == {"x": 1, "reasoning_effort": "low"}
    assert request.messages[0]["content"][0] == {"type": "image", "image": "QUJD"}
    assert request.response_format is not None and request.response_format.kind == "lark"
    tools = json.dumps(
        [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b"}}]
    )
    request = predict_request(chat(Tools=tools, ToolChoice='{"type": "function", "function": {"name": "b"}}'))
    assert [t["function"]["name"] for t in request.tools] == ["b"]
    assert predict_request(chat(Tools=tools, ToolChoice="none")).tools is None
    with pytest.raises(RequestError, match="max_request_bytes"):
        check_request(predict_request(chat("x" * 2000)), RequestLimits(max_request_bytes=1000))
    with pytest.raises(RequestError, match="tool_calls"):
        predict_request(
            pb.PredictOptions(
                UseTokenizerTemplate=True,
                Messages=[pb.Message(role="assistant", content="", tool_calls="{bad")],
            )
        )
    # Fields that would change the answer and cannot be honoured are refused by name, never ignored.
    for field, value in (
        ("Mirostat", 2),
        ("TypicalP", 0.5),
        ("TailFreeSamplingZ", 0.9),
        ("NegativePrompt", "no"),
        ("RopeFreqBase", 10000.0),
        ("PenalizeNL", True),
    ):
        with pytest.raises(RequestError, match=field):
            predict_request(chat("hi", **{field: value}))
    assert predict_request(
        chat("hi", TypicalP=1.0, TailFreeSamplingZ=1.0, Threads=4, Batch=512, MMap=True)
    ).messages
    with pytest.raises(RequestError, match="'mystery'"):
        predict_request(chat("hi", Metadata={"mystery": "1"}))
    required = predict_request(
        chat(Tools=tools, ToolChoice="required", Metadata={"parallel_tool_calls": "false"})
    )
    assert required.tools_required and not required.parallel_tool_calls and len(required.tools or []) == 2
    with pytest.raises(RequestError, match="needs tools"):
        predict_request(chat(ToolChoice="required"))


def test_loopback_detection() -> None:
    from gallery.errors import UsageError
    from runtime.bind import check_bind, is_loopback, split_address

    assert split_address("[::1]:50051") == ("::1", 50051) and split_address("localhost:1") == ("localhost", 1)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")
    assert check_bind("0.0.0.0:1", allow_remote=True, insecure=False, token="t") == ("0.0.0.0", 1)
    assert check_bind("0.0.0.0:1", allow_remote=True, insecure=True, token=None) == ("0.0.0.0", 1)
    with pytest.raises(UsageError):
        check_bind("10.0.0.1:1", allow_remote=False, insecure=True, token="t")


def test_every_fault_kind_has_a_grpc_code_and_classification_is_stable() -> None:
    from gallery.errors import OfflineNotCached, RuntimeFailure
    from runtime.errors import IdentityMismatch, NotLoaded, QueueFull
    from runtime.faults import FAULTS, classify, faults_table
    from runtime.media import MediaError

    for fault in FAULTS.values():
        assert hasattr(grpc.StatusCode, fault.grpc_code)
    assert classify(MediaError("image 1: not valid base64"))[0] == "invalid_request"
    assert classify(QueueFull("busy"))[0] == "busy"
    assert classify(NotLoaded("x"))[0] == "not_loaded"
    assert classify(IdentityMismatch("x"))[0] == "identity_mismatch"
    assert classify(OfflineNotCached("x"))[0] == "not_found"
    assert classify(RuntimeFailure("the worker did not answer"))[0] == "generation_failed"
    assert classify(KeyError("boom"))[0] == "internal"
    assert "RESOURCE_EXHAUSTED" in faults_table()
