"""OpenAI Responses API bodies as the one request model.

Input items (messages with input_text / input_image parts, function calls and their outputs, reasoning items),
tools, tool_choice and text.format become a GenerationRequest; runtime.responses_api serves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gallery.errors import RequestError
from runtime.request import (
    GenerationRequest,
    apply_tool_choice,
    check_tools,
    response_format,
)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextFormatParams(_Params):
    """`text`: the output format (text, json_object, json_schema) and verbosity."""

    format: dict[str, Any] | None = None
    verbosity: Literal["medium"] | None = None  # the only one a model without a verbosity switch honours


class ReasoningParams(_Params):
    """`reasoning`: effort maps to the config's thinking switch; summaries are refused (none is written)."""

    effort: str | None = None
    summary: None = None
    generate_summary: None = None


class StreamOptionsParams(_Params):
    """`stream_options`: obfuscation padding is never added, so either value is honoured."""

    include_obfuscation: bool | None = None


class ResponsesParams(_Params):
    """The body of `POST /v1/responses` (unknown fields refused by name)."""

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextFormatParams | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    stream_options: StreamOptionsParams | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    reasoning: ReasoningParams | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None  # an end-user id: recorded, changes nothing
    safety_identifier: str | None = None  # as user
    prompt_cache_key: str | None = None  # a hint: the prefix cache finds shared prefixes by itself
    include: list[Literal["reasoning.encrypted_content"]] | None = None  # reasoning is plain text here
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: Literal["auto", "default"] | None = None
    background: Literal[False] | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    # This runtime's own sampling extensions (as on /v1/chat/completions).
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None


