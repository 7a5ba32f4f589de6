"""OpenAI's Responses API on the same engines: `POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`.

A translation, not a pipeline: `input` (a string, or items: messages with `input_text` / `input_image` parts,
`function_call`, `function_call_output`, reasoning items) and `instructions` become the chat messages of one
GenerationRequest; the engine's events become Responses output items (`reasoning`, `message`,
`function_call`) and, streamed, the Responses event sequence (`response.created` … `response.completed`, or
`response.incomplete` / `response.failed`). Reasoning never reaches an `output_text`: the engine splits it
into its own events, which become a `reasoning` item.

Responses are kept (unless `store: false`) in a bounded in-memory store, so `previous_response_id` continues a
conversation: the stored turns are rendered again, unchanged, in front of the new input, so the prompt's
prefix is the one the prefix cache already holds (usage reports it as `input_tokens_details.cached_tokens`).
As in OpenAI's API, a previous response's `instructions` are not carried over.

What the engine cannot do is refused by name: hosted tools (web search, file search, computer use, …),
`background`, stored prompts, conversations, file inputs, reasoning summaries, logprobs.
"""

from __future__ import annotations

import collections
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gallery.errors import ModelNotFound
from runtime.http_guard import AccessRecord
from runtime.pool import Served
from runtime.request import (
    Completion,
    Event,
    GenerationRequest,
    Usage,
)
from runtime.responses_request import ResponsesParams, generation_request

MAX_STORED = 512  # responses kept for previous_response_id (oldest dropped first)
MAX_STORED_BYTES = 64 * 1024 * 1024  # and at most this much conversation text in all


# ----------------------------------------------------------------------------------------------- the store
class ResponseStore:
    """The responses kept for `previous_response_id` and `GET /v1/responses/{id}`: bounded by count and size."""

    def __init__(self, max_items: int = MAX_STORED, max_bytes: int = MAX_STORED_BYTES) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: collections.OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = (
            collections.OrderedDict()
        )
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Keep a response and the conversation it ends (without instructions), dropping the oldest past the bounds."""
        size = len(json.dumps(conversation, ensure_ascii=False, default=str)) + len(
            json.dumps(response, ensure_ascii=False, default=str)
        )
        with self._lock:
            self._items[response["id"]] = (response, conversation, size)
            self._bytes += size
            while self._items and (len(self._items) > self.max_items or self._bytes > self.max_bytes):
                _, (_, _, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A stored response and its conversation. Raises ModelNotFound (404) for an unknown id."""
        with self._lock:
            found = self._items.get(response_id)
        if found is None:
            raise ModelNotFound(
                f"no stored response {response_id!r} (never stored with store: true, deleted, or dropped: "
                f"this server keeps the last {self.max_items})"
            )
        return found[0], found[1]

    def delete(self, response_id: str) -> None:
        """Forget a stored response. Raises ModelNotFound for an unknown id."""
        self.get(response_id)
        with self._lock:
            found = self._items.pop(response_id, None)
            if found is not None:
                self._bytes -= found[2]


# ----------------------------------------------------------------------------------------------- output
def usage_json(usage: Usage | None) -> dict[str, Any]:
    """The Responses API's usage object."""
    usage = usage or Usage()
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


