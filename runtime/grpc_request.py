"""Turn what arrives on the wire (gRPC PredictOptions, JSON-RPC params) into GenerationRequests.

Shared rules for both interfaces: Tools must be a JSON array of objects, ToolChoice filters or
disables them, media is attached to the last user message as template parts (so the pinned template
places the markers), and the request's text is bounded before anything renders it. Everything here is
pure and raises RequestError with a one-line message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from runtime.engine import GenerationRequest
from runtime.messages import MediaItem
from gallery.errors import RequestError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_bool(value: Any, what: str) -> bool:
    """A boolean from JSON true/false or the strings people use for it."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RequestError(f"{what}: expected true or false, got {value!r}")


def parse_json(text: str, what: str) -> Any:
    """Parse a JSON field, naming the field on failure."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise RequestError(f"{what}: not valid JSON ({detail})") from None


def check_tools(tools: Any, what: str = "Tools") -> list[dict[str, Any]] | None:
    """Tools as a list of objects (OpenAI shape); empty means none."""
    if tools is None:
        return None
    if isinstance(tools, Mapping) and "function" in tools:
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(tool, Mapping) for tool in tools):
        raise RequestError(f"{what}: must be a JSON array of tool objects")
    for index, tool in enumerate(tools):
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise RequestError(f"{what}[{index}]: a tool needs a function with a string name")
    return [dict(tool) for tool in tools] or None


def apply_tool_choice(tools: list[dict[str, Any]] | None, choice: Any) -> list[dict[str, Any]] | None:
    """OpenAI tool_choice: "none" hides the tools, a named function keeps only that one."""
    if choice in (None, "", "auto", "required", "any"):
        return tools
    if choice == "none":
        return None
    if isinstance(choice, Mapping):
        function = choice.get("function") if isinstance(choice.get("function"), Mapping) else choice
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise RequestError("ToolChoice: expected \"auto\", \"none\", \"required\" or {\"function\": {\"name\": …}}")
        chosen = [tool for tool in tools or [] if tool.get("function", tool).get("name") == name]
        if not chosen:
            raise RequestError(f"ToolChoice names {name!r}, which is not among the request's tools")
        return chosen
    raise RequestError(f"ToolChoice: unsupported value {choice!r}")


def parse_tool_choice(text: str) -> Any:
    """ToolChoice arrives as JSON (`"auto"`, `{"type": "function", …}`) or as a bare word."""
    text = text.strip()
    if not text:
        return None
    if text[0] in "{[\"":
        return parse_json(text, "ToolChoice")
    return text


def attach_media(messages: list[dict[str, Any]], media: Sequence[MediaItem]) -> list[dict[str, Any]]:
    """Put media inputs into the last user message as parts, before its text (how VLM prompts read)."""
    if not media:
        return messages
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            parts: list[Any]
            if content is None:
                parts = []
            elif isinstance(content, str):
                parts = [{"type": "text", "text": content}] if content else []
            else:
                parts = list(content)
            message["content"] = [{"type": item.kind, item.kind: item.data} for item in media] + parts
            return messages
    raise RequestError("media inputs need a user message to attach to")


def media_items(images: Iterable[str], audios: Iterable[str], videos: Iterable[str]) -> list[MediaItem]:
    """MediaItems from the three lists of encoded inputs."""
    items: list[MediaItem] = []
    for kind, values in (("image", images), ("audio", audios), ("video", videos)):
        for value in values:
            if not isinstance(value, str) or not value.strip():
                raise RequestError(f"{kind} input must be a non-empty string (base64 or data URL)")
            items.append(MediaItem(kind=kind, data=value))  # type: ignore[arg-type]
    return items


def text_size(value: Any) -> int:
    """Bytes of the text inside a request part (media data excluded: it is bounded separately)."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, Mapping):
        return sum(text_size(v) for k, v in value.items() if k not in ("image", "audio", "video", "image_url",
                                                                       "input_audio", "video_url"))
    if isinstance(value, (list, tuple)):
        return sum(text_size(v) for v in value)
    return 0


def check_size(request: GenerationRequest, limit: int) -> None:
    """Refuse a request whose text (prompt, messages, tools, stops) is over the limit."""
    size = text_size(request.prompt) + text_size(request.messages) + text_size(request.tools) + text_size(request.stop)
    if size > limit:
        raise RequestError(f"request text is {size} bytes, over this runtime's limit of {limit} bytes "
                           "(load option max_request_bytes)")


