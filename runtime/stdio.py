"""`python -m runtime --stdio`: newline-delimited JSON-RPC 2.0 on stdin/stdout.

One JSON object per line in, one per line out. Requests run concurrently on one event loop (a chat in
progress never blocks `status` or `cancel`); every request with an id gets exactly one response, a
notification (no id) gets none; a line that is not a valid request gets an error response and the
loop goes on. Streaming methods send `chat.delta` / `complete.delta` notifications carrying the
request id before the one final response.

stdout carries the protocol and nothing else: at start the process moves its real stdout to a private
descriptor and points file descriptor 1 at stderr, so a stray print — from this code, a library or C
code — cannot corrupt the stream. All writes go through one writer thread, so lines never interleave
and a slow reader never stalls the event loop.

End of input drains: in-flight requests finish (within the grace period) and their responses are
written before the process exits 0. See runtime.lifecycle for signals and parent death.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from gallery.errors import RequestError
from runtime.async_bridge import handle_events
from runtime.engine import RequestHandle
from runtime.errors import NotLoaded, ShuttingDown
from runtime.faults import FAULTS, classify
from runtime.host import ModelHost, model_metadata, prompt_text
from runtime.jsonvalue import load_json, text_size
from runtime.lifecycle import StopSignal, cancel_task, install_signal_handlers, settle, watch_parent
from runtime.openai_request import (
    ChatParams,
    CompleteParams,
    DetokenizeParams,
    LoadParams,
    TokenizeParams,
    chat_request,
    complete_request,
    one_line,
)
from runtime.openai_response import logprobs_json, timings_json, tool_calls_json, usage_json
from runtime.request import Answer, Completion, GenerationRequest, check_request
from runtime.stdio_lines import LineReader, LineWriter

log = logging.getLogger("runtime")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
DEFAULT_MAX_LINE_MB = 64
_GENERATION_METHODS = frozenset({"chat", "complete"})


@dataclasses.dataclass
class InFlight:
    """A request being served: its task, and its engine handle once queued."""

    method: str
    task: asyncio.Task[None] | None = None
    handle: RequestHandle | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Cancel the generation (or mark it, when it is not queued yet)."""
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()


