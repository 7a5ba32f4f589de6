"""Serving across processes with MLX's distributed runtime: 2 ranks on 127.0.0.1 started by the real mlx.launch.

What mlx-lm can shard is recorded by the importer and enforced by validate and serve (SmolLM2's llama class has
no pipeline() and its 9 heads do not divide by 2, so it is refused before any rank starts); a 2-rank pipeline
run (uneven layer split) over HTTP and a 2-rank tensor run over gRPC answer exactly as one process does —
concurrent and seeded requests, prefix reuse, stop strings, the reasoning split and tool calls —; a killed
rank fails the stream at once with a clear error and ends the run; a hung rank (stopped, alive but silent) is
found by the watchdog within --rank-timeout, fails the request with cluster_lost, turns /health 503 and ends
the run; SIGTERM to rank 0 (and end of input on stdio) ends every rank.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.interfaces_support import ROOT, GrpcProcess, HttpProcess, StdioProcess, chat, running, runtime_env
from tests.plugins.models import fixture_info

pytestmark = pytest.mark.mlx
TWO_RANKS = ("--hosts", "127.0.0.1,127.0.0.1")
_RANK = re.compile(r"rank (\d) of 2 \(pid (\d+)\)")


def _write(tmp_path: Path, folder: Path, distributed: dict[str, Any] | None = None) -> Path:
    from gallery.config import ModelConfig
    from gallery.yamlio import dump_yaml
    from importers import import_model

    data = import_model(str(folder)).config.to_data()
    if distributed is not None:
        data["distributed"] = distributed
    ModelConfig.model_validate(data)
    path = tmp_path / f"{data['name']}-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(dump_yaml(data), encoding="utf-8")
    return path


def _gallery(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env=runtime_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _pids(process: Any) -> dict[int, int]:
    """rank -> pid, from the ranks' own start-up lines."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = {int(rank): int(pid) for rank, pid in _RANK.findall(process.stderr.text)}
        if len(found) == 2:
            return found
        time.sleep(0.1)
    raise AssertionError(f"the ranks did not report their pids:\n{process.stderr.text}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:  # a zombie is gone too
        return stat.read().split(")")[-1].split()[0] != "Z"


def _reference(folder: Path):  # type: ignore[no-untyped-def]
    """One process, in this test process: the answers a distributed run must reproduce."""
    from importers import import_model
    from runtime.engine import Engine

    return Engine(import_model(str(folder)).config).start()


# ------------------------------------------------------------------------------------------- what can be sharded
def test_importer_records_which_sharding_mlx_lm_offers(
    text_qwen2_model: Path, text_qwen3_model: Path, smollm2_model: Path, vlm_model: Path
) -> None:
    from importers import import_model

    qwen2 = import_model(str(text_qwen2_model)).config
    assert qwen2.mlx.sharding is not None
    assert (qwen2.mlx.sharding.pipeline, qwen2.mlx.sharding.tensor) == (True, True)
    assert (qwen2.mlx.sharding.layers, qwen2.mlx.sharding.attention_heads, qwen2.mlx.sharding.kv_heads) == (
        4,
        4,
        2,
    )
    evidence = qwen2.mlx.decisions["sharding"].evidence
    assert {e.source for e in evidence[:2]} == {"mlx_lm/models/qwen2.py"}
    smol = import_model(str(smollm2_model)).config.mlx
    assert smol.sharding is not None and (smol.sharding.pipeline, smol.sharding.tensor) == (False, True)
    assert "has no model.pipeline" in smol.decisions["sharding"].evidence[0].detail
    qwen3 = import_model(str(text_qwen3_model)).config.mlx.sharding
    assert qwen3 is not None and (qwen3.pipeline, qwen3.tensor) == (False, True)
    vlm = import_model(str(vlm_model)).config.mlx
    assert vlm.sharding is None and vlm.decisions["sharding"].value == "not supported"


def test_validate_refuses_a_distributed_section_the_class_cannot_serve(
    tmp_path: Path, smollm2_model: Path, text_qwen2_model: Path, vlm_model: Path
) -> None:
    cases = [
        (smollm2_model, {"strategy": "pipeline"}, "llama class has no pipeline() method"),
        (smollm2_model, {"hosts": ["10.0.0.1", "10.0.0.2"]}, "9 is not divisible by 2"),
        (text_qwen2_model, {"hosts": ["10.0.0.1", "10.0.0.2"], "layer_split": [3, 2]}, "sums to 5"),
        (text_qwen2_model, {"strategy": "tensor", "layer_split": [2, 2]}, "layer_split is for the pipeline"),
        (vlm_model, {"hosts": ["10.0.0.1", "10.0.0.2"]}, "has no sharding for model type qwen2_vl"),
    ]
    for folder, section, message in cases:
        path = _write(tmp_path, folder, section)
        result = _gallery("validate", str(path))
        assert result.returncode == 14, (section, result.stdout, result.stderr)
        assert "cannot-shard" in result.stdout and message in result.stdout, result.stdout
    good = _write(tmp_path, text_qwen2_model, {"hosts": ["10.0.0.1", "10.0.0.2"], "layer_split": [3, 1]})
    result = _gallery("validate", str(good))
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_refuses_before_any_rank_starts(
    tmp_path: Path, smollm2_model: Path, text_qwen2_model: Path
) -> None:
    smol = _write(tmp_path, smollm2_model)
    qwen2 = _write(tmp_path, text_qwen2_model)
    cases = [
        ((str(smol), *TWO_RANKS), 10, "9 is not divisible by 2"),
        ((str(smol), *TWO_RANKS, "--strategy", "pipeline"), 10, "has no pipeline() method"),
        ((str(qwen2), *TWO_RANKS, "--layer-split", "3,2"), 10, "sums to 5"),
        ((str(qwen2), *TWO_RANKS, "--layer-split", "a,b"), 10, "whole numbers"),
        ((str(qwen2), "--hosts", "127.0.0.1"), 2, "at least 2 ranks"),
        ((str(qwen2), "--hosts", "mac-a,mac-b"), 2, "needs IP addresses"),
        ((str(qwen2), "--hosts", "192.0.2.7,127.0.0.1"), 2, "runs rank 0"),
        ((str(qwen2), *TWO_RANKS, "--any-model"), 2, "serves one model"),
        ((str(qwen2), *TWO_RANKS, "--backend", "mpi"), 2, "ring or jaccl"),
        ((str(qwen2), "--strategy", "tensor"), 2, "give --hosts"),
        ((str(qwen2), "--rank-timeout", "3"), 2, "give --hosts"),
        ((str(qwen2), *TWO_RANKS, "--rank-timeout", "0"), 2, "--rank-timeout must be over 0"),
    ]
    for args, code, message in cases:
        result = _gallery("serve", *args, "--http", "127.0.0.1:0", timeout=60)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_one_process_refuses_distributed_load_options_by_name(text_qwen2_model: Path) -> None:
    from runtime.errors import LoadFailed
    from runtime.host import ModelHost

    host = ModelHost(interface="grpc")
    with pytest.raises(LoadFailed, match="distributed_strategy and layer_split need a distributed run"):
        host.load(str(text_qwen2_model), ["distributed_strategy:pipeline"])


# ------------------------------------------------------------------------------------------- two ranks, for real
def test_pipeline_run_answers_like_one_process_then_a_killed_rank_fails_fast(text_qwen2_model: Path) -> None:
    reference = _reference(text_qwen2_model)
    from runtime.request import GenerationRequest

    # Prompt 5 is long: its token ids do not fit in one message collective (see backends.distributed).
    prompts = [f"question {i}: " + "tell me more " * (i if i < 5 else 400) for i in range(6)]

    def ask_reference(i: int) -> str:
        request = GenerationRequest(
            messages=[{"role": "user", "content": prompts[i]}],
            max_tokens=24,
            temperature=0.0 if i % 2 else 0.9,
            seed=i,
            stop=["weather"] if i == 3 else [],
        )
        return reference.generate(request).content

    try:
        expected = [ask_reference(i) for i in range(6)]
        turn2 = reference.generate(
            GenerationRequest(
                messages=[
                    {"role": "user", "content": prompts[1]},
                    {"role": "assistant", "content": expected[1]},
                    {"role": "user", "content": "and then?"},
                ],
                max_tokens=16,
                temperature=0.0,
            )
        ).content
    finally:
        reference.shutdown()

    with running(HttpProcess(str(text_qwen2_model), *TWO_RANKS, "--layer-split", "3,1")) as process:
        assert isinstance(process, HttpProcess)
        client = process.client

        def ask(i: int) -> str:
            response = client.chat.completions.create(
                model="text-qwen2",
                messages=[{"role": "user", "content": prompts[i]}],
                max_tokens=24,
                temperature=0.0 if i % 2 else 0.9,
                seed=i,
                stop=["weather"] if i == 3 else None,
            )
            return response.choices[0].message.content or ""

        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # all six in one batch
            answers = list(pool.map(ask, range(6)))
        assert answers == expected
        second = client.chat.completions.create(
            model="text-qwen2",
            messages=[
                {"role": "user", "content": prompts[1]},
                {"role": "assistant", "content": answers[1]},
                {"role": "user", "content": "and then?"},
            ],
            max_tokens=16,
            temperature=0.0,
        )
        assert second.choices[0].message.content == turn2
        assert second.usage is not None and second.usage.prompt_tokens_details is not None
        assert (
            second.usage.prompt_tokens_details.cached_tokens or 0
        ) > 0  # the prefix cache works on every rank

        pids = _pids(process)
        stream = client.chat.completions.create(
            model="text-qwen2", messages=[{"role": "user", "content": "go on"}], max_tokens=3000, stream=True
        )
        killed_at = None
        error = None
        try:
            for count, _chunk in enumerate(stream):
                if count == 5:
                    os.kill(pids[1], signal.SIGKILL)
                    killed_at = time.monotonic()
        except Exception as exc:  # the stream ends with the server's error event
            error = exc
        assert killed_at is not None and error is not None, "the stream finished despite the dead rank"
        assert time.monotonic() - killed_at < 20
        assert "distributed run is broken" in str(error) and "restart it" in str(error)
        code = process.wait(60)  # mlx.launch stops the remaining rank; the serve exits, and says it failed
        assert code != 0
        assert not _alive(pids[0])
        assert "Traceback" not in process.stderr.text


def test_a_hung_rank_is_found_within_the_bound_fails_requests_and_ends_the_run(
    text_qwen2_model: Path,
) -> None:
    import httpx

    with running(HttpProcess(str(text_qwen2_model), *TWO_RANKS, "--rank-timeout", "3")) as process:
        assert isinstance(process, HttpProcess)
        pids = _pids(process)
        health: list[tuple[int, str]] = []
        done = threading.Event()

        def watch_health() -> None:  # what a supervisor's health check sees, until the server is gone
            while not done.is_set() and process.proc.poll() is None:
                try:
                    answer = httpx.get(f"{process.url}/health", timeout=10)
                    health.append((answer.status_code, answer.text))
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)

        try:
            first = process.client.chat.completions.create(
                model="text-qwen2",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=8,
                temperature=0.0,
            )
            assert first.choices[0].message.content
            os.kill(pids[1], signal.SIGSTOP)  # alive, but it answers no collective any more
            stopped_at = time.monotonic()
            threading.Thread(target=watch_health, daemon=True).start()
            reply = httpx.post(
                f"{process.url}/v1/chat/completions",
                json={"model": "text-qwen2", "messages": [{"role": "user", "content": "are you there?"}]},
                timeout=120,
            )
            replied_at = time.monotonic()
            assert reply.status_code == 503, reply.text
            error = reply.json()["error"]
            assert error["code"] == "cluster_lost" and error["type"] == "service_unavailable_error", error
            assert (
                "distributed run is broken" in error["message"]
                and "got no answer within 3 s" in error["message"]
            )
            code = process.wait(120)  # rank 0 exits; the launcher kills the stopped rank
            exited_at = time.monotonic()
            assert code == 17, process.stderr.text
            assert not _alive(pids[0]) and not _alive(pids[1])
            assert any(status == 503 and "distributed run is broken" in text for status, text in health), (
                health
            )
            assert "Traceback" not in process.stderr.text
            print(
                f"hung rank: error reply {replied_at - stopped_at:.1f} s after SIGSTOP, "
                f"the run ended {exited_at - stopped_at:.1f} s after it"
            )
        finally:
            done.set()
            for pid in pids.values():
                for signum in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)


