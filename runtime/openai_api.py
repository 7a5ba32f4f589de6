"""OpenAI's Chat Completions and Completions APIs, and the model list: one router on the server's shared context.

    POST /v1/chat/completions   chat (streaming SSE or not): media parts, tools, reasoning_content, logprobs,
                                response_format, usage (with cached prompt tokens)
    POST /v1/completions        a raw prompt (no template)
    GET  /v1/models[/{id}]      the served models, with backend, context, media and reasoning capabilities

Bodies are runtime.openai_request's (one model shared with the stdio protocol, unknown fields refused by name);
answers are built here from the one event stream; errors are OpenAI's JSON (runtime.http_server.error_response).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from runtime.faults import FAULTS
from runtime.handle import RequestHandle
from runtime.http_guard import AccessRecord
from runtime.http_server import error_response, run_route, stream_events, whole_answer
from runtime.openai_request import ChatParams, CompleteParams, chat_request, complete_request
from runtime.openai_response import logprobs_json, tool_calls_json, usage_json
from runtime.pool import Served
from runtime.prompt import accepted_media
from runtime.request import Completion, Event


def router(context: Any) -> APIRouter:
    """OpenAI's routes over the server's shared context (runtime.http_server._Context)."""
    api = APIRouter()

    @api.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(s) for s in context.pool.served]})

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        async def run() -> Response:
            return JSONResponse(_model_card(context.pool.lookup(model_id)))

        return await run_route(run, error_response)

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        async def run() -> Response:
            params = ChatParams.model_validate(await context.body(request))
            served, _, handle = await context.start(request, params.model, lambda _: chat_request(params))
            record: AccessRecord = request.state.access
            rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), served.config.name
            if params.stream:
                usage = params.stream_options is not None and params.stream_options.include_usage
                return _event_stream(_chat_stream(handle, rid, created, model, usage, record))
            done = await whole_answer(request, handle)
            record.count(done.usage)
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

        return await run_route(run, error_response)

    @api.post("/v1/completions")
    async def complete(request: Request) -> Response:
        async def run() -> Response:
            params = CompleteParams.model_validate(await context.body(request))
            served, _, handle = await context.start(request, params.model, lambda _: complete_request(params))
            record: AccessRecord = request.state.access
            rid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), served.config.name
            if params.stream:
                usage = params.stream_options is not None and params.stream_options.include_usage
                return _event_stream(_completion_stream(handle, rid, created, model, usage, record))
            done = await whole_answer(request, handle)
            record.count(done.usage)
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

        return await run_route(run, error_response)

    return api


def _event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    """Server-sent events, uncached."""
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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


def _stream_error(event: Event) -> bytes:
    kind = event.fault or "generation_failed"
    body = {"error": {"message": event.error, "type": FAULTS[kind].openai_type, "param": None, "code": kind}}
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
    async for event in stream_events(handle):
        if event.done:
            record.count(event.usage)
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
    async for event in stream_events(handle):
        if event.done:
            record.count(event.usage)
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
