"""An OpenAI-compatible HTTP API on the same engines: FastAPI routes served by uvicorn.

    POST /v1/chat/completions   chat (streaming SSE or not): media parts, tools, reasoning_content, logprobs,
                                response_format, usage (with cached prompt tokens)
    POST /v1/completions        a raw prompt (no template)
    GET  /v1/models             the served models, with backend, context, media and reasoning capabilities
    GET  /health                200 while serving (503 while the first model loads at start)
    GET  /metrics               Prometheus text (runtime.metrics)

Bodies are OpenAI's (runtime.openai_request: one model shared with the stdio protocol, unknown fields
refused by name); every failure is OpenAI's error JSON with the status of its kind (runtime.faults). A client
that disconnects has its generation cancelled within one step. A bearer API key, when set, is required on
everything but /health; CORS is off unless origins are given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.async_bridge import handle_events, run_blocking
from runtime.engine import RequestHandle
from runtime.errors import RequestTooLarge
from runtime.faults import FAULTS, classify
from runtime.http_guard import AccessRecord, BrowserGuard, is_json_content_type
from runtime.jsonvalue import load_json
from runtime.metrics import CONTENT_TYPE, ServerMetrics
from runtime.openai_request import ChatParams, CompleteParams, chat_request, complete_request, one_line
from runtime.openai_response import logprobs_json, tool_calls_json, usage_json
from runtime.pool import ModelPool, Served
from runtime.prompt import accepted_media
from runtime.request import Answer, Completion, Event, GenerationRequest

log = logging.getLogger("runtime")

API_KEY_ENV = "GALLERY_API_KEY"
DEFAULT_MAX_BODY_MB = 64
_RETRY_AFTER = {"busy": "1", "not_loaded": "5", "shutting_down": "10", "hub_unavailable": "10"}


class HttpError(Exception):
    """A failure to answer with OpenAI's error JSON: the fault kind, the message and the request field at fault."""

    def __init__(self, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param


def error_response(kind: str, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape with the HTTP status of the fault kind (Retry-After where retrying helps)."""
    fault = FAULTS[kind]
    headers = {"Retry-After": _RETRY_AFTER[kind]} if kind in _RETRY_AFTER else None
    body = {"error": {"message": message, "type": fault.openai_type, "param": param, "code": kind}}
    return JSONResponse(body, status_code=fault.http_status, headers=headers)


def _as_http_error(exc: BaseException) -> HttpError:
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        return HttpError(
            "invalid_request",
            f"invalid request: {one_line(exc)}",
            ".".join(str(part) for part in first) or None,
        )
    kind, message = classify(exc)
    if kind == "internal":
        log.error("%s", message)
    return HttpError(kind, message, getattr(exc, "field", None))


class _Context:
    """What the routes share: the pool, metrics, an executor for blocking work, and the limits."""

    def __init__(
        self,
        pool: ModelPool,
        metrics: ServerMetrics,
        *,
        api_key: str | None,
        max_body: int,
        guard: BrowserGuard | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body
        self.guard = guard or BrowserGuard.make("127.0.0.1", keyless=api_key is None)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="http")
        self.ready = asyncio.Event()
        self.startup_error: str | None = None

    def authorized(self, request: Request) -> bool:
        """Exactly one `Authorization: Bearer <key>` header with the right key (constant-time compare)."""
        if self.api_key is None:
            return True
        values = request.headers.getlist("authorization")
        if len(values) != 1:
            return False
        scheme, _, credential = values[0].strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), self.api_key)

    async def body(self, request: Request) -> Any:
        """The JSON body, read with a size cap (413 past it)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise RequestTooLarge(
                f"request body is {declared} bytes, over this server's limit of {self.max_body}"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise RequestTooLarge(f"request body is over this server's limit of {self.max_body} bytes")
            chunks.append(chunk)
        try:
            data = load_json(b"".join(chunks))  # a too-long integer is refused by its field's name later
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            raise HttpError("invalid_request", f"the request body is not valid JSON ({detail})") from None
        if not isinstance(data, dict):
            raise HttpError("invalid_request", "the request body must be a JSON object")
        return data

    async def submit(self, served: Served, generation: GenerationRequest) -> RequestHandle:
        """Prepare and queue a request on the served model's engine (blocking work off the event loop)."""
        return await run_blocking(self.executor, served.host.submit, generation)


def _watch_disconnect(request: Request, handle: RequestHandle) -> asyncio.Task[None]:
    """Cancel the generation when the client goes away (a non-streaming request sees no write fail)."""

    async def watch() -> None:
        while not handle.finished.is_set():
            if await request.is_disconnected():
                handle.cancel()
                return
            await asyncio.sleep(0.1)

    return asyncio.create_task(watch())


async def _whole(request: Request, handle: RequestHandle) -> Completion:
    answer = Answer()
    watcher = _watch_disconnect(request, handle)
    try:
        async for event in handle_events(handle):
            answer.add(event)
    finally:
        watcher.cancel()
        handle.cancel()  # no-op when finished
    done = answer.completion()
    if done.error:
        raise HttpError("generation_failed", done.error)
    return done


def _chunk(
    kind: str,
    rid: str,
    created: int,
    model: str,
    choice: dict[str, Any] | None,
    usage: dict[str, Any] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "id": rid,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice] if choice is not None else [],
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, ensure_ascii=False, allow_nan=False).encode() + b"\n\n"


def _chat_message(done: Completion) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": done.content}
    if done.reasoning:
        message["reasoning_content"] = done.reasoning
    if done.tool_calls:
        message["tool_calls"] = tool_calls_json(done.tool_calls)
        if not done.content:
            message["content"] = None
    return message


def _completion_logprobs(done: Completion) -> dict[str, Any] | None:
    """The legacy completions API's logprobs object."""
    if not done.logprobs:
        return None
    offsets, offset = [], 0
    for item in done.logprobs:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [item.token for item in done.logprobs],
        "token_logprobs": [item.logprob for item in done.logprobs],
        "top_logprobs": [{text: lp for text, _id, lp in item.top} for item in done.logprobs],
        "text_offset": offsets,
    }


def _public_name(name: str) -> bool:
    """Whether a model name may be shown to clients: a name or repo id, never a filesystem path."""
    return not (
        name.startswith(("/", "./", "../", "~", "\\"))
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
        or name.count("/") > 1
    )


def _model_card(served: Served) -> dict[str, Any]:
    """OpenAI's model object, with what this runtime knows about the model (no filesystem path)."""
    config = served.config
    engine = served.engine
    source = config.mlx.source
    repo = source.repo if source.repo and _public_name(source.repo) else None
    return {
        "id": config.name,
        "object": "model",
        "created": 0,
        "owned_by": "mlx-gallery",
        "backend": config.backend,
        "context_length": config.context_size,
        "input_modalities": ["text", *sorted(accepted_media(config))],
        "reasoning": config.mlx.reasoning.supported,
        "tool_format": config.mlx.tool_calls.format,
        "source": {"repo": repo, "revision": source.revision if repo else None},
        "aliases": sorted(
            name for name in served.display_names if name != config.name and _public_name(name)
        ),
        "loaded": engine is not None and engine.ready,
    }


def _metrics_route(request: Request) -> str:
    """The route template a request matched (never the raw path: label values stay bounded)."""
    route = request.scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) else "other"


