"""Ollama's /api/chat and /api/generate bodies as the one request model.

Options, format, think, tools, images and keep_alive durations become a GenerationRequest; runtime.ollama_api
serves them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from gallery.errors import RequestError
from runtime.request import GenerationRequest, ResponseFormat, check_tools

# ----------------------------------------------------------------------------------------------- requests
_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Generation(_Params):
    model: str
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: str | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ChatParams(_Generation):
    """The body of `POST /api/chat` (unknown fields refused by name)."""

    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


class GenerateParams(_Generation):
    """The body of `POST /api/generate`."""

    prompt: str | None = None
    system: str | None = None
    raw: bool | None = None
    images: list[str] | None = None
    suffix: None = None  # fill-in-the-middle needs a FIM template this runtime does not pin
    template: None = None  # the config pins the template
    context: None = None  # Ollama's deprecated token context: send the conversation to /api/chat


class ShowParams(_Params):
    """The body of `POST /api/show` (`name` is the older spelling of `model`)."""

    model: str | None = None
    name: str | None = None
    verbose: bool | None = None


_HONOURED_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def keep_alive_seconds(value: str | float | None) -> float | None:
    """keep_alive in seconds (a number of seconds or a Go duration such as "5m"); negative: forever."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text.replace(" ", ""):
        raise RequestError(
            f"keep_alive: {value!r} is not a duration (e.g. 5m, 30s, 0, -1)", field="keep_alive"
        )
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _options(request: GenerationRequest, options: Mapping[str, Any] | None, context_size: int | None) -> None:
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key in _HONOURED_OPTIONS:
            setattr(request, _HONOURED_OPTIONS[key], value)
        elif key == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise RequestError("options.num_predict must be an integer", field="options")
            request.max_tokens = value if value > 0 else None  # -1 / -2: until the end (of the context)
        elif key == "stop":
            request.stop = [value] if isinstance(value, str) else list(value)
        elif key == "repeat_last_n":
            if value not in (-1, 0):
                request.repetition_context_size = value
        elif key == "num_ctx":
            if context_size is not None and isinstance(value, int) and value > context_size:
                raise RequestError(
                    f"options.num_ctx {value} is over this model's context of {context_size} tokens",
                    field="options",
                )
        else:
            raise RequestError(f"options.{key}: not an option this runtime can honour", field="options")


def _format(value: str | dict[str, Any] | None) -> ResponseFormat | None:
    if value in (None, ""):
        return None
    if value == "json":
        return ResponseFormat("json_object")
    if isinstance(value, dict):
        return ResponseFormat("json_schema", value)
    raise RequestError(f'format: expected "json" or a JSON schema, got {value!r}', field="format")


def _data_url(image: str) -> str:
    return image if image.startswith("data:") else f"data:image/png;base64,{image}"


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI chat messages (images as parts, tool calls with ids)."""
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        extra = sorted(set(message) - {"role", "content", "images", "tool_calls", "tool_name", "thinking"})
        if extra:
            raise RequestError(
                f"{where}: {', '.join(extra)}: not a field this runtime understands", field="messages"
            )
        turn: dict[str, Any] = {"role": message.get("role"), "content": message.get("content") or ""}
        images = message.get("images") or []
        if images:
            turn["content"] = [
                *({"type": "image_url", "image_url": {"url": _data_url(str(image))}} for image in images),
                {"type": "text", "text": turn["content"]},
            ]
        calls = message.get("tool_calls") or []
        if calls:
            turn["tool_calls"] = [
                {
                    "id": f"call_{index}_{number}",
                    "type": "function",
                    "function": {
                        "name": (call.get("function") or {}).get("name"),
                        "arguments": (call.get("function") or {}).get("arguments") or {},
                    },
                }
                for number, call in enumerate(calls)
            ]
            if not turn["content"]:
                turn["content"] = None
        if message.get("tool_name"):
            turn["name"] = message["tool_name"]
        # A past turn's `thinking` is accepted and not rendered again (templates drop past reasoning).
        out.append(turn)
    if out and out[-1]["role"] == "assistant" and out[-1]["content"] and not out[-1].get("tool_calls"):
        # Ollama continues a final assistant turn; the pinned templates close every assistant turn.
        raise RequestError(
            f"messages[{len(out) - 1}]: continuing a final assistant message is not supported: "
            "end with a user or tool message",
            field="messages",
        )
    return out


def _thinking(request: GenerationRequest, think: bool | str | None, config: Any) -> None:
    if think is None:
        return
    reasoning = config.mlx.reasoning
    if think is False:
        if reasoning.supported and not reasoning.switch:
            raise RequestError(f'"{config.name}" always thinks (its template has no switch)', field="think")
        request.enable_thinking = False if reasoning.supported else None
        return
    if not reasoning.supported:
        raise RequestError(f'"{config.name}" does not support thinking', field="think")
    request.enable_thinking = True if reasoning.switch else None
    if isinstance(think, str):
        if think not in ("low", "medium", "high"):
            raise RequestError(
                f"think: expected true, false, low, medium or high, got {think!r}", field="think"
            )
        request.template_kwargs = {"reasoning_effort": think}


def _common(request: GenerationRequest, params: _Generation, config: Any) -> GenerationRequest:
    _options(request, params.options, config.context_size)
    request.response_format = _format(params.format)
    _thinking(request, params.think, config)
    if params.logprobs:
        request.logprobs = True
        request.top_logprobs = params.top_logprobs or 0
    elif params.top_logprobs:
        raise RequestError("top_logprobs needs logprobs", field="top_logprobs")
    return request


def chat_request(params: ChatParams, config: Any) -> GenerationRequest:
    """The GenerationRequest of an /api/chat body."""
    request = GenerationRequest(
        messages=chat_messages(params.messages or []), tools=check_tools(params.tools or None, "tools")
    )
    return _common(request, params, config)


def generate_request(params: GenerateParams, config: Any) -> GenerationRequest:
    """The GenerationRequest of an /api/generate body (raw: the prompt as it is; else through the template)."""
    images = [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in params.images or []]
    if params.raw:
        if params.system:
            raise RequestError("system: a raw prompt has no template to put it in", field="system")
        request = GenerationRequest(prompt=params.prompt or "")
        if images:
            raise RequestError("images: a raw prompt cannot place images (use /api/chat)", field="images")
    else:
        messages: list[dict[str, Any]] = (
            [{"role": "system", "content": params.system}] if params.system else []
        )
        content: Any = params.prompt or ""
        if images:
            content = [*images, {"type": "text", "text": content}]
        messages.append({"role": "user", "content": content})
        request = GenerationRequest(messages=messages)
    return _common(request, params, config)