def test_tensor_run_over_grpc_keeps_reasoning_and_tool_calls_and_follows_model_switches(
    scripted_think_model: Path, scripted_tool_model: Path
) -> None:
    from runtime.proto import backend_pb2 as pb

    with running(
        GrpcProcess("--model", str(scripted_think_model), *TWO_RANKS, "--strategy", "tensor", timeout=120)
    ) as process:
        assert isinstance(process, GrpcProcess)
        stub = process.stub
        deadline = time.monotonic() + 120
        while stub.Status(pb.HealthMessage(), timeout=10).state != pb.StatusResponse.READY:
            assert time.monotonic() < deadline, process.stderr.text
            time.sleep(0.2)
        info = fixture_info(scripted_think_model)
        replies = list(stub.PredictStream(chat(Tokens=40, Metadata={"enable_thinking": "true"}), timeout=60))
        assert "".join(d.reasoning_content for r in replies for d in r.chat_deltas) == info["reasoning"]
        assert "".join(r.message.decode() for r in replies) == info["answer"]

        # LoadModel of another config: rank 0 frees, every rank loads the new one.
        result = stub.LoadModel(pb.ModelOptions(Model=str(scripted_tool_model)), timeout=120)
        assert result.success, result.message
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
        tool_info = fixture_info(scripted_tool_model)
        replies = list(
            stub.PredictStream(
                chat("Weather in Paris?", Tokens=60, Tools=tools, ToolChoice='"auto"'), timeout=60
            )
        )
        calls = [call for r in replies for d in r.chat_deltas for call in d.tool_calls]
        assert [c.name for c in calls] == ["get_weather"]
        assert json.loads(calls[0].arguments) == tool_info["tool_call"]["arguments"]
        assert stub.Health(pb.HealthMessage(), timeout=10).message == b"OK"

        pids = _pids(process)
        os.kill(pids[0], signal.SIGTERM)  # rank 0 drains, then tells rank 1 to exit
        assert process.wait(60) == 0
        assert not _alive(pids[1])
        assert "rank 1: rank 0 said exit" in process.stderr.text