# ----------------------------------------------------------------------------------------------- input
def _field(item: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    value = item.get(key)
    if not isinstance(value, kind):
        raise RequestError(f"{where}: needs {key!r}", field="input")
    return value


def _allowed(item: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    extra = sorted(set(item) - set(keys))
    if extra:
        raise RequestError(
            f"{where}: {', '.join(extra)}: not a field this runtime understands", field="input"
        )


def _parts(content: Any, where: str) -> Any:
    """A message's content as chat content: a string, or parts (text and images; files refused by name)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: content must be a string or a list of parts", field="input")
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        if not isinstance(part, Mapping):
            raise RequestError(f"{at}: a part must be an object", field="input")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            _allowed(part, ("type", "text", "annotations", "logprobs"), at)
            parts.append({"type": "text", "text": _field(part, "text", at)})
        elif kind == "refusal":
            _allowed(part, ("type", "refusal"), at)
            parts.append({"type": "text", "text": _field(part, "refusal", at)})
        elif kind == "input_image":
            _allowed(part, ("type", "image_url", "file_id", "detail"), at)
            if part.get("file_id") is not None:
                raise RequestError(
                    f"{at}: file_id images need OpenAI's file store, which this server has none of "
                    "(send image_url as a data URL)",
                    field="input",
                )
            if part.get("detail") not in (None, "auto"):
                raise RequestError(
                    f"{at}: detail {part['detail']!r} is not supported (auto only)", field="input"
                )
            parts.append({"type": "image_url", "image_url": {"url": _field(part, "image_url", at)}})
        else:
            raise RequestError(
                f"{at}: content part type {kind!r} is not supported (input_text, input_image, output_text)",
                field="input",
            )
    return parts


def input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """Responses `input` as OpenAI chat messages (function calls joined to their assistant turn)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if not isinstance(item, Mapping):
            raise RequestError(f"{where}: an input item must be an object", field="input")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            _allowed(item, ("type", "role", "content", "id", "status", "phase"), where)
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise RequestError(f"{where}: unknown role {role!r}", field="input")
            messages.append({"role": role, "content": _parts(item.get("content"), where)})
        elif kind == "function_call":
            _allowed(item, ("type", "id", "call_id", "name", "arguments", "status"), where)
            call = {
                "id": _field(item, "call_id", where),
                "type": "function",
                "function": {"name": _field(item, "name", where), "arguments": item.get("arguments") or "{}"},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                if last.get("content") == "":
                    last["content"] = None
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            _allowed(item, ("type", "id", "call_id", "output", "status"), where)
            output = item.get("output")
            content = output if isinstance(output, str) else _parts(output, where)
            messages.append(
                {"role": "tool", "tool_call_id": _field(item, "call_id", where), "content": content}
            )
        elif kind == "reasoning":
            # Earlier reasoning is accepted and not rendered again: chat templates drop past turns' thinking.
            _allowed(item, ("type", "id", "summary", "content", "encrypted_content", "status"), where)
        else:
            raise RequestError(
                f"{where}: input item type {kind!r} is not supported here (message, function_call, "
                "function_call_output, reasoning)",
                field="input",
            )
    if not messages:
        raise RequestError("input has no messages", field="input")
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools in the chat shape; hosted tools refused by name."""
    if not tools:
        return None
    converted = []
    for index, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise RequestError(
                f"tools[{index}]: {kind!r} is a hosted tool this server cannot run (function tools only)",
                field="tools",
            )
        _allowed(tool, ("type", "name", "description", "parameters", "strict"), f"tools[{index}]")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        if tool.get("strict") is None:
            function.pop("strict", None)
        converted.append({"type": "function", "function": function})
    return check_tools(converted, "tools")


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, Mapping):
        if choice.get("type") != "function":
            raise RequestError(
                f"tool_choice type {choice.get('type')!r} is not supported (auto, none, required, or a function)",
                field="tool_choice",
            )
        return {"function": {"name": choice.get("name")}}
    return choice


def _text_format(text: TextFormatParams | None) -> Any:
    spec = text.format if text is not None else None
    if spec is None or spec.get("type") != "json_schema":
        return response_format(spec, "text.format")
    inner = {key: spec[key] for key in ("name", "schema", "strict", "description") if key in spec}
    return response_format({"type": "json_schema", "json_schema": inner}, "text.format")


def generation_request(
    params: ResponsesParams, history: list[dict[str, Any]], config: Any
) -> GenerationRequest:
    """The GenerationRequest of a Responses body, after the stored turns (history)."""
    tools, required = apply_tool_choice(chat_tools(params.tools), _tool_choice(params.tool_choice))
    turns = history + input_messages(params.input)
    messages = ([{"role": "system", "content": params.instructions}] if params.instructions else []) + turns
    request = GenerationRequest(messages=messages, tools=tools, tools_required=required)
    request.parallel_tool_calls = params.parallel_tool_calls is not False and params.max_tool_calls != 1
    if params.max_tool_calls is not None and params.max_tool_calls > 1:
        raise RequestError("max_tool_calls: only 1 can be enforced (or leave it out)", field="max_tool_calls")
    request.max_tokens = params.max_output_tokens
    request.temperature, request.top_p = params.temperature, params.top_p
    request.top_k, request.min_p, request.seed = params.top_k, params.min_p, params.seed
    request.response_format = _text_format(params.text)
    request.truncate = params.truncation == "auto"
    effort = params.reasoning.effort if params.reasoning is not None else None
    if effort is not None:
        reasoning = config.mlx.reasoning
        if not reasoning.supported:
            raise RequestError(f"reasoning.effort: {config.name} does not reason", field="reasoning")
        if effort in ("none", "minimal"):
            if not reasoning.switch:
                raise RequestError(
                    f"reasoning.effort {effort!r}: {config.name} always reasons (its template has no switch)",
                    field="reasoning",
                )
            request.enable_thinking = False
        elif effort in ("low", "medium", "high", "xhigh"):
            request.enable_thinking = True if reasoning.switch else None
            request.template_kwargs = {"reasoning_effort": effort}
        else:
            raise RequestError(f"reasoning.effort: unknown value {effort!r}", field="reasoning")
    return request