class OutputBuilder:
    """Folds engine events into Responses output items, and says what to stream as each one grows.

    One item is open at a time; a change of kind (reasoning, text, a tool call) closes it. Each `feed` returns
    the stream events (type, payload) the new text makes; `finish` closes the last item.
    """

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text = ""

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self.output) - 1
        events: list[tuple[str, dict[str, Any]]] = []
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        part: dict[str, Any]
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": self._text}
            item["content"] = [part]
            events += [
                ("response.reasoning_text.done", {**ids, "text": self._text}),
                ("response.content_part.done", {**ids, "part": part}),
            ]
        else:
            part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            events += [
                ("response.output_text.done", {**ids, "text": self._text, "logprobs": []}),
                ("response.content_part.done", {**ids, "part": part}),
            ]
        item["status"] = "completed"
        events.append(("response.output_item.done", {"output_index": index, "item": item}))
        self._text = ""
        return events

    def _text_piece(self, kind: str, text: str) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        if self._open is None or self._open["type"] != kind:
            events += self._close()
            if kind == "reasoning":
                item: dict[str, Any] = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": []}
                part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
            else:
                item = {
                    "type": "message",
                    "id": f"msg_{uuid.uuid4().hex}",
                    "status": "in_progress",
                    "role": "assistant",
                }
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"] = []
            self.output.append(item)
            self._open = item
            index = len(self.output) - 1
            events += [
                ("response.output_item.added", {"output_index": index, "item": json.loads(json.dumps(item))}),
                (
                    "response.content_part.added",
                    {"item_id": item["id"], "output_index": index, "content_index": 0, "part": part},
                ),
            ]
        self._text += text
        index = len(self.output) - 1
        ids = {"item_id": self.output[-1]["id"], "output_index": index, "content_index": 0}
        if kind == "reasoning":
            events.append(("response.reasoning_text.delta", {**ids, "delta": text}))
        else:
            events.append(("response.output_text.delta", {**ids, "delta": text, "logprobs": []}))
        return events

    def feed(self, event: Event) -> list[tuple[str, dict[str, Any]]]:
        """The stream events one engine event makes."""
        events: list[tuple[str, dict[str, Any]]] = []
        if event.reasoning:
            events += self._text_piece("reasoning", event.reasoning)
        if event.content:
            events += self._text_piece("message", event.content)
        for call in event.tool_calls:
            events += self._close()
            item = {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "call_id": call.id,
                "name": call.name,
                "arguments": "",
                "status": "in_progress",
            }
            self.output.append(item)
            index = len(self.output) - 1
            events.append(("response.output_item.added", {"output_index": index, "item": dict(item)}))
            ids = {"item_id": item["id"], "output_index": index}
            events.append(("response.function_call_arguments.delta", {**ids, "delta": call.arguments}))
            events.append(
                (
                    "response.function_call_arguments.done",
                    {**ids, "name": call.name, "arguments": call.arguments},
                )
            )
            item.update(arguments=call.arguments, status="completed")
            events.append(("response.output_item.done", {"output_index": index, "item": dict(item)}))
        return events

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        """Close the open item (the answer ended)."""
        return self._close()


