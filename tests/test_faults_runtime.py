"""Issue #11 (hostile input and faults) against the real runtime: a real gRPC client and a real stdio subprocess.

Each test reproduces one finding of the adversarial run and checks what happens now:
- item 1: every out-of-range sampling value is refused on every interface, naming the field, and none of them
  (nor the issue's trigger, TopK=2147483647 with a temperature) poisons the next sampled request;
- item 2: a prompt over the context is refused at once (or left-truncated when asked); a long prefill stops
  between chunks when the client cancels, and SIGTERM stops it within the grace period;
- item 3: the runtime renders under the same template budget as import and validate (a bomb in a dead branch
  costs nothing; one a message triggers is that request's -32602);
- item 8: LoadModel of a very long name or of /proc/self/environ is a clean failure naming the problem;
- item 9: a request protobuf cannot parse (bad UTF-8) is INVALID_ARGUMENT; during a SIGTERM drain every new
  request gets UNAVAILABLE; exactly one `authorization` header is accepted.
No timed assertions: waits poll for a state under generous deadlines (the measured times are in the report of
the change, not asserted).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")

from runtime.proto import backend_pb2 as pb  # noqa: E402
from tests.interfaces_support import (  # noqa: E402
    GrpcProcess,
    StdioProcess,
    chat,
    grpc_state,
    no_traceback,
    rpc_error,
    running,
    runtime_env,
    wait_for_grpc_state,
)

pytestmark = pytest.mark.mlx

EMPTY = pb.HealthMessage()
# Words the tiny models' tokenizer knows: ~6 tokens per repetition.
LONG_WORDS = "sea river mountain"


_error = rpc_error


def _wait_state(stub: Any, wanted: str, timeout: float = 60.0) -> str:
    return wait_for_grpc_state(stub, wanted, timeout)


# ----- item 1: sampling values -----
GRPC_BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"Temperature": math.nan}, "temperature"),
    ({"Temperature": math.inf}, "temperature"),
    ({"Temperature": 1e308}, "temperature"),  # a float32 on the wire: inf
    ({"Temperature": -1.0}, "temperature"),
    ({"Temperature": 0.7, "MinP": 5.0}, "min_p"),
    ({"Temperature": 0.7, "MinP": math.nan}, "min_p"),
    ({"Temperature": 0.7, "TopP": 7.0}, "top_p"),
    ({"Temperature": 0.7, "TopP": -0.5}, "top_p"),
    ({"Temperature": 0.7, "TopK": -3}, "top_k"),
    ({"Penalty": -1.0}, "repetition_penalty"),
    ({"Penalty": math.inf}, "repetition_penalty"),
    ({"Repeat": -1}, "repetition_context_size"),
    ({"FrequencyPenalty": 3.0}, "frequency_penalty"),
    ({"PresencePenalty": -5.0}, "presence_penalty"),
    ({"NDraft": -1}, "num_draft_tokens"),
    ({"TopLogprobs": 50}, "top_logprobs"),
    ({"LogitBias": '{"5": 1000}'}, "logit_bias"),
    ({"LogitBias": '{"-5": 1}'}, "logit_bias"),
    ({"Metadata": {"thinking_budget": "-1"}}, "thinking_budget"),
    ({"Tokens": 10**6}, "max_tokens"),
]
STDIO_BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    (
        {"temperature": math.nan},
        "temperature",
    ),  # JSON's NaN / Infinity literals, as Python's json writes them
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": 1e308}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"min_p": 5}, "min_p"),
    ({"top_p": 7}, "top_p"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_context_size": 0}, "repetition_context_size"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": -math.inf}, "presence_penalty"),
    ({"seed": -5}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"logit_bias": {"5": 1000}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"thinking_budget": -1}, "thinking_budget"),
    ({"num_draft_tokens": 0}, "num_draft_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
]


def test_out_of_range_sampling_values_never_poison_the_grpc_runtime(text_qwen3_model: Path) -> None:
    """Issue: Predict(Temperature=0.7, TopK=2147483647) or MinP=5 failed, then every unseeded sampled request
    failed with INTERNAL while Health said OK; NaN/inf/1e308 temperatures returned garbage with OK."""
    with running(GrpcProcess("--model", str(text_qwen3_model))) as process:
        stub = process.stub
        assert _wait_state(stub, "READY") == "READY"
        sampled = chat("Tell me about the sea", Tokens=8, Temperature=0.7, TopK=40, TopP=0.9)
        # The trigger is legal now (a top-k at least the vocabulary means no top-k) and harms nothing.
        for rpc in (stub.Predict, stub.PredictStream):
            trigger = chat("Hi", Tokens=8, Temperature=0.7, TopK=2147483647)
            replies = [rpc(trigger, timeout=60)] if rpc is stub.Predict else list(rpc(trigger, timeout=60))
            assert replies[-1].tokens >= 1
        for fields, name in GRPC_BAD_VALUES:
            for rpc in (stub.Predict, stub.PredictStream):
                error = _error(lambda rpc=rpc, fields=fields: rpc(chat("Hi", **fields), timeout=60))
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, error.details())
                assert name in error.details() and "\n" not in error.details(), (fields, error.details())
            # After each refusal, an unseeded sampled request still works, on both RPCs.
            assert stub.Predict(sampled, timeout=60).tokens >= 1, fields
            assert list(stub.PredictStream(sampled, timeout=60))[-1].tokens >= 1, fields
        assert grpc_state(stub) == "READY" and stub.Health(EMPTY, timeout=10).message == b"OK"
    assert no_traceback(process.stderr.text)


def test_out_of_range_sampling_values_never_poison_the_stdio_runtime(text_qwen3_model: Path) -> None:
    """The same over stdio: each bad value is -32602 naming the field; the next sampled chat still answers."""
    with running(StdioProcess(str(text_qwen3_model))) as process:
        assert isinstance(process, StdioProcess)
        hi = [{"role": "user", "content": "Hi"}]
        sampled = {"messages": hi, "max_tokens": 8, "temperature": 0.7, "top_k": 40, "top_p": 0.9}
        trigger = process.call(
            "chat", {"messages": hi, "max_tokens": 8, "temperature": 0.7, "top_k": 2**31 - 1}
        )
        assert trigger["result"]["usage"]["completion_tokens"] >= 1, trigger
        for fields, name in STDIO_BAD_VALUES:
            for method, base in (("chat", {"messages": hi}), ("complete", {"prompt": "Hi"})):
                response = process.call(method, {**base, "max_tokens": 8, **fields})
                assert "error" in response and response["error"]["code"] == -32602, (method, fields, response)
                assert name in response["error"]["message"], (method, fields, response)
            answer = process.call("chat", sampled)
            assert answer["result"]["usage"]["completion_tokens"] >= 1, (fields, answer)
        status = process.call("status")["result"]
        assert status["state"] == "READY", status
        assert process.bad_lines == []
    assert no_traceback(process.stderr.text)


# ----- item 3: template bombs at runtime -----
def test_template_bombs_at_runtime_fail_only_the_request_that_triggers_them(
    text_qwen3_model: Path, tmp_path: Path
) -> None:
    """Issue: the runtime's first request took 26 s and kept +950 MB for a bomb in `{% if false %}`."""
    folder = tmp_path / "bomb-model"
    shutil.copytree(text_qwen3_model, folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = (
        "{% if false %}{{ '%999999999s' % 'a' }}{% endif %}"
        "{% if messages[0].content == 'boom' %}{{ '{:>999999999}'.format('a') }}{% endif %}"
        + tokenizer_config["chat_template"]
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with running(StdioProcess(str(folder))) as process:
        assert isinstance(process, StdioProcess)
        boom = process.call("chat", {"messages": [{"role": "user", "content": "boom"}], "max_tokens": 3})
        assert boom["error"]["code"] == -32602 and "format width too large" in boom["error"]["message"], boom
        fine = process.call("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert fine["result"]["usage"]["completion_tokens"] == 3, fine
    assert no_traceback(process.stderr.text)


# ----- item 2: long prompts -----
@pytest.fixture
def long_prefill_server(text_qwen3_model: Path) -> Iterator[GrpcProcess]:
    """A runtime whose prompts prefill 16 tokens per step: a 24k-token prompt takes many chunks (here about
    100 s in all), so a cancel or a signal lands mid-prefill."""
    process = GrpcProcess(
        "--model",
        str(text_qwen3_model),
        "--option",
        "prefill_step:16",
        "--option",
        "context_size:100000",
        "--grace",
        "2",
    )
    try:
        assert _wait_state(process.stub, "READY") == "READY"
        yield process
    finally:
        process.close()


def test_a_prompt_over_the_context_is_refused_at_once_or_truncated_on_request(text_qwen3_model: Path) -> None:
    """Issue: a 17k-token prompt (context 4,096) held the worker ~38 s after the client gave up; two 1 MB prompts
    kept it busy for minutes at 2.4 GB. Now the context is enforced before the request is queued."""
    with running(GrpcProcess("--model", str(text_qwen3_model))) as process:
        stub = process.stub
        assert _wait_state(stub, "READY") == "READY"
        context = 4096  # the tiny model's max_position_embeddings, pinned as its context_size
        long_text = " ".join([LONG_WORDS] * 3000)  # ~18k tokens
        assert stub.TokenizeString(chat(long_text), timeout=60).length > 4 * context
        error = _error(lambda: stub.Predict(chat(long_text, Tokens=4), timeout=60))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the context of text-qwen3 is {context} tokens" in error.details(), error.details()
        # Two ~1 MB prompts at once: both refused, the worker never sees them.
        huge = " ".join([LONG_WORDS] * 55000)
        calls = [stub.Predict.future(chat(huge, Tokens=4), timeout=120) for _ in range(2)]
        for call in calls:
            assert call.exception() is not None and call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert grpc_state(stub) == "READY"
        # Asked for, the prompt is left-truncated to fit (the end of the conversation is kept).
        reply = stub.Predict(chat(long_text, Tokens=4, Metadata={"truncate": "true"}), timeout=120)
        assert 0 < reply.prompt_tokens < context and reply.tokens >= 1
    assert no_traceback(process.stderr.text)


def test_a_cancelled_long_prefill_frees_the_worker(long_prefill_server: GrpcProcess) -> None:
    stub = long_prefill_server.stub
    prompt = chat("blue " + " ".join([LONG_WORDS] * 4000), Tokens=4)  # ~24k tokens
    call = stub.PredictStream(prompt, timeout=600)
    assert _wait_state(stub, "BUSY", timeout=30) == "BUSY"  # prefilling (no token can come before it ends)
    time.sleep(0.5)
    call.cancel()
    assert _error(lambda: list(call)).code() == grpc.StatusCode.CANCELLED
    # Far sooner than the whole prefill would take: the worker stopped between two chunks.
    assert _wait_state(stub, "READY", timeout=30) == "READY"
    reply = stub.Predict(
        chat("red " + LONG_WORDS, Tokens=3), timeout=30
    )  # the next request is served at once
    assert reply.tokens == 3
    assert "generation cancelled" in long_prefill_server.stderr.text


def test_sigterm_stops_a_long_prefill_within_the_grace(long_prefill_server: GrpcProcess) -> None:
    """Issue: SIGTERM, parent death and a second SIGTERM did not stop a long prefill for 45-100 s."""
    stub = long_prefill_server.stub
    call = stub.PredictStream(chat("green " + " ".join([LONG_WORDS] * 4000), Tokens=4), timeout=600)
    assert _wait_state(stub, "BUSY", timeout=30) == "BUSY"
    long_prefill_server.signal(signal.SIGTERM)
    error = _error(lambda: list(call))
    assert error.code() == grpc.StatusCode.CANCELLED and "stopping" in error.details(), error.details()
    assert long_prefill_server.wait(60) == 0  # grace 2 s: the prefill is cut at the end of it
    log = long_prefill_server.stderr.text
    assert "SIGTERM: draining" in log and no_traceback(log)


# ----- item 8: bad model specs -----
def test_load_model_of_a_long_name_or_a_proc_file_fails_cleanly() -> None:
    """Issue: LoadModel of a very long name or of /proc/self/environ answered "internal error"."""
    secret = "s3cret-value-from-the-environment"
    with running(GrpcProcess(env=runtime_env(GALLERY_TEST_SECRET=secret))) as process:
        stub = process.stub
        for spec, words in (
            ("a" * 5000, "model spec of 5000 characters"),
            ("org/" + "b" * 5000, "model spec of 5004 characters"),
            ("x" * 300 + "/y", "not a config file, catalog entry, model folder or Hub repo id"),
            ("/proc/self/environ", "/proc/self/environ"),
            ("/", "not a model folder"),
        ):
            reply, call = stub.LoadModel.with_call(pb.ModelOptions(Model=spec), timeout=120)
            fault = dict(call.trailing_metadata()).get("x-gallery-fault")
            assert not reply.success and fault in ("invalid_request", "not_found"), (spec[:40], reply.message)
            assert words in reply.message and "internal error" not in reply.message, reply.message
            assert secret not in reply.message and "\n" not in reply.message
        assert stub.Health(EMPTY, timeout=10).message == b"OK"
    assert no_traceback(process.stderr.text) and secret not in process.stderr.text


# ----- item 9: bad UTF-8, drain, authorization -----
def test_invalid_utf8_is_invalid_argument_on_every_rpc() -> None:
    """Issue: a string field that is not UTF-8 got UNKNOWN (protobuf's parse error), not INVALID_ARGUMENT."""
    predict = pb.PredictOptions(Prompt="abc").SerializeToString().replace(b"abc", b"a\xffc")
    load = pb.ModelOptions(Model="abc").SerializeToString().replace(b"abc", b"a\xffc")
    with running(GrpcProcess()) as process:
        assert isinstance(process, GrpcProcess)
        channel = process.channel
        for method, body in (
            ("Predict", predict),
            ("PredictStream", predict),
            ("TokenizeString", predict),
            ("LoadModel", load),
            ("ModelMetadata", load),
        ):
            if method == "PredictStream":
                stream = channel.unary_stream(f"/backend.Backend/{method}")
                error = _error(lambda stream=stream, body=body: stream(body, timeout=10))
            else:
                unary = channel.unary_unary(f"/backend.Backend/{method}")
                error = _error(lambda unary=unary, body=body: unary(body, timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.details())
            assert "UTF-8" in error.details() and "\n" not in error.details()
        assert process.stub.Health(EMPTY, timeout=10).message == b"OK"
    assert no_traceback(process.stderr.text)


def test_new_requests_during_a_sigterm_drain_get_unavailable(text_qwen3_model: Path) -> None:
    """Issue: during a drain, a new request sometimes got CANCELLED instead of the documented UNAVAILABLE."""
    with running(
        GrpcProcess("--grace", "5", module=("-m", "cli", "serve", str(text_qwen3_model)))
    ) as process:
        stub = process.stub
        assert _wait_state(stub, "READY") == "READY"
        in_flight = stub.PredictStream(chat("Tell me a story", Tokens=4000, IgnoreEOS=True), timeout=120)
        next(iter(in_flight))
        process.signal(signal.SIGTERM)
        assert process.stderr.wait_for(re.compile("SIGTERM: draining"), 30)
        for _ in range(10):
            for rpc in (stub.Predict, stub.PredictStream, stub.TokenizeString):
                error = _error(lambda rpc=rpc: rpc(chat("Hi", Tokens=5), timeout=30))
                assert error.code() == grpc.StatusCode.UNAVAILABLE, (rpc, error.code(), error.details())
                assert "shutting down" in error.details()
        # The in-flight stream was let run, and is cut (CANCELLED, "stopping") only at the end of the grace.
        error = _error(lambda: list(in_flight))
        assert error.code() == grpc.StatusCode.CANCELLED and "stopping" in error.details()
        assert process.wait(60) == 0
    assert no_traceback(process.stderr.text)


def test_exactly_one_authorization_header_is_accepted() -> None:
    """Issue: a wrong bearer token was accepted when a second, correct `authorization` header followed it."""
    with running(GrpcProcess(env=runtime_env(LOCALAI_GRPC_AUTH_TOKEN="s3cret"))) as process:
        stub = process.stub
        good, bad = ("authorization", "Bearer s3cret"), ("authorization", "Bearer wrong")
        for metadata in ((bad, good), (good, bad), (good, good)):
            error = _error(lambda metadata=metadata: stub.Health(EMPTY, metadata=metadata, timeout=10))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert stub.Health(EMPTY, metadata=(good,), timeout=10).message == b"OK"
    assert no_traceback(process.stderr.text)