def thinking_and_kwargs(metadata: Mapping[str, str]) -> tuple[bool | None, dict[str, Any]]:
    """enable_thinking and chat-template kwargs from PredictOptions.Metadata."""
    kwargs: dict[str, Any] = {}
    thinking: bool | None = None
    raw_kwargs = metadata.get("chat_template_kwargs")
    if raw_kwargs:
        parsed = parse_json(raw_kwargs, "Metadata chat_template_kwargs")
        if not isinstance(parsed, dict):
            raise RequestError("Metadata chat_template_kwargs: must be a JSON object")
        kwargs.update(parsed)
    if "enable_thinking" in kwargs:
        thinking = parse_bool(kwargs.pop("enable_thinking"), "chat_template_kwargs.enable_thinking")
    if metadata.get("enable_thinking", "").strip():
        thinking = parse_bool(metadata["enable_thinking"], "Metadata enable_thinking")
    effort = metadata.get("reasoning_effort", "").strip()
    if effort:
        kwargs.setdefault("reasoning_effort", effort)
    return thinking, kwargs


def message_dict(role: str, content: str, *, name: str = "", tool_call_id: str = "", reasoning: str = "",
                 tool_calls: str = "", index: int = 0) -> dict[str, Any]:
    """A chat message from the proto's flat fields (empty strings mean absent)."""
    message: dict[str, Any] = {"role": role, "content": content}
    if name:
        message["name"] = name
    if tool_call_id:
        message["tool_call_id"] = tool_call_id
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls.strip():
        calls = parse_json(tool_calls, f"Messages[{index}].tool_calls")
        if isinstance(calls, dict):
            calls = [calls]
        if not isinstance(calls, list):
            raise RequestError(f"Messages[{index}].tool_calls: must be a JSON array of tool calls")
        message["tool_calls"] = calls
    return message


def predict_request(options: Any, *, max_request_bytes: int) -> tuple[GenerationRequest, list[str]]:
    """A GenerationRequest from PredictOptions, and notes about fields this runtime ignores.

    Proto3 cannot tell 0 from unset, so 0 means "the default" for Tokens, TopP, TopK, MinP, Penalty and
    Seed; Temperature is always taken as sent (0 is greedy decoding, as in llama.cpp). A negative Seed
    means "random".
    """
    notes: list[str] = []
    media = media_items(options.Images, options.Audios, options.Videos)
    tools = check_tools(parse_json(options.Tools, "Tools")) if options.Tools.strip() else None
    tools = apply_tool_choice(tools, parse_tool_choice(options.ToolChoice))
    thinking, kwargs = thinking_and_kwargs(options.Metadata)
    use_messages = bool(options.Messages) and (options.UseTokenizerTemplate or not options.Prompt)
    request = GenerationRequest(tools=tools, enable_thinking=thinking, template_kwargs=kwargs,
                                correlation_id=options.CorrelationId or None)
    if use_messages:
        messages = [message_dict(m.role, m.content, name=m.name, tool_call_id=m.tool_call_id,
                                 reasoning=m.reasoning_content, tool_calls=m.tool_calls, index=i)
                    for i, m in enumerate(options.Messages)]
        request.messages = attach_media(messages, media)
    elif options.Prompt:
        request.prompt = options.Prompt
        request.media = media
    else:
        raise RequestError("empty request: send Messages (with UseTokenizerTemplate) or a Prompt")
    request.stop = [stop for stop in options.StopPrompts if stop]
    request.max_tokens = options.Tokens if options.Tokens > 0 else None
    request.temperature = max(float(options.Temperature), 0.0)
    request.top_p = float(options.TopP) if options.TopP > 0 else None
    request.top_k = int(options.TopK) if options.TopK > 0 else None
    request.min_p = float(options.MinP) if options.MinP > 0 else None
    request.repeat_penalty = float(options.Penalty) if options.Penalty > 0 else None
    request.seed = int(options.Seed) if options.Seed > 0 else None
    for field, active in (("FrequencyPenalty", options.FrequencyPenalty != 0), ("PresencePenalty",
                          options.PresencePenalty != 0), ("IgnoreEOS", options.IgnoreEOS), ("Grammar",
                          bool(options.Grammar)), ("Logprobs", options.Logprobs > 0 or options.TopLogprobs > 0),
                          ("NDraft", options.NDraft > 0)):
        if active:
            notes.append(f"{field} is not supported by this runtime and was ignored")
    check_size(request, max_request_bytes)
    return request, notes