def _refusal(context: _Context, request: Request) -> Response | None:
    """The answer for a request refused before any route runs (browser boundary, key, content type)."""
    guard = context.guard
    why = guard.host_refusal(request.headers.get("host")) or guard.origin_refusal(
        request.headers.get("origin")
    )
    if why:
        return error_response("forbidden", why)
    if request.method == "OPTIONS":
        return None
    if request.url.path != "/health" and not context.authorized(request):
        return error_response(
            "unauthenticated",
            "missing or invalid API key (send exactly one 'Authorization: Bearer <key>' header)",
        )
    if request.method == "POST" and not is_json_content_type(request.headers.get("content-type")):
        return error_response(
            "unsupported_media_type",
            f"this endpoint takes a JSON body: send 'Content-Type: application/json' "
            f"(got {request.headers.get('content-type') or 'none'!r})",
        )
    return None


def _logged(response: Response, record: AccessRecord) -> Response:
    """Write the access line when the response is complete (a stream: when its last byte is sent)."""
    if not isinstance(response, StreamingResponse) and not hasattr(response, "body_iterator"):
        record.write(response.status_code)
        return response
    body = response.body_iterator
    status = response.status_code

    async def logging_body() -> AsyncIterator[Any]:
        try:
            async for chunk in body:
                yield chunk
        finally:
            record.write(status)

    response.body_iterator = logging_body()
    return response


