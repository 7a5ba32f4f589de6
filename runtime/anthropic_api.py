"""Anthropic's Messages API on the same engines: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

A translation, not a pipeline: `system` (a string or text blocks) and the messages' content blocks (`text`,
`image` as base64 or URL, `tool_use`, `tool_result` with string or block content and `is_error`, `thinking`)
become the chat messages of one GenerationRequest; the engine's events become content blocks (`thinking`,
`text`, `tool_use`) and, streamed, Anthropic's event choreography (`message_start`, `ping`, per block
`content_block_start` → `content_block_delta`* → `content_block_stop`, `message_delta` with the stop reason and
usage, `message_stop`). Reasoning is only ever a `thinking` block: the engine splits it from the answer by the
config's pinned markers, so no marker reaches a `text` block.

Mapped: `tools` (custom tools with `input_schema`), `tool_choice` (`auto`, `any`, `tool`, `none`,
`disable_parallel_tool_use`), `stop_sequences` (the matched one reported as `stop_sequence`),
`thinking` (`enabled` with `budget_tokens` → the thinking budget, `disabled`, `adaptive`),
`output_config.format` (a JSON schema, through llguidance) and `output_config.effort` (the template's
reasoning_effort), `temperature` / `top_p` / `top_k` (sent in the body). Earlier `thinking` blocks are
accepted (their signature ignored) and not rendered again, as chat templates drop past turns' reasoning.
Refused by name: server tools and Anthropic-defined tools (`web_search_…`, `bash_…`, …), `document`
blocks, `container`, MCP servers, and every field this runtime does not know.
Errors are Anthropic's shape: `{"type": "error", "error": {"type": …, "message": …}}`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gallery.errors import RequestError
from runtime.faults import FAULTS
from runtime.http_guard import AccessRecord
from runtime.request import (
    Completion,
    Event,
    GenerationRequest,
    Usage,
    apply_tool_choice,
    check_tools,
    response_format,
)

# Anthropic's error types by HTTP status (its documented set).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    503: "overloaded_error",
}


def error_response(kind: str, message: str, param: str | None = None) -> JSONResponse:
    """Anthropic's error shape, with the HTTP status of the fault kind (runtime.faults)."""
    status = FAULTS[kind].http_status
    body = {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputConfig(_Params):
    """`output_config`: a JSON-schema output format and the effort (the template's reasoning_effort)."""

    format: dict[str, Any] | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class _Conversation(_Params):
    model: str | None = None
    messages: list[Any]
    system: str | list[Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None  # a caching hint: the prefix cache works by itself


class MessagesParams(_Conversation):
    """The body of `POST /v1/messages` (unknown fields refused by name)."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None  # user_id: recorded, changes nothing
    service_tier: Literal["auto", "standard_only"] | None = None


class CountParams(_Conversation):
    """The body of `POST /v1/messages/count_tokens`."""


def _allowed(block: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    extra = sorted(set(block) - set(keys))
    if extra:
        raise RequestError(
            f"{where}: {', '.join(extra)}: not a field this runtime understands", field="messages"
        )


def _text(block: Mapping[str, Any], where: str) -> str:
    _allowed(block, ("type", "text", "cache_control", "citations"), where)
    if block.get("citations"):
        raise RequestError(f"{where}: citations are not supported", field="messages")
    text = block.get("text")
    if not isinstance(text, str):
        raise RequestError(f"{where}: a text block needs a string 'text'", field="messages")
    return text


def _image(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An image block as a chat image part (base64 as a data URL; a URL only with remote media allowed)."""
    _allowed(block, ("type", "source", "cache_control"), where)
    source = block.get("source")
    if not isinstance(source, Mapping):
        raise RequestError(f"{where}: an image block needs a source", field="messages")
    if source.get("type") == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not isinstance(data, str):
            raise RequestError(f"{where}: a base64 image needs media_type and data", field="messages")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise RequestError(
        f"{where}: image source type {source.get('type')!r} is not supported (base64, url)", field="messages"
    )


def _tool_result(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    _allowed(block, ("type", "tool_use_id", "content", "is_error", "cache_control"), where)
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise RequestError(f"{where}: a tool_result needs tool_use_id", field="messages")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            at = f"{where}.content[{index}]"
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise RequestError(f"{at}: tool_result content takes text blocks only", field="messages")
            texts.append(_text(part, at))
        text = "\n".join(texts)
    else:
        raise RequestError(f"{where}: tool_result content must be a string or blocks", field="messages")
    if block.get("is_error") is True:
        text = f"Error: {text}"  # chat templates have no error flag: the model reads it in the result
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def chat_messages(system: str | list[Any] | None, messages: list[Any]) -> list[dict[str, Any]]:
    """Anthropic's system and messages as OpenAI chat messages (tool results as tool turns)."""
    out: list[dict[str, Any]] = []
    if isinstance(system, list):
        texts = []
        for number, block in enumerate(system):
            if not isinstance(block, Mapping) or block.get("type") != "text":
                raise RequestError(f"system[{number}]: system blocks must be text blocks", field="system")
            texts.append(_text(block, f"system[{number}]"))
        system = "\n".join(texts)
    if system:
        out.append({"role": "system", "content": system})
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{where}: must be an object", field="messages")
        _allowed(message, ("role", "content"), where)
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise RequestError(f"{where}: role must be user or assistant, got {role!r}", field="messages")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}: content must be a string or a list of blocks", field="messages")
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for number, block in enumerate(content):
            at = f"{where}.content[{number}]"
            kind = block.get("type") if isinstance(block, Mapping) else None
            if kind == "text":
                parts.append({"type": "text", "text": _text(block, at)})
            elif kind == "image" and role == "user":
                parts.append(_image(block, at))
            elif kind == "tool_use" and role == "assistant":
                _allowed(block, ("type", "id", "name", "input", "cache_control", "caller"), at)
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {
                            "name": block.get("name"),
                            "arguments": json.dumps(block.get("input") or {}),
                        },
                    }
                )
            elif kind == "tool_result" and role == "user":
                results.append(_tool_result(block, at))
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                # Accepted, signature ignored; not rendered again (templates drop past turns' reasoning).
                _allowed(block, ("type", "thinking", "signature", "data"), at)
            else:
                raise RequestError(
                    f"{at}: a {kind!r} block is not supported in a {role} message "
                    "(text, image, tool_use, tool_result, thinking)",
                    field="messages",
                )
        out.extend(results)
        if role == "assistant":
            text = "".join(part["text"] for part in parts)
            turn: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
            if calls:
                turn["tool_calls"] = calls
            out.append(turn)
        elif parts or not results:
            only_text = all(part["type"] == "text" for part in parts)
            out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts})
    last = out[-1] if out else None
    if (
        last is not None
        and last["role"] == "assistant"
        and not last.get("tool_calls")
        and last.get("content")
    ):
        # Anthropic continues a final assistant turn (prefill); the pinned templates close every assistant turn.
        raise RequestError(
            f"messages[{len(messages) - 1}]: a final assistant message (prefill) is not supported: "
            "end with a user message",
            field="messages",
        )
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Anthropic custom tools in the chat shape; server and Anthropic-defined tools refused by name."""
    if not tools:
        return None
    converted = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if tool.get("type") not in (None, "custom"):
            raise RequestError(
                f"{where}: {tool.get('type')!r} is an Anthropic-defined or server tool this server cannot run "
                "(custom tools with an input_schema only)",
                field="tools",
            )
        extra = sorted(set(tool) - {"type", "name", "description", "input_schema", "cache_control", "strict"})
        if extra:
            raise RequestError(
                f"{where}: {', '.join(extra)}: not a field this runtime understands", field="tools"
            )
        function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
        if tool.get("description"):
            function["description"] = tool["description"]
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        converted.append({"type": "function", "function": function})
    return check_tools(converted, "tools")


def _tool_choice(choice: Mapping[str, Any] | None) -> tuple[Any, bool]:
    """(the OpenAI tool_choice, parallel calls allowed)."""
    if choice is None:
        return None, True
    extra = sorted(set(choice) - {"type", "name", "disable_parallel_tool_use"})
    if extra:
        raise RequestError(
            f"tool_choice: {', '.join(extra)}: not a field this runtime understands", field="tool_choice"
        )
    parallel = choice.get("disable_parallel_tool_use") is not True
    kind = choice.get("type")
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool":
        return {"function": {"name": choice.get("name")}}, parallel
    raise RequestError(f"tool_choice: unknown type {kind!r} (auto, any, tool, none)", field="tool_choice")


def generation_request(params: _Conversation, config: Any) -> GenerationRequest:
    """The GenerationRequest of a Messages (or count_tokens) body."""
    choice, parallel = _tool_choice(params.tool_choice)
    tools, required = apply_tool_choice(chat_tools(params.tools), choice)
    request = GenerationRequest(
        messages=chat_messages(params.system, params.messages), tools=tools, tools_required=required
    )
    request.parallel_tool_calls = parallel
    thinking = params.thinking
    if thinking is not None:
        kind = thinking.get("type")
        reasoning = config.mlx.reasoning
        extra = sorted(set(thinking) - {"type", "budget_tokens"})
        if extra:
            raise RequestError(
                f"thinking: {', '.join(extra)}: not a field this runtime understands", field="thinking"
            )
        if kind in ("enabled", "adaptive"):
            if not reasoning.supported:
                raise RequestError(f"thinking: {config.name} does not reason", field="thinking")
            request.enable_thinking = True if reasoning.switch else None
            budget = thinking.get("budget_tokens")
            if kind == "enabled" and budget is not None:
                request.thinking_budget = budget
        elif kind == "disabled":
            if reasoning.supported and not reasoning.switch:
                raise RequestError(
                    f"thinking: {config.name} always reasons (its template has no switch)", field="thinking"
                )
            request.enable_thinking = False if reasoning.supported else None
        else:
            raise RequestError(
                f"thinking: unknown type {kind!r} (enabled, disabled, adaptive)", field="thinking"
            )
    output = params.output_config
    if output is not None:
        if output.format is not None:
            if output.format.get("type") != "json_schema":
                raise RequestError(
                    "output_config.format: only json_schema is supported", field="output_config"
                )
            request.response_format = response_format(
                {"type": "json_schema", "json_schema": {"schema": output.format.get("schema")}},
                "output_config.format",
            )
        if output.effort is not None:
            request.template_kwargs = {"reasoning_effort": output.effort}
    if isinstance(params, MessagesParams):
        request.max_tokens = params.max_tokens
        request.stop = list(params.stop_sequences or [])
        request.temperature, request.top_p, request.top_k = params.temperature, params.top_p, params.top_k
    return request


# ----------------------------------------------------------------------------------------------- output
def usage_json(usage: Usage | None) -> dict[str, Any]:
    """Anthropic's usage: input_tokens counts the prompt tokens not read from the prefix cache."""
    usage = usage or Usage()
    return {
        "input_tokens": max(usage.prompt_tokens - usage.cached_tokens, 0),
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(finish: str | None, matched: str | None, stops: list[str]) -> tuple[str, str | None]:
    """(Anthropic's stop_reason, the stop sequence that ended the answer) from the engine's finish."""
    if finish == "length":
        return "max_tokens", None
    if finish == "tool_calls":
        return "tool_use", None
    if matched is not None and matched in stops:
        return "stop_sequence", matched
    return "end_turn", None


class BlockBuilder:
    """Folds engine events into content blocks, and says what to stream as each one grows."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self._open: str | None = None

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"index": len(self.content) - 1})]

    def _piece(self, kind: str, text: str) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        if self._open != kind:
            events += self._close()
            block = (
                {"type": "thinking", "thinking": "", "signature": ""}
                if kind == "thinking"
                else {"type": "text", "text": ""}
            )
            self.content.append(block)
            self._open = kind
            events.append(
                ("content_block_start", {"index": len(self.content) - 1, "content_block": dict(block)})
            )
        block = self.content[-1]
        block[kind] += text
        delta = (
            {"type": "thinking_delta", "thinking": text}
            if kind == "thinking"
            else {"type": "text_delta", "text": text}
        )
        events.append(("content_block_delta", {"index": len(self.content) - 1, "delta": delta}))
        return events

    def feed(self, event: Event) -> list[tuple[str, dict[str, Any]]]:
        """The stream events one engine event makes."""
        events: list[tuple[str, dict[str, Any]]] = []
        if event.reasoning:
            events += self._piece("thinking", event.reasoning)
        if event.content:
            events += self._piece("text", event.content)
        for call in event.tool_calls:
            events += self._close()
            try:
                arguments = json.loads(call.arguments) if call.arguments else {}
            except json.JSONDecodeError:
                arguments = {}
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}
            self.content.append(block)
            index = len(self.content) - 1
            events += [
                ("content_block_start", {"index": index, "content_block": {**block, "input": {}}}),
                (
                    "content_block_delta",
                    {
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": json.dumps(arguments)},
                    },
                ),
                ("content_block_stop", {"index": index}),
            ]
        return events

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        """Close the open block."""
        return self._close()


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    body = {"type": kind, **payload}
    return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def _message(mid: str, model: str, content: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }


def router(context: Any) -> APIRouter:
    """The Messages API's routes over the server's shared context (runtime.http_server._Context)."""
    from runtime.http_server import run_route, stream_events, whole_answer

    api = APIRouter()

    @api.post("/v1/messages")
    async def create(request: Request) -> Response:
        async def run() -> Response:
            params = MessagesParams.model_validate(await context.body(request))
            served, generation, handle = await context.start(
                request, params.model, lambda served: generation_request(params, served.config)
            )
            record: AccessRecord = request.state.access
            stops = list(generation.stop)
            mid, model = f"msg_{uuid.uuid4().hex}", served.config.name
            if params.stream:
                prompt_ids = getattr(handle.prepared, "prompt_ids", None)
                return StreamingResponse(
                    _stream(handle, mid, model, stops, len(prompt_ids or []), record),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            done: Completion = await whole_answer(request, handle)
            record.count(done.usage)
            builder = BlockBuilder()
            builder.feed(
                Event(content=done.content, reasoning=done.reasoning, tool_calls=list(done.tool_calls))
            )
            body = _message(mid, model, builder.content, usage_json(done.usage))
            body["stop_reason"], body["stop_sequence"] = stop_reason(
                done.finish_reason, done.stop_sequence, stops
            )
            return JSONResponse(body)

        return await run_route(run, error_response)

    @api.post("/v1/messages/count_tokens")
    async def count(request: Request) -> Response:
        async def run() -> Response:
            params = CountParams.model_validate(await context.body(request))
            served, engine = await context.pool.engine(params.model)
            request.state.access.model = served.config.name
            generation = generation_request(params, served.config)
            generation.max_tokens = 1

            def measure() -> int:
                prepared = engine.prepare(generation)
                try:
                    if prepared.prompt_ids is None:
                        raise RequestError(
                            "count_tokens: this model's prompts with media are tokenized with the media by the "
                            "VLM backend; count a text-only request",
                            field="messages",
                        )
                    return len(prepared.prompt_ids)
                finally:
                    prepared.cleanup()

            from runtime.async_bridge import run_blocking

            tokens = await run_blocking(context.executor, measure)
            return JSONResponse({"input_tokens": tokens})

        return await run_route(run, error_response)

    async def _stream(
        handle: Any, mid: str, model: str, stops: list[str], prompt_tokens: int, record: AccessRecord
    ) -> AsyncIterator[bytes]:
        start_usage = {"input_tokens": prompt_tokens, "output_tokens": 0}
        yield _sse("message_start", {"message": _message(mid, model, [], start_usage)})
        yield _sse("ping", {})
        builder = BlockBuilder()
        async for event in stream_events(handle):
            for kind, payload in builder.feed(event):
                yield _sse(kind, payload)
            if not event.done:
                continue
            record.count(event.usage)
            for kind, payload in builder.finish():
                yield _sse(kind, payload)
            if event.error and event.finish_reason != "cancelled":
                error = {"type": "api_error", "message": event.error}
                yield _sse("error", {"error": error})
                return
            reason, sequence = stop_reason(event.finish_reason, event.stop_sequence, stops)
            yield _sse(
                "message_delta",
                {
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": usage_json(event.usage),
                },
            )
            yield _sse("message_stop", {})

    return api