class RpcError(Exception):
    """An error response: JSON-RPC code, one-line message, optional data."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


def _rpc_error_for(exc: BaseException) -> RpcError:
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        invalid: dict[str, Any] = {"kind": "invalid_request"}
        if first:
            invalid["field"] = ".".join(str(part) for part in first)
        return RpcError(INVALID_PARAMS, f"invalid params: {one_line(exc)}", invalid)
    kind, message = classify(exc)
    if kind == "internal":
        log.error("%s", message, exc_info=os.environ.get("GALLERY_DEBUG") == "1")
    data: dict[str, Any] = {"kind": kind}
    field = getattr(exc, "field", None)
    if isinstance(field, str):
        data["field"] = field  # the request field at fault, as HTTP's `param`
    return RpcError(FAULTS[kind].jsonrpc_code or INTERNAL_ERROR, message, data)


class StdioServer:
    """The JSON-RPC loop over one ModelHost."""

    def __init__(
        self,
        host: ModelHost,
        *,
        out_fd: int,
        in_stream: Any,
        grace: float = 30.0,
        max_line_bytes: int = DEFAULT_MAX_LINE_MB * 1024 * 1024,
        parent_pid: int | None = None,
    ) -> None:
        self.host = host
        self.grace = grace
        self.max_line_bytes = max_line_bytes
        self.parent_pid = parent_pid
        self._in = in_stream
        self._out_fd = out_fd
        self._inflight: dict[str, InFlight] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="stdio")
        self.stop = StopSignal()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.writer: LineWriter | None = None
        self._methods: dict[str, Callable[[Any, Any, InFlight], Awaitable[Any]]] = {
            "load": self._load,
            "free": self._free,
            "chat": self._chat,
            "complete": self._complete,
            "tokenize": self._tokenize,
            "detokenize": self._detokenize,
        }
        # Answered on the spot, in input order: never queued behind work, and a line after `shutdown`
        # deterministically sees the runtime shutting down.
        self._inline: dict[str, Callable[[Any], Any]] = {
            "status": self._status,
            "metadata": self._metadata,
            "cancel": self._cancel,
            "shutdown": self._shutdown,
        }

    # ----- plumbing -----
    def _send(self, message: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.send(message)

    def _respond(self, request_id: Any, result: Any = None, error: RpcError | None = None) -> None:
        if error is None:
            try:
                self._send({"jsonrpc": "2.0", "id": request_id, "result": result})
                return
            except (TypeError, ValueError) as exc:  # a result JSON cannot carry: still exactly one response
                log.error("cannot encode the result of request %r: %s", request_id, exc)
                error = RpcError(
                    INTERNAL_ERROR, f"internal error: the result cannot be encoded as JSON ({exc})"
                )
        body: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.data is not None:
            body["data"] = error.data
        self._send({"jsonrpc": "2.0", "id": request_id, "error": body})

    def _post(self, callback: Callable[..., Any], *args: Any) -> bool:
        """Hand work to the event loop from another thread; False once the loop is gone."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: the process is exiting
            return False
        return True

    def _read_lines(self) -> None:
        """Reader thread: hand each line (or an oversize marker) to the loop; then signal end of input."""
        while True:
            try:
                line = self._in.readline(self.max_line_bytes + 1)
            except (OSError, ValueError):
                line = b""
            if not line:
                break
            if len(line) > self.max_line_bytes and not line.endswith(b"\n"):
                while True:  # skip the rest of the oversized line, then go on with the next one
                    rest = self._in.readline(1024 * 1024)
                    if not rest or rest.endswith(b"\n"):
                        break
                if not self._post(self._on_oversized):
                    return
                continue
            if not self._post(self._on_line, line):
                return
        self._post(self.stop.request, "drain", "end of input")

    def _on_oversized(self) -> None:
        self._respond(
            None,
            error=RpcError(
                INVALID_REQUEST,
                f"request line longer than {self.max_line_bytes} bytes (--max-line-mb); it was skipped",
            ),
        )

    def _on_broken_pipe(self) -> None:
        self._post(self.stop.request, "cancel", "stdout closed")

    # ----- dispatch -----
    def _on_line(self, raw: bytes) -> None:
        text = raw.strip()
        if not text:
            return
        try:
            message = load_json(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            self._respond(None, error=RpcError(PARSE_ERROR, f"parse error: {detail}"))
            return
        if isinstance(message, list):
            self._respond(
                None,
                error=RpcError(
                    INVALID_REQUEST, "batch requests are not supported: send one JSON object per line"
                ),
            )
            return
        if not isinstance(message, dict):
            self._respond(None, error=RpcError(INVALID_REQUEST, "a request must be a JSON object"))
            return
        has_id = "id" in message
        request_id = message.get("id")
        if has_id and (isinstance(request_id, bool) or not isinstance(request_id, (str, int, type(None)))):
            self._respond(None, error=RpcError(INVALID_REQUEST, "id must be a string, an integer or null"))
            return
        try:  # both are echoed back: a lone surrogate in them would make the reply invalid UTF-8
            for name in ("id", "method"):
                if isinstance(message.get(name), str):
                    text_size(message[name], name)
        except RequestError as exc:
            self._respond(
                None,
                error=RpcError(INVALID_REQUEST, str(exc), {"kind": "invalid_request", "field": exc.field}),
            )
            return
        method = message.get("method")
        problem = None
        if message.get("jsonrpc") != "2.0":
            problem = 'missing or wrong "jsonrpc" member: it must be "2.0"'
        elif not isinstance(method, str) or not method:
            problem = 'missing "method": a request needs a method name'
        if problem:
            if has_id or method is None:  # a broken request may well have meant to be a request: tell it
                self._respond(request_id, error=RpcError(INVALID_REQUEST, problem))
            return
        if "params" in message and not isinstance(message["params"], (dict, type(None))):
            if has_id:
                self._respond(
                    request_id,
                    error=RpcError(
                        INVALID_PARAMS,
                        "params must be an object (by-name parameters; by-position is not supported)",
                    ),
                )
            return
        assert isinstance(method, str)
        params = message.get("params") or {}
        inline = self._inline.get(method)
        if inline is not None:
            try:
                result = inline(params)
            except Exception as exc:
                if has_id:
                    self._respond(request_id, error=_rpc_error_for(exc))
            else:
                if has_id:
                    self._respond(request_id, result)
            return
        handler = self._methods.get(method)
        if handler is None:
            if has_id:
                known = ", ".join(sorted([*self._methods, *self._inline]))
                self._respond(
                    request_id, error=RpcError(METHOD_NOT_FOUND, f"unknown method {method!r}; known: {known}")
                )
            return
        if not has_id and method in _GENERATION_METHODS:
            log.warning("ignored a %s notification: send an id to get the answer", method)
            return
        if self.stop.mode is not None:
            if has_id:
                self._respond(request_id, error=_rpc_error_for(ShuttingDown("the runtime is shutting down")))
            return
        key = json.dumps(request_id) if has_id else None
        if key is not None and key in self._inflight:
            self._respond(
                request_id, error=RpcError(INVALID_REQUEST, f"request id {request_id!r} is already in flight")
            )
            return
        entry = InFlight(method)
        if key is not None:
            self._inflight[key] = entry
        task = asyncio.get_running_loop().create_task(
            self._serve(handler, params, request_id, has_id, key, entry)
        )
        entry.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self,
        handler: Callable[[Any, Any, InFlight], Awaitable[Any]],
        params: dict[str, Any],
        request_id: Any,
        has_id: bool,
        key: str | None,
        entry: InFlight,
    ) -> None:
        try:
            result = await handler(params, request_id, entry)
        except asyncio.CancelledError:
            if has_id:
                self._respond(
                    request_id,
                    error=RpcError(
                        FAULTS["shutting_down"].jsonrpc_code, "request abandoned: the runtime is stopping"
                    ),
                )
            raise
        except Exception as exc:
            if has_id:
                self._respond(request_id, error=_rpc_error_for(exc))
        else:
            if has_id:
                self._respond(request_id, result)
        finally:
            if key is not None:
                self._inflight.pop(key, None)

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ----- methods -----
    async def _load(self, params: Any, request_id: Any, entry: InFlight) -> dict[str, Any]:
        spec = LoadParams.model_validate(params)
        report = await self._blocking(
            lambda: self.host.load(spec.model, spec.options, model_path=spec.model_path)
        )
        return {
            "model": report.name,
            "backend": report.backend,
            "spec": report.spec,
            "reused": report.reused,
            "load_seconds": round(report.seconds, 3),
            "warnings": report.warnings,
            "unknown_options": report.unknown_options,
        }

    async def _free(self, params: Any, request_id: Any, entry: InFlight) -> dict[str, Any]:
        return {"freed": await self._blocking(self.host.free)}

    async def _generate(
        self,
        request: Any,
        identity: str | None,
        stream: bool,
        request_id: Any,
        entry: InFlight,
        notification: str,
    ) -> Completion:
        handle = await self._blocking(self.host.submit, request, identity)
        entry.handle = handle
        if entry.cancelled:
            handle.cancel()
        answer = Answer()
        try:
            async for event in handle_events(handle):
                answer.add(event)
                if stream and event.has_output:
                    delta: dict[str, Any] = {"id": request_id}
                    if event.content:
                        delta["content"] = event.content
                    if event.reasoning:
                        delta["reasoning_content"] = event.reasoning
                    if event.tool_calls:
                        delta["tool_calls"] = tool_calls_json(event.tool_calls)
                    if event.logprobs:
                        delta["logprobs"] = logprobs_json(event.logprobs)
                    self._send({"jsonrpc": "2.0", "method": notification, "params": delta})
        finally:
            handle.cancel()
        done = answer.completion()
        if done.error and done.finish_reason != "cancelled":
            kind = done.fault or "generation_failed"
            raise RpcError(
                FAULTS[kind].jsonrpc_code, done.error, {"kind": kind, "partial_content": done.content}
            )
        return done

    @staticmethod
    def _extras(done: Completion) -> dict[str, Any]:
        extras: dict[str, Any] = {
            "usage": usage_json(done.usage),
            "timings": timings_json(done.timings),
            "route": done.route,
        }
        if done.logprobs:
            extras["logprobs"] = logprobs_json(done.logprobs)
        if done.seed is not None:
            extras["seed"] = done.seed
        return extras

    async def _chat(self, params: Any, request_id: Any, entry: InFlight) -> dict[str, Any]:
        chat = ChatParams.model_validate(params)
        self.host.current()
        request = chat_request(chat)
        started = time.perf_counter()
        done = await self._generate(
            request, chat.model, chat.stream is not False, request_id, entry, "chat.delta"
        )
        log.info(
            "chat %s done: %s, %d tokens in %.2f s",
            json.dumps(request_id),
            done.finish_reason,
            done.usage.completion_tokens,
            time.perf_counter() - started,
        )
        message: dict[str, Any] = {"role": "assistant", "content": done.content}
        if done.reasoning:
            message["reasoning_content"] = done.reasoning
        if done.tool_calls:
            message["tool_calls"] = tool_calls_json(done.tool_calls)
        return {"message": message, "finish_reason": done.finish_reason, **self._extras(done)}

    async def _complete(self, params: Any, request_id: Any, entry: InFlight) -> dict[str, Any]:
        spec = CompleteParams.model_validate(params)
        self.host.current()
        request = complete_request(spec)
        done = await self._generate(
            request, spec.model, spec.stream is not False, request_id, entry, "complete.delta"
        )
        return {
            "text": done.content,
            "reasoning_content": done.reasoning or None,
            "finish_reason": done.finish_reason,
            **self._extras(done),
        }

    async def _tokenize(self, params: Any, request_id: Any, entry: InFlight) -> dict[str, Any]:
        spec = TokenizeParams.model_validate(params)
        engine = self.host.current()
        if (spec.text is None) == (spec.messages is None):
            raise RequestError("tokenize: send either text or messages")
        if spec.text is not None:
            text = spec.text
            check_request(GenerationRequest(prompt=text), engine.settings.limits)
        else:
            request = chat_request(
                ChatParams(
                    messages=spec.messages or [], tools=spec.tools, enable_thinking=spec.enable_thinking
                )
            )
            check_request(request, engine.settings.limits)
            text = await self._blocking(prompt_text, engine.config, request)
        tokens = await self._blocking(engine.tokenize, text)
        return {"tokens": tokens, "length": len(tokens)}

    async def _detokenize(self, params: Any, request_id: Any, entry: InFlight) -> dict[str, Any]:
        spec = DetokenizeParams.model_validate(params)
        engine = self.host.current()
        try:
            text = await self._blocking(engine.detokenize, spec.tokens)
        except (OverflowError, IndexError, ValueError, TypeError) as exc:
            raise RequestError(
                f"cannot detokenize these ids ({type(exc).__name__}: out of the vocabulary?)"
            ) from None
        return {"text": text}

    def _status(self, params: Any) -> dict[str, Any]:
        status = self.host.status()
        status["in_flight"] = sum(1 for item in self._inflight.values() if item.method in _GENERATION_METHODS)
        return status

    def _metadata(self, params: Any) -> dict[str, Any]:
        engine = self.host.engine
        if engine is None:
            raise NotLoaded("no model is loaded: call load first")
        return model_metadata(engine.config)

    def _cancel(self, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict) or "id" not in params:
            raise RpcError(INVALID_PARAMS, 'cancel needs params {"id": <id of the request to cancel>}')
        target = self._inflight.get(json.dumps(params["id"]))
        if target is None or target.method not in _GENERATION_METHODS:
            return {"cancelled": False, "reason": "no chat or complete request with that id is in flight"}
        target.cancel()
        return {"cancelled": True}

    def _shutdown(self, params: Any) -> dict[str, Any]:
        cancel = bool(params.get("cancel", False)) if isinstance(params, dict) else False
        pending = sum(1 for item in self._inflight.values() if item.method in _GENERATION_METHODS)
        self.stop.request("cancel" if cancel else "drain", "shutdown requested")
        return {"ok": True, "in_flight": pending, "mode": "cancel" if cancel else "drain"}

    # ----- the loop -----
    async def run(self) -> int:
        """Serve until shutdown, end of input, a signal or the parent's death; returns the exit code."""
        self._loop = asyncio.get_running_loop()
        self.writer = LineWriter(self._out_fd, self._on_broken_pipe)
        install_signal_handlers(self.stop)
        reader = threading.Thread(target=self._read_lines, name="stdio-reader", daemon=True)
        reader.start()
        watcher = asyncio.create_task(
            watch_parent(
                lambda: self.stop.request("cancel", "parent process died"), parent_pid=self.parent_pid
            )
        )
        await self.stop.requested.wait()
        await self._drain()
        cancel_task(watcher)
        await settle(watcher)
        await self._blocking(lambda: self.host.close(cancel=True))
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.writer.close()
        log.info("stopped (%s)", self.stop.reason)
        return self.stop.exit_code

    async def _drain(self) -> None:
        """Let in-flight work finish (drain) or cancel it, so each request still gets its one response."""
        # While draining, requests already accepted may still queue (new ones are refused at dispatch).
        self.host.draining = self.stop.mode == "cancel"
        if self.stop.mode == "drain":
            await self._wait_drained()
        self.host.draining = True
        for item in list(self._inflight.values()):
            item.cancel()
        pending = {task for task in self._tasks if not task.done()}
        if pending:  # cancelled generations answer within a decoding step; give them a moment to say so
            _, still = await asyncio.wait(pending, timeout=10.0)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=2.0)

    async def _wait_drained(self) -> None:
        """Wait for in-flight tasks until they are done, the grace period ends, or a second signal comes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        escalated = asyncio.create_task(self.stop.escalated.wait())
        try:
            while not escalated.done():
                pending = {task for task in self._tasks if not task.done()}
                remaining = deadline - loop.time()
                if not pending or remaining <= 0:
                    return
                await asyncio.wait(
                    {*pending, escalated}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            cancel_task(escalated)
            await settle(escalated)


def run_stdio(
    host: ModelHost,
    *,
    preload: Callable[[], Any] | None = None,
    grace: float = 30.0,
    max_line_mb: int = DEFAULT_MAX_LINE_MB,
    parent_pid: int | None = None,
) -> int:
    """Take over stdin/stdout for the protocol and serve; returns the exit code."""
    out_fd = os.dup(1)
    os.dup2(2, 1)  # fd 1 now goes to stderr: only the protocol writer reaches the real stdout
    sys.stdout = sys.stderr
    if preload is not None:
        preload()
    server = StdioServer(
        host,
        out_fd=out_fd,
        in_stream=LineReader(sys.stdin.fileno()),
        grace=grace,
        max_line_bytes=max(1, max_line_mb) * 1024 * 1024,
        parent_pid=parent_pid,
    )
    return asyncio.run(server.run())
