"""Ollama's API on the same engines: `/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`,
`/api/version`, and `GET /` (the heartbeat clients probe).

A translation, not a pipeline: Ollama's messages (with `images` as base64, `tool_calls` with argument
objects, `tool` turns with `tool_name`), `tools`, `format` (`"json"` or a JSON schema), `think`, and `options`
become one GenerationRequest; the engine's events become Ollama's answer, streamed as NDJSON by default
(`stream: false` for one object), reasoning in `thinking`, never in `content`.

`options` honoured: temperature, top_p, top_k, min_p, seed, num_predict, stop, repeat_penalty, repeat_last_n,
presence_penalty, frequency_penalty, and num_ctx up to the config's context (the window stays the config's).
Every other option (mirostat, tfs_z, typical_p, num_gpu, …) is refused by name. `keep_alive` is honoured:
`0` unloads the model once it is idle, a duration unloads it when idle that long after the request, a negative
value keeps it; a request without one leaves the server's own policy (loaded until another model needs room).
Errors are Ollama's shape: `{"error": "…"}` with the fault kind's HTTP status.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from gallery.errors import RequestError
from runtime.async_bridge import run_blocking
from runtime.faults import FAULTS
from runtime.http_guard import AccessRecord
from runtime.ollama_request import (
    ChatParams,
    GenerateParams,
    ShowParams,
    _Generation,
    chat_request,
    generate_request,
    keep_alive_seconds,
)
from runtime.pool import Served
from runtime.request import Completion, Event, GenerationRequest, Timings, Usage

# The Ollama API version this server speaks (clients gate features such as `think` on it).
OLLAMA_API_VERSION = "0.12.0"
_FOREVER = "9999-12-31T23:59:59Z"


def error_response(kind: str, message: str, param: str | None = None) -> JSONResponse:
    """Ollama's error shape, with the HTTP status of the fault kind (runtime.faults)."""
    return JSONResponse({"error": message}, status_code=FAULTS[kind].http_status)


# ----------------------------------------------------------------------------------------------- answers
def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _stats(usage: Usage | None, timings: Timings | None, started: float) -> dict[str, Any]:
    usage, timings = usage or Usage(), timings or Timings()
    return {
        "total_duration": _ns(time.perf_counter() - started),
        "load_duration": 0,
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": _ns(timings.prompt_s),
        "eval_count": usage.completion_tokens,
        "eval_duration": _ns(timings.generation_s),
    }


def _done_reason(finish: str | None) -> str:
    return "length" if finish == "length" else "stop"


def _calls(event: Event | Completion) -> list[dict[str, Any]]:
    calls = []
    for call in event.tool_calls:
        try:
            arguments = json.loads(call.arguments) if call.arguments else {}
        except json.JSONDecodeError:
            arguments = {"_raw": call.arguments}
        calls.append(
            {"id": call.id, "function": {"index": call.index, "name": call.name, "arguments": arguments}}
        )
    return calls


def _logprobs(event: Event | Completion) -> list[dict[str, Any]] | None:
    if not event.logprobs:
        return None
    return [
        {
            "token": item.token,
            "logprob": item.logprob,
            "top_logprobs": [{"token": text, "logprob": lp} for text, _id, lp in item.top],
        }
        for item in event.logprobs
    ]


def _piece(event: Event | Completion, chat: bool) -> dict[str, Any]:
    """The answer fields of one event (or the whole answer)."""
    body: dict[str, Any] = {}
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": event.content}
        if event.reasoning:
            message["thinking"] = event.reasoning
        if event.tool_calls:
            message["tool_calls"] = _calls(event)
        body["message"] = message
    else:
        body["response"] = event.content
        if event.reasoning:
            body["thinking"] = event.reasoning
    logprobs = _logprobs(event)
    if logprobs:
        body["logprobs"] = logprobs
    return body


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode() + b"\n"


def _details(config: Any) -> dict[str, Any]:
    quantization = config.mlx.quantization
    return {
        "parent_model": "",
        "format": "mlx",
        "family": config.mlx.model_type or "",
        "families": [config.mlx.model_type] if config.mlx.model_type else None,
        "parameter_size": "",
        "quantization_level": f"Q{quantization.bits}" if quantization and quantization.bits else "F16",
    }