def test_stdio_run_goes_through_the_launcher_and_ends_at_end_of_input(text_qwen2_model: Path) -> None:
    reference = _reference(text_qwen2_model)
    from runtime.request import GenerationRequest

    try:
        expected = reference.generate(
            GenerationRequest(prompt="The capital of France", max_tokens=12, temperature=0.0)
        ).content
    finally:
        reference.shutdown()
    with running(StdioProcess(str(text_qwen2_model), *TWO_RANKS)) as process:
        assert isinstance(process, StdioProcess)
        response = process.call(
            "complete", {"prompt": "The capital of France", "max_tokens": 12, "temperature": 0}, timeout=120
        )
        assert response["result"]["text"] == expected, response
        process.close_stdin()
        assert process.wait(60) == 0
        assert not process.bad_lines  # nothing but JSON-RPC on stdout: rank 1 never writes there
        assert "rank 1: rank 0 said exit" in process.stderr.text


# ------------------------------------------------------------------------------------------- replicas for users
def test_replicas_answer_alike_and_sticky_routing_keeps_each_chat_in_one_prefix_cache(
    text_qwen2_model: Path,
) -> None:
    """Two independent replicas (what a load balancer or LocalAI spreads users over): the same answers whichever
    replica serves a turn; only the replica that served a chat's earlier turns has them cached."""
    with (
        running(HttpProcess(str(text_qwen2_model))) as first,
        running(HttpProcess(str(text_qwen2_model))) as second,
    ):
        assert isinstance(first, HttpProcess) and isinstance(second, HttpProcess)
        replicas = [first.client, second.client]

        def chat_through(topic: str, route: list[int]) -> tuple[list[str], list[int], list[int]]:
            messages: list[dict[str, str]] = []
            answers, prompts, cached = [], [], []
            for turn, replica in enumerate(route):
                messages.append({"role": "user", "content": f"{topic}, part {turn}: say more about {topic}"})
                response = replicas[replica].chat.completions.create(
                    model="text-qwen2", messages=messages, max_tokens=12, temperature=0.0
                )
                answer = response.choices[0].message.content or ""
                messages.append({"role": "assistant", "content": answer})
                answers.append(answer)
                assert response.usage is not None
                prompts.append(response.usage.prompt_tokens)
                details = response.usage.prompt_tokens_details
                cached.append(int(details.cached_tokens or 0) if details else 0)
            return answers, prompts, cached

        sticky, sticky_prompts, sticky_cached = chat_through("rivers", [0, 0, 0])
        elsewhere, _, _ = chat_through("rivers", [1, 1, 1])
        assert sticky == elsewhere  # one config, greedy: the replica does not change the answer
        _, spread_prompts, spread_cached = chat_through("mountains", [0, 1, 0])
        # Sticky: every later turn reuses the whole earlier conversation from its replica's cache.
        assert sticky_cached[1] >= sticky_prompts[0] and sticky_cached[2] >= sticky_prompts[1]
        # Spread: the turn that lands on the other replica recomputes the conversation (at most the template's
        # shared opening is reused), and the next one only finds what its replica saw two turns back.
        assert spread_cached[1] < spread_prompts[0]
        assert spread_cached[2] < spread_prompts[1]