def create_app(context: _Context, *, cors_origins: list[str]) -> FastAPI:
    """The FastAPI application (routes, auth, browser boundary, CORS, errors, access log) over a model pool."""
    app = FastAPI(title="mlx-gallery", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        record = AccessRecord(request.method, request.url.path)
        request.state.access = record
        response = _refusal(context, request)
        if response is None:
            try:
                response = await call_next(request)
            except Exception as exc:  # an error outside a route: still one JSON line, never a traceback
                error = _as_http_error(exc)
                response = error_response(error.kind, error.message, error.param)
        context.metrics.http.labels(_metrics_route(request), str(response.status_code)).inc()
        return _logged(response, record)

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Added after the guard, so it wraps it: refusals (401, 403) carry CORS headers a browser app can read.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"],
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(
                "unknown_endpoint", f"no such endpoint: {request.method} {request.url.path}"
            )
        if exc.status_code == 405:
            return error_response("method_not_allowed", f"{request.url.path} does not take {request.method}")
        return error_response("invalid_request", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())) or None
        return error_response(
            "invalid_request", f"invalid request: {where}: {first.get('msg', 'invalid')}", where
        )

    async def routed(handler: Callable[[], Awaitable[Response]]) -> Response:
        try:
            return await handler()
        except Exception as exc:
            error = _as_http_error(exc)
            if error.kind not in ("internal", "generation_failed"):
                log.info("refused (%d): %s", FAULTS[error.kind].http_status, error.message)
            return error_response(error.kind, error.message, error.param)

    @app.get("/health")
    async def health(request: Request) -> Response:
        if context.startup_error:
            return JSONResponse({"status": "error", "error": context.startup_error}, status_code=503)
        if not context.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        cluster = context.pool.cluster
        if cluster is not None and cluster.failure is not None:
            return JSONResponse({"status": "error", "error": cluster.failure}, status_code=503)
        body: dict[str, Any] = {"status": "ok"}
        if context.authorized(request):
            body["models"] = {
                s.config.name: ("loaded" if s.engine is not None and s.engine.ready else "not loaded")
                for s in context.pool.served
            }
        return JSONResponse(body)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(s) for s in context.pool.served]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        async def run() -> Response:
            return JSONResponse(_model_card(context.pool.lookup(model_id)))

        return await routed(run)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(context.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        async def run() -> Response:
            params = ChatParams.model_validate(await context.body(request))
            served, _engine = await context.pool.engine(params.model)
            record: AccessRecord = request.state.access
            record.model = served.config.name
            handle = await context.submit(served, chat_request(params))
            rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), served.config.name
            if params.stream:
                usage = params.stream_options is not None and params.stream_options.include_usage
                return StreamingResponse(
                    _chat_stream(handle, rid, created, model, usage, record),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            done = await _whole(request, handle)
            record.prompt_tokens, record.completion_tokens = (
                done.usage.prompt_tokens,
                done.usage.completion_tokens,
            )
            choice = {
                "index": 0,
                "message": _chat_message(done),
                "finish_reason": done.finish_reason,
                "logprobs": logprobs_json(done.logprobs) if done.logprobs else None,
            }
            body = {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage_json(done.usage),
                "system_fingerprint": served.config.mlx.source.revision,
            }
            if done.seed is not None:
                body["seed"] = done.seed
            return JSONResponse(body)

        return await routed(run)

    @app.post("/v1/completions")
    async def complete(request: Request) -> Response:
        async def run() -> Response:
            params = CompleteParams.model_validate(await context.body(request))
            served, _engine = await context.pool.engine(params.model)
            record: AccessRecord = request.state.access
            record.model = served.config.name
            handle = await context.submit(served, complete_request(params))
            rid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), served.config.name
            if params.stream:
                usage = params.stream_options is not None and params.stream_options.include_usage
                return StreamingResponse(
                    _completion_stream(handle, rid, created, model, usage, record),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            done = await _whole(request, handle)
            record.prompt_tokens, record.completion_tokens = (
                done.usage.prompt_tokens,
                done.usage.completion_tokens,
            )
            choice = {
                "index": 0,
                "text": done.content,
                "finish_reason": done.finish_reason,
                "logprobs": _completion_logprobs(done),
            }
            return JSONResponse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage_json(done.usage),
                }
            )

        return await routed(run)

    return app


async def _events(handle: RequestHandle) -> AsyncIterator[Event]:
    """The handle's events; closing the stream (client gone) cancels the generation."""
    try:
        async for event in handle_events(handle):
            yield event
    finally:
        handle.cancel()


