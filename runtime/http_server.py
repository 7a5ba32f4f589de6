"""An OpenAI-compatible HTTP API on the same engines: FastAPI routes served by uvicorn.

    POST /v1/chat/completions   chat (streaming SSE or not): media parts, tools, reasoning_content, logprobs,
                                response_format, usage (with cached prompt tokens)
    POST /v1/completions        a raw prompt (no template)
    POST /v1/responses …        OpenAI's Responses API (runtime.responses_api)
    POST /v1/messages …         Anthropic's Messages API (runtime.anthropic_api)
    /api/*, GET /               Ollama's API (runtime.ollama_api)
    GET  /v1/models             the served models, with backend, context, media and reasoning capabilities
    GET  /health                200 while serving (503 while the first model loads at start)
    GET  /metrics               Prometheus text (runtime.metrics)
    POST /v1/models/unload      unload a served model ({"model": NAME}); it loads again on its next request

Bodies are OpenAI's (runtime.openai_request: one model shared with the stdio protocol, unknown fields
refused by name); every failure is OpenAI's error JSON with the status of its kind (runtime.faults), or the
error shape of the API a path belongs to (Anthropic's, Ollama's: each API module maps the same fault kinds).
A client that disconnects has its generation cancelled within one step. A bearer API key, when set, is
required on everything but /health (Anthropic's paths also take it as `x-api-key`); CORS is off unless
origins are given.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from backends import device_info
from gallery.errors import RequestError
from runtime.async_bridge import handle_events, run_blocking
from runtime.engine import RequestHandle
from runtime.errors import RequestTooLarge
from runtime.faults import FAULTS, classify
from runtime.http_conn import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS, protocol_class
from runtime.http_guard import AccessRecord, BodyError, BrowserGuard, is_json_content_type, parse_json_body
from runtime.metrics import CONTENT_TYPE, ServerMetrics
from runtime.openai_request import one_line
from runtime.pool import ModelPool, Served
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


ErrorShape = Callable[[str, str, str | None], Response]
# Paths whose errors take another API's shape (filled by create_app from the API modules): prefix -> mapper.
_ERROR_SHAPES: list[tuple[str, ErrorShape]] = []


def error_for(path: str, kind: str, message: str, param: str | None = None) -> Response:
    """The error response for a fault on this path, in the shape of the API the path belongs to."""
    for prefix, shape in _ERROR_SHAPES:
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            return shape(kind, message, param)
    return error_response(kind, message, param)


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
        self.device: dict[str, str] = {}  # what MLX computes on (backends.device_info), once known

    def authorized(self, request: Request) -> bool:
        """Exactly one `Authorization: Bearer <key>` header with the right key (constant-time compare).

        Anthropic's paths (/v1/messages…) take the key as `x-api-key` too (the anthropic SDK sends that; other
        Anthropic-compatible clients send a bearer token): exactly one credential, either way.
        """
        if self.api_key is None:
            return True
        values = request.headers.getlist("authorization")
        keys = request.headers.getlist("x-api-key") if request.url.path.startswith("/v1/messages") else []
        if len(values) + len(keys) != 1:
            return False
        if keys:
            return hmac.compare_digest(keys[0].strip().encode(), self.api_key)
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
            # Parsing a large body takes a while: off the event loop, with its structure bounded first.
            data = await run_blocking(self.executor, parse_json_body, b"".join(chunks))
        except BodyError as exc:
            raise HttpError("invalid_request", str(exc)) from None
        if not isinstance(data, dict):
            raise HttpError("invalid_request", "the request body must be a JSON object")
        return data

    async def submit(self, served: Served, generation: GenerationRequest) -> RequestHandle:
        """Prepare and queue a request on the served model's engine (blocking work off the event loop)."""
        return await run_blocking(self.executor, served.host.submit, generation)

    async def start(
        self, request: Request, model: str | None, build: Callable[[Served], GenerationRequest]
    ) -> tuple[Served, GenerationRequest, RequestHandle]:
        """Route a request to its model and queue it there, holding the model against eviction until queued
        (every API's routes start requests here). `build` makes the request for the served model."""
        async with self.pool.lease(model) as (served, _engine):
            record: AccessRecord = request.state.access
            record.model = served.config.name
            generation = build(served)
            return served, generation, await self.submit(served, generation)


async def run_route(handler: Callable[[], Awaitable[Response]], shape: ErrorShape) -> Response:
    """Run a route's body; any failure becomes one error response in the API's shape (never a traceback)."""
    try:
        return await handler()
    except Exception as exc:
        error = _as_http_error(exc)
        if error.kind not in ("internal", "generation_failed"):
            log.info("refused (%d): %s", FAULTS[error.kind].http_status, error.message)
        return shape(error.kind, error.message, error.param)


def _watch_disconnect(request: Request, handle: RequestHandle) -> asyncio.Task[None]:
    """Cancel the generation when the client goes away (a non-streaming request sees no write fail)."""

    async def watch() -> None:
        while not handle.finished.is_set():
            if await request.is_disconnected():
                handle.cancel()
                return
            await asyncio.sleep(0.1)

    return asyncio.create_task(watch())


