"""Helpers for the interface tests (and the interfaces benchmark): the runtime as a real subprocess.

`GrpcProcess` starts `python -m runtime --addr 127.0.0.1:0 …`, reads the port it picked from its log,
and offers a real gRPC stub. `StdioProcess` starts `python -m runtime --stdio …` and speaks JSON-RPC
to it line by line, checking that every stdout line is one JSON object. Both collect stderr in the
background (so the pipe never fills) for assertions about logs and tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"listening on \S+:(\d+)")


def runtime_env(**extra: str) -> dict[str, str]:
    """The environment for a runtime child: offline, quiet, this checkout first on the path."""
    env = dict(os.environ)
    env.pop("LOCALAI_GRPC_AUTH_TOKEN", None)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class _StderrPump:
    """Collect a child's stderr lines on a thread."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            with self._new:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """The first line matching pattern, waiting up to timeout seconds."""
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for line in self.lines:
                    match = pattern.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return None
                self._new.wait(remaining)

    @property
    def text(self) -> str:
        """Everything read so far."""
        with self._new:
            return "\n".join(self.lines)

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the child to close stderr."""
        self._thread.join(timeout)


class _Process:
    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None,
        stdin: Any = subprocess.DEVNULL,
        stdout: Any = subprocess.DEVNULL,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env=env or runtime_env(),
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        self.stderr = _StderrPump(self.proc.stderr)

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.proc.pid

    def signal(self, signum: int) -> None:
        """Send a signal to the child."""
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the exit code."""
        code = self.proc.wait(timeout)
        self.stderr.join()
        return code

    def kill(self) -> None:
        """Make sure the child is gone (test teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class GrpcProcess(_Process):
    """`python -m runtime --addr 127.0.0.1:0` with a connected Backend stub."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        module: Sequence[str] = ("-m", "runtime"),
        addr_flag: Sequence[str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        import grpc

        from runtime.proto import backend_pb2_grpc

        argv = [*module, *(addr_flag if addr_flag is not None else ("--addr", "127.0.0.1:0")), *args]
        super().__init__(argv, env)
        match = self.stderr.wait_for(_LISTENING, timeout)
        if match is None:
            self.kill()
            raise RuntimeError(f"the runtime did not start listening:\n{self.stderr.text}")
        self.port = int(match.group(1))
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        self.stub = backend_pb2_grpc.BackendStub(self.channel)

    def close(self) -> None:
        """Close the channel and stop the child."""
        self.channel.close()
        self.kill()


class HttpProcess(_Process):
    """`python -m runtime --http 127.0.0.1:0 …` with a real `openai` client pointed at it."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        import httpx
        import openai

        super().__init__(["-m", "runtime", "--http", "127.0.0.1:0", *args], env)
        match = self.stderr.wait_for(_LISTENING, timeout)
        if match is None:
            self.kill()
            raise RuntimeError(f"the runtime did not start listening:\n{self.stderr.text}")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while True:  # /health is 503 while the first model loads
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"the runtime never became healthy:\n{self.stderr.text}")
            time.sleep(0.2)
        self.client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key or "unused", max_retries=0, timeout=300
        )

    def close(self) -> None:
        """Close the client and stop the child."""
        self.client.close()
        self.kill()


class StdioProcess(_Process):
    """`python -m runtime --stdio …` with line-level JSON-RPC helpers."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(
            ["-m", "runtime", "--stdio", *args], env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.bad_lines: list[bytes] = []
        self._ids = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            try:
                message = json.loads(raw)
            except ValueError:
                self.bad_lines.append(raw)
                continue
            if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
                self.bad_lines.append(raw)
                continue
            self.messages.put(message)
        self.messages.put(None)

    def write(self, data: bytes | str) -> None:
        """Write raw bytes (a line or several) to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data.encode() if isinstance(data, str) else data)
        self.proc.stdin.flush()

    def send(self, method: str, params: Any = None, *, request_id: Any = "auto") -> Any:
        """Send a request and return its id (numbered automatically unless given; see notify() for no id)."""
        if request_id == "auto":
            self._ids += 1
            request_id = self._ids
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.write(json.dumps(message) + "\n")
        return request_id

    def notify(self, method: str, params: Any = None) -> None:
        """Send a notification (no id)."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self.write(json.dumps(message) + "\n")

    def next(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next message from the child (a response or a notification)."""
        message = self.messages.get(timeout=timeout)
        if message is None:
            raise EOFError(f"the runtime closed stdout:\n{self.stderr.text}")
        return message

    def collect(
        self, request_id: Any, timeout: float = 60.0
    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
        """Read until the response to request_id: (response, its deltas, other messages seen meanwhile)."""
        deltas, others = [], []
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(deadline - time.monotonic(), 0.01))
            if "id" in message and message.get("id") == request_id and "method" not in message:
                return message, deltas, others
            if message.get("method", "").endswith(".delta") and message["params"].get("id") == request_id:
                deltas.append(message["params"])
            else:
                others.append(message)

    def call(self, method: str, params: Any = None, timeout: float = 60.0) -> dict[str, Any]:
        """Send a request and return its response (notifications in between are dropped)."""
        response, _, _ = self.collect(self.send(method, params), timeout)
        return response

    def close_stdin(self) -> None:
        """Signal end of input."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()


@contextlib.contextmanager
def running(process: _Process) -> Iterator[_Process]:
    """Kill the process when the block ends, however it ends."""
    try:
        yield process
    finally:
        if isinstance(process, (GrpcProcess, HttpProcess)):
            process.close()
        else:
            process.kill()


def chat(content: str = "Hi", **fields: Any) -> Any:
    """PredictOptions for a one-turn chat rendered with the model's template (greedy by default)."""
    from runtime.proto import backend_pb2 as pb

    return pb.PredictOptions(
        UseTokenizerTemplate=True, Messages=[pb.Message(role="user", content=content)], **fields
    )


def grpc_state(stub: Any) -> str:
    """The Status RPC's state name (UNINITIALIZED, BUSY, READY, ERROR)."""
    from runtime.proto import backend_pb2 as pb

    return pb.StatusResponse.State.Name(stub.Status(pb.HealthMessage(), timeout=10).state)


def wait_for_grpc_state(stub: Any, wanted: str, timeout: float = 30.0) -> str:
    """Poll Status until it says `wanted` or `timeout` seconds pass; returns the last state seen."""
    deadline = time.monotonic() + timeout
    state = grpc_state(stub)
    while state != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
        state = grpc_state(stub)
    return state


def rpc_error(call: Any) -> Any:
    """The grpc.RpcError that `call()` raises (a stream is read to its end first); AssertionError if none."""
    import grpc

    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded; an RpcError was expected")


def no_traceback(text: str) -> bool:
    """Whether a log is free of Python tracebacks."""
    return "Traceback (most recent call last)" not in text


def sigterm(process: _Process) -> None:
    """Ask the child to drain and exit."""
    process.signal(signal.SIGTERM)