def _stream_error(event: Event) -> bytes:
    body = {
        "error": {"message": event.error, "type": "server_error", "param": None, "code": "generation_failed"}
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _chat_stream(
    handle: RequestHandle, rid: str, created: int, model: str, include_usage: bool, record: AccessRecord
) -> AsyncIterator[bytes]:
    kind = "chat.completion.chunk"
    yield _chunk(
        kind,
        rid,
        created,
        model,
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
    )
    calls = 0
    async for event in _events(handle):
        if event.done and event.usage is not None:
            record.prompt_tokens, record.completion_tokens = (
                event.usage.prompt_tokens,
                event.usage.completion_tokens,
            )
        delta: dict[str, Any] = {}
        if event.content:
            delta["content"] = event.content
        if event.reasoning:
            delta["reasoning_content"] = event.reasoning
        if event.tool_calls:
            # Calls are complete when they arrive (parsed from the whole call markup): one delta per call,
            # with its index, id, name and all of its arguments, which OpenAI's clients accumulate as usual.
            delta["tool_calls"] = [
                {**call, "index": calls + i} for i, call in enumerate(tool_calls_json(event.tool_calls))
            ]
            calls += len(event.tool_calls)
        logprobs = logprobs_json(event.logprobs) if event.logprobs else None
        if delta or logprobs:
            yield _chunk(
                kind,
                rid,
                created,
                model,
                {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None},
            )
        if event.done:
            if event.error and event.finish_reason != "cancelled":
                yield _stream_error(event)
            else:
                yield _chunk(
                    kind,
                    rid,
                    created,
                    model,
                    {"index": 0, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason},
                )
                if include_usage:
                    yield _chunk(kind, rid, created, model, None, usage_json(event.usage))
    yield b"data: [DONE]\n\n"


async def _completion_stream(
    handle: RequestHandle, rid: str, created: int, model: str, include_usage: bool, record: AccessRecord
) -> AsyncIterator[bytes]:
    kind = "text_completion"
    async for event in _events(handle):
        if event.done and event.usage is not None:
            record.prompt_tokens, record.completion_tokens = (
                event.usage.prompt_tokens,
                event.usage.completion_tokens,
            )
        text = event.content
        if text or (event.done and not event.error):
            yield _chunk(
                kind,
                rid,
                created,
                model,
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": event.finish_reason if event.done else None,
                },
            )
        if event.done:
            if event.error and event.finish_reason != "cancelled":
                yield _stream_error(event)
            elif include_usage:
                yield _chunk(kind, rid, created, model, None, usage_json(event.usage))
    yield b"data: [DONE]\n\n"


def _listen(address: str) -> Any:
    """A listening socket on HOST:PORT (port 0: a free one), never shared with another process."""
    import socket

    from runtime.bind import split_address

    host, port = split_address(address, "--http")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        from gallery.errors import RuntimeFailure

        raise RuntimeFailure(f"cannot listen on {address}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


async def serve(
    address: str,
    pool: ModelPool,
    *,
    api_key: str | None,
    cors_origins: list[str],
    grace: float,
    max_body_mb: int = DEFAULT_MAX_BODY_MB,
    parent_pid: int | None = None,
    allowed_hosts: list[str] | None = None,
    quiet: bool = False,
) -> int:
    """Serve the OpenAI API until a signal or the parent's death; returns the exit code.

    The first served model loads in the background (/health says 503 "loading" meanwhile); SIGTERM lets
    in-flight requests finish within the grace period (uvicorn's graceful shutdown), then cancels the rest.
    """
    import uvicorn

    from runtime.lifecycle import StopSignal, cancel_task, install_signal_handlers, settle, watch_parent

    metrics = ServerMetrics(pool.statuses)
    pool.on_engine = lambda name, engine: engine.listeners.append(metrics.listener(name))
    sock = _listen(address)
    host, port = sock.getsockname()[:2]
    guard = BrowserGuard.make(
        str(host), keyless=api_key is None, hosts=allowed_hosts or [], origins=cors_origins
    )
    context = _Context(
        pool, metrics, api_key=api_key, max_body=max(1, max_body_mb) * 1024 * 1024, guard=guard
    )
    app = create_app(context, cors_origins=cors_origins)
    if quiet:
        logging.getLogger("runtime.access").setLevel(logging.WARNING)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=max(int(grace), 1),
        ws="none",
    )
    server = uvicorn.Server(config)
    stop = StopSignal()
    install_signal_handlers(stop)  # uvicorn takes the signals while it serves, then hands them back here
    log.info(
        "listening on http://%s:%d (pid %d)%s",
        host,
        port,
        __import__("os").getpid(),
        ", API key required" if api_key else "",
    )

    def quit_now(reason: str) -> None:
        stop.request("cancel", reason)
        server.should_exit = True

    watcher = asyncio.create_task(
        watch_parent(lambda: quit_now("parent process died"), parent_pid=parent_pid)
    )
    exit_code = 0

    async def preload() -> None:
        nonlocal exit_code
        try:
            if pool.served:
                await pool.engine(pool.served[0].config.name)
            context.ready.set()
        except Exception as exc:
            from gallery.errors import GalleryError

            context.startup_error = str(exc)
            log.error("could not load %s: %s", pool.served[0].spec, exc)
            exit_code = exc.exit_code if isinstance(exc, GalleryError) else 1
            server.should_exit = True

    loading = asyncio.create_task(preload())
    try:
        await server.serve(sockets=[sock])
    finally:
        cancel_task(loading)
        await settle(loading)
        cancel_task(watcher)
        await settle(watcher)
        await asyncio.get_running_loop().run_in_executor(None, pool.close)
        context.executor.shutdown(wait=False, cancel_futures=True)
        sock.close()
    log.info("stopped (%s)", stop.reason or "server exit")
    return exit_code or stop.exit_code