async def whole_answer(request: Request, handle: RequestHandle) -> Completion:
    """The whole answer of a queued request (cancelled if the client goes away). Raises HttpError."""
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
        raise HttpError(done.fault or "generation_failed", done.error)
    return done


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
    path = request.url.path
    if why:
        return error_for(path, "forbidden", why)
    if request.method == "OPTIONS":
        return None
    if path != "/health" and not context.authorized(request):
        return error_for(
            path,
            "unauthenticated",
            "missing or invalid API key (send exactly one 'Authorization: Bearer <key>' header"
            + (" or 'x-api-key: <key>'" if path.startswith("/v1/messages") else "")
            + ")",
        )
    if request.method == "POST" and not is_json_content_type(request.headers.get("content-type")):
        return error_for(
            path,
            "unsupported_media_type",
            f"this endpoint takes a JSON body: send 'Content-Type: application/json' "
            f"(got {request.headers.get('content-type') or 'none'!r})",
        )
    return None


class _Guard:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which hides client disconnects from the routes): the
    browser boundary, the key and the content type before any route runs; metrics by route template and one
    access-log line when the response is complete (a stream: when its last byte is sent)."""

    def __init__(self, app: Any, context: _Context) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        record = AccessRecord(request.method, request.url.path)
        scope.setdefault("state", {})["access"] = record
        status = 500
        started = False

        async def tracked_send(message: Any) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            refusal = _refusal(self.context, request)
            if refusal is not None:
                await refusal(scope, receive, tracked_send)
            else:
                try:
                    await self.app(scope, receive, tracked_send)
                except Exception as exc:  # an error outside a route: still one JSON line, never a traceback
                    if started:
                        raise
                    error = _as_http_error(exc)
                    failure = error_for(request.url.path, error.kind, error.message, error.param)
                    await failure(scope, receive, tracked_send)
        finally:
            self.context.metrics.http.labels(_metrics_route(request), str(status)).inc()
            record.write(status)


def create_app(context: _Context, *, cors_origins: list[str]) -> FastAPI:
    """The FastAPI application (routes, auth, browser boundary, CORS, errors, access log) over a model pool."""
    app = FastAPI(title="mlx-gallery", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, context=context)

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
        path = request.url.path
        if exc.status_code == 404:
            return error_for(path, "unknown_endpoint", f"no such endpoint: {request.method} {path}")
        if exc.status_code == 405:
            return error_for(path, "method_not_allowed", f"{path} does not take {request.method}")
        return error_for(path, "invalid_request", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())) or None
        return error_for(
            request.url.path,
            "invalid_request",
            f"invalid request: {where}: {first.get('msg', 'invalid')}",
            where,
        )

    # The other APIs' routers (imported here: their modules use this module's helpers).
    from runtime import anthropic_api, ollama_api, openai_api, responses_api

    _ERROR_SHAPES[:] = [
        ("/v1/messages", anthropic_api.error_response),
        ("/api", ollama_api.error_response),
    ]
    app.include_router(openai_api.router(context))
    app.include_router(responses_api.router(context))
    app.include_router(anthropic_api.router(context))
    app.include_router(ollama_api.router(context))

    async def routed(handler: Callable[[], Awaitable[Response]]) -> Response:
        return await run_route(handler, error_response)

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
            body["device"] = context.device
            body["models"] = {
                s.config.name: ("loaded" if s.engine is not None and s.engine.ready else "not loaded")
                for s in context.pool.served
            }
            body["loaded"] = context.pool.loaded_models()  # memory per loaded model (`gallery ps`)
        return JSONResponse(body)

    @app.post("/v1/models/unload")
    async def unload(request: Request) -> Response:
        async def run() -> Response:
            body = await context.body(request)
            name = body.get("model") if isinstance(body, dict) else None
            if not isinstance(name, str) or not name:
                raise RequestError('unload: give the model to unload as {"model": NAME}')
            return JSONResponse({"unloaded": await context.pool.unload(name)})

        return await routed(run)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(context.metrics.render(), media_type=CONTENT_TYPE)

    return app


async def stream_events(handle: RequestHandle) -> AsyncIterator[Event]:
    """The handle's events; closing the stream (client gone) cancels the generation."""
    try:
        async for event in handle_events(handle):
            yield event
    finally:
        handle.cancel()


def _listen(address: str) -> Any:
    """A listening socket on HOST:PORT (port 0: a free one), never shared with another process."""
    import socket

    from runtime.bind import split_address

    host, port = split_address(address, "--http")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(4096)
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
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ollama_addr: str | None = None,
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
    # The same app on a second address (Ollama's port): a client that assumes localhost:11434 works untouched.
    sockets = [sock, *([_listen(ollama_addr)] if ollama_addr else [])]
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
        http=protocol_class(header_timeout, max_connections),
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
    if ollama_addr:
        extra_host, extra_port = sockets[1].getsockname()[:2]
        log.info("Ollama's API also on http://%s:%d", extra_host, extra_port)

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
            context.device = await asyncio.get_running_loop().run_in_executor(None, device_info)
            metrics.set_device(context.device)
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
        await server.serve(sockets=sockets)
    finally:
        cancel_task(loading)
        await settle(loading)
        cancel_task(watcher)
        await settle(watcher)
        await asyncio.get_running_loop().run_in_executor(None, pool.close)
        context.executor.shutdown(wait=False, cancel_futures=True)
        for listening in sockets:
            listening.close()
    log.info("stopped (%s)", stop.reason or "server exit")
    return exit_code or stop.exit_code