def _capabilities(config: Any) -> list[str]:
    capabilities = ["completion"]
    if config.mlx.tool_calls.format:
        capabilities.append("tools")
    if config.mlx.reasoning.supported:
        capabilities.append("thinking")
    if config.mlx.media.image:
        capabilities.append("vision")
    return capabilities


def _size(config: Any) -> int:
    memory = config.mlx.memory
    return int(
        (memory.weights_bytes if memory and memory.weights_bytes else None) or config.mlx.total_size or 0
    )


def _tag(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _untag(name: str) -> str:
    return name[: -len(":latest")] if name.endswith(":latest") else name


class _Door:
    """What Ollama's routes share: the server's context and each model's keep_alive timer."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.expiry: dict[str, float | None] = {}  # model -> wall-clock unload time (None: never)
        self.timers: dict[str, asyncio.Task[None]] = {}

    async def unload_when_idle(self, served: Any, delay: float) -> None:
        """Unload the model after delay seconds once it is idle (a later keep_alive replaces this timer)."""
        await asyncio.sleep(max(delay, 0.0))
        while not served.idle:
            await asyncio.sleep(0.2)
        async with served.lock:
            if served.idle and served.engine is not None:
                await run_blocking(self.context.executor, served.host.free)
        self.expiry.pop(served.config.name, None)

    def keep_alive(self, served: Any, value: str | float | None) -> None:
        """Arm (or disarm) the model's unload timer for a request's keep_alive."""
        seconds = keep_alive_seconds(value)
        if seconds is None:
            return
        name = served.config.name
        previous = self.timers.pop(name, None)
        if previous is not None:
            previous.cancel()
        if seconds < 0:
            self.expiry[name] = None
            return
        self.expiry[name] = time.time() + seconds
        self.timers[name] = asyncio.get_running_loop().create_task(self.unload_when_idle(served, seconds))

    async def answer(self, request: Request, params: _Generation, chat: bool) -> Response:
        """One /api/chat or /api/generate request: load/unload requests, or an answer (NDJSON or whole)."""
        from runtime.http_server import whole_answer

        seconds = keep_alive_seconds(params.keep_alive)  # checked before anything loads
        served = await self.context.pool.find(_untag(params.model))
        record: AccessRecord = request.state.access
        record.model = served.config.name
        if isinstance(params, ChatParams):
            empty = not params.messages
        else:
            assert isinstance(params, GenerateParams)
            empty = not params.prompt and not params.images
        base = {"model": _tag(served.config.name)}
        if empty:  # Ollama's load / unload request: no prompt, only keep_alive
            if seconds == 0:
                if served.engine is not None:
                    async with served.lock:
                        await run_blocking(self.context.executor, served.host.free)
                self.expiry.pop(served.config.name, None)
                reason = "unload"
            else:
                await self.context.pool.engine(served.config.name)
                self.keep_alive(served, params.keep_alive)
                reason = "load"
            empty_piece = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            return JSONResponse(
                {**base, "created_at": _now(), **empty_piece, "done": True, "done_reason": reason}
            )

        def build(served: Served) -> GenerationRequest:
            if chat:
                assert isinstance(params, ChatParams)
                return chat_request(params, served.config)
            assert isinstance(params, GenerateParams)
            return generate_request(params, served.config)

        started = time.perf_counter()
        served, _generation, handle = await self.context.start(request, served.config.name, build)
        if params.stream:
            return StreamingResponse(
                self.stream(handle, base, chat, started, record, served, params.keep_alive),
                media_type="application/x-ndjson",
            )
        try:
            done = await whole_answer(request, handle)
        finally:
            self.keep_alive(served, params.keep_alive)
        record.count(done.usage)
        body = {
            **base,
            "created_at": _now(),
            **_piece(done, chat),
            "done": True,
            "done_reason": _done_reason(done.finish_reason),
            **_stats(done.usage, done.timings, started),
        }
        return JSONResponse(body)

    async def stream(
        self,
        handle: Any,
        base: dict[str, Any],
        chat: bool,
        started: float,
        record: AccessRecord,
        served: Any,
        alive: Any,
    ) -> AsyncIterator[bytes]:
        """An answer as Ollama's NDJSON lines."""
        from runtime.http_server import stream_events

        try:
            async for event in stream_events(handle):
                if event.has_output:
                    yield _line({**base, "created_at": _now(), **_piece(event, chat), "done": False})
                if not event.done:
                    continue
                record.count(event.usage)
                if event.error and event.finish_reason != "cancelled":
                    yield _line({"error": event.error})
                    return
                empty = Event()
                yield _line(
                    {
                        **base,
                        "created_at": _now(),
                        **_piece(empty, chat),
                        "done": True,
                        "done_reason": _done_reason(event.finish_reason),
                        **_stats(event.usage, event.timings, started),
                    }
                )
        finally:
            self.keep_alive(served, alive)


def router(context: Any) -> APIRouter:
    """Ollama's routes over the server's shared context (runtime.http_server._Context)."""
    from runtime.http_server import run_route

    api = APIRouter()
    door = _Door(context)

    @api.post("/api/chat")
    async def chat(request: Request) -> Response:
        async def run() -> Response:
            return await door.answer(request, ChatParams.model_validate(await context.body(request)), True)

        return await run_route(run, error_response)

    @api.post("/api/generate")
    async def generate(request: Request) -> Response:
        async def run() -> Response:
            return await door.answer(
                request, GenerateParams.model_validate(await context.body(request)), False
            )

        return await run_route(run, error_response)

    @api.api_route("/", methods=["GET", "HEAD"])
    async def heartbeat() -> Response:
        return PlainTextResponse("Ollama is running")

    @api.api_route("/api/version", methods=["GET", "HEAD"])
    async def version() -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION})

    @api.api_route("/api/tags", methods=["GET", "HEAD"])
    async def tags() -> Response:
        models = [
            {
                "name": _tag(s.config.name),
                "model": _tag(s.config.name),
                "modified_at": "1970-01-01T00:00:00Z",
                "size": _size(s.config),
                "digest": s.config.mlx.source.revision or "",
                "details": _details(s.config),
            }
            for s in context.pool.served
        ]
        return JSONResponse({"models": models})

    @api.get("/api/ps")
    async def ps() -> Response:
        models = []
        for served in context.pool.served:
            engine = served.engine
            if engine is None:
                continue
            memory = engine.status().get("memory", {})
            size = int(memory.get("mlx_active") or _size(served.config))
            until = door.expiry.get(served.config.name)
            models.append(
                {
                    "name": _tag(served.config.name),
                    "model": _tag(served.config.name),
                    "size": size,
                    "size_vram": size,  # MLX's unified memory: the accelerator's memory is the process's
                    "digest": served.config.mlx.source.revision or "",
                    "details": _details(served.config),
                    "expires_at": (
                        dt.datetime.fromtimestamp(until, dt.timezone.utc).isoformat().replace("+00:00", "Z")
                        if until is not None
                        else _FOREVER
                    ),
                    "context_length": served.config.context_size,
                }
            )
        return JSONResponse({"models": models})

    @api.post("/api/show")
    async def show(request: Request) -> Response:
        async def run() -> Response:
            params = ShowParams.model_validate(await context.body(request))
            name = params.model or params.name
            if not name:
                raise RequestError("model is required", field="model")
            config = context.pool.lookup(_untag(name)).config
            stops = [
                *config.stopwords,
                *(token.text for token in config.mlx.stop_tokens if getattr(token, "text", None)),
            ]
            parameters = "\n".join(f'stop "{stop}"' for stop in dict.fromkeys(stops))
            return JSONResponse(
                {
                    "modelfile": f"# served by mlx-gallery from its config {config.name}\nFROM {config.name}\n",
                    "parameters": parameters,
                    "template": config.mlx.chat_template.text or "",
                    "details": _details(config),
                    "model_info": {
                        "general.architecture": config.mlx.model_type or "",
                        "general.context_length": config.context_size,
                        f"{config.mlx.model_type or 'model'}.context_length": config.context_size,
                        "mlx_gallery.reasoning": config.mlx.reasoning.model_dump(),
                        "mlx_gallery.tool_format": config.mlx.tool_calls.format,
                        # The importer's decisions (verbose: with the evidence for and against each one).
                        "mlx_gallery.decisions": {
                            key: decision.model_dump(mode="json") if params.verbose else decision.value
                            for key, decision in config.mlx.decisions.items()
                        },
                    },
                    "capabilities": _capabilities(config),
                    "modified_at": "1970-01-01T00:00:00Z",
                }
            )

        return await run_route(run, error_response)

    return api