def assistant_turns(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items as the chat messages a continued conversation renders (reasoning left out)."""
    text = "".join(
        part["text"] for item in output if item["type"] == "message" for part in item.get("content", [])
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return [message]


class _Turn:
    """One response being made: its id, its request fields (echoed in the response object) and its output."""

    def __init__(self, params: ResponsesParams, model: str) -> None:
        self.params = params
        self.model = model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.builder = OutputBuilder()
        self.sequence = 0

    def response(
        self, status: str, usage: Usage | None = None, *, finish: str | None = None, error: str | None = None
    ) -> dict[str, Any]:
        """The response object in a given state."""
        params = self.params
        fmt = params.text.format if params.text is not None and params.text.format else {"type": "text"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": False,
            "error": {"code": "server_error", "message": error} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": params.instructions,
            "max_output_tokens": params.max_output_tokens,
            "max_tool_calls": params.max_tool_calls,
            "model": self.model,
            "output": self.builder.output if status != "in_progress" else [],
            "parallel_tool_calls": params.parallel_tool_calls is not False,
            "previous_response_id": params.previous_response_id,
            "reasoning": {"effort": params.reasoning.effort if params.reasoning else None, "summary": None},
            "store": params.store is not False,
            "temperature": params.temperature,
            "text": {"format": fmt, "verbosity": "medium"},
            "tool_choice": params.tool_choice if params.tool_choice is not None else "auto",
            "tools": params.tools or [],
            "top_p": params.top_p,
            "truncation": params.truncation or "disabled",
            "usage": usage_json(usage) if usage is not None else None,
            "user": params.user,
            "metadata": params.metadata or {},
        }

    def sse(self, kind: str, payload: dict[str, Any]) -> bytes:
        """One stream event, numbered."""
        body = {"type": kind, "sequence_number": self.sequence, **payload}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def _final_status(finish: str | None, error: str | None) -> str:
    if error:
        return "failed"
    return "incomplete" if finish == "length" else "completed"


def router(context: Any) -> APIRouter:
    """The Responses API's routes over the server's shared context (runtime.http_server._Context)."""
    from runtime.http_server import error_response, run_route, stream_events, whole_answer

    api = APIRouter()
    store = ResponseStore()

    def keep(turn: _Turn, conversation: list[dict[str, Any]], body: dict[str, Any]) -> None:
        if turn.params.store is not False:
            store.put(body, conversation + assistant_turns(turn.builder.output))

    @api.post("/v1/responses")
    async def create(request: Request) -> Response:
        async def run() -> Response:
            params = ResponsesParams.model_validate(await context.body(request))
            history: list[dict[str, Any]] = []
            if params.previous_response_id:
                _, history = store.get(params.previous_response_id)
            kept: list[Any] = []

            def build(served: Served) -> GenerationRequest:
                generation = generation_request(params, [dict(m) for m in history], served.config)
                conversation = generation.messages[1:] if params.instructions else list(generation.messages)
                kept.append(
                    json.loads(json.dumps(conversation))
                )  # the template's normalization must not touch it
                return generation

            served, _generation, handle = await context.start(request, params.model, build)
            record: AccessRecord = request.state.access
            conversation = kept[0]
            turn = _Turn(params, served.config.name)
            if params.stream:
                return StreamingResponse(
                    _stream(turn, handle, record, lambda body: keep(turn, conversation, body)),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            done: Completion = await whole_answer(request, handle)
            record.count(done.usage)
            turn.builder.feed(_as_event(done))
            turn.builder.finish()
            body = turn.response(
                _final_status(done.finish_reason, None), done.usage, finish=done.finish_reason
            )
            keep(turn, conversation, body)
            return JSONResponse(body)

        return await run_route(run, error_response)

    @api.get("/v1/responses/{response_id}")
    async def fetch(response_id: str) -> Response:
        async def run() -> Response:
            body, _ = store.get(response_id)
            return JSONResponse(body)

        return await run_route(run, error_response)

    @api.delete("/v1/responses/{response_id}")
    async def delete(response_id: str) -> Response:
        async def run() -> Response:
            store.delete(response_id)
            return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

        return await run_route(run, error_response)

    async def _stream(turn: _Turn, handle: Any, record: AccessRecord, on_done: Any) -> AsyncIterator[bytes]:
        yield turn.sse("response.created", {"response": turn.response("in_progress")})
        yield turn.sse("response.in_progress", {"response": turn.response("in_progress")})
        async for event in stream_events(handle):
            for kind, payload in turn.builder.feed(event):
                yield turn.sse(kind, payload)
            if not event.done:
                continue
            record.count(event.usage)
            for kind, payload in turn.builder.finish():
                yield turn.sse(kind, payload)
            failed = event.error if event.error and event.finish_reason != "cancelled" else None
            status = _final_status(event.finish_reason, failed)
            body = turn.response(status, event.usage, finish=event.finish_reason, error=failed)
            if status != "failed":
                on_done(body)
            yield turn.sse(f"response.{status}", {"response": body})

    return api


def _as_event(done: Completion) -> Event:
    """A whole answer as one event, for the builder (reasoning first, as the engine streams it)."""
    return Event(content=done.content, reasoning=done.reasoning, tool_calls=list(done.tool_calls))
