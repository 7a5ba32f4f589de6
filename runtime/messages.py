"""Normalize chat requests as clients really send them, so strict templates accept them.

Clients send OpenAI-shaped messages as dicts or as attribute objects, with string or list-of-parts
content, `developer` roles, system messages in the middle of a conversation, and consecutive
messages of the same role. Strict templates reject several of those. Normalization fixes exactly
those cases and otherwise passes messages the way transformers and vLLM pass them to templates:
- `content: null` stays None on a turn that calls tools (the renderer then passes it as transformers does,
  runtime.prompt retries a template that cannot take it with an empty string, as vLLM does);
- a tool call's `arguments` JSON string becomes the mapping templates read (`tool_call.function.arguments`);
- a tool result without a `name` gets the name of the call it answers (templates that print it need it);
- `developer` becomes `system` unless the template has a developer role of its own;
- system messages after the first turn are merged into the leading system message (or, when the
  template rejects system messages entirely, folded into the first user turn);
- consecutive user (or plain assistant) messages are merged;
- media parts in any client shape are pulled out, in order, into MediaItems, and replaced by the
  processor-style `{"type": "image"}` (…audio, video) placeholders the templates understand.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from gallery.errors import RequestError
from runtime.jsonvalue import json_text_size, load_json

MediaKind = Literal["image", "audio", "video"]

_PART_KINDS: dict[str, MediaKind] = {
    "image_url": "image",
    "input_image": "image",
    "image": "image",
    "input_audio": "audio",
    "audio": "audio",
    "audio_url": "audio",
    "video": "video",
    "video_url": "video",
    "input_video": "video",
}
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
MAX_MESSAGES = 4096


@dataclasses.dataclass
class MediaItem:
    """One media input as the client sent it (decoded later): its kind, the raw reference and a format hint."""

    kind: MediaKind
    data: Any
    format: str | None = None


@dataclasses.dataclass
class NormalizedChat:
    """Messages ready for the template, the media they reference (in order), and what was changed."""

    messages: list[dict[str, Any]]
    media: list[MediaItem]
    changes: list[str]


def _as_dict(obj: Any, what: str) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        data = dump()
        if isinstance(data, dict):
            return data
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    raise RequestError(f"{what} must be an object, got {type(obj).__name__}")


def _media_reference(part: dict[str, Any], part_type: str) -> tuple[Any, str | None]:
    """The payload of a media part, across the shapes clients use."""
    value = part.get(part_type)
    if part_type == "input_image" and value is None:
        value = part.get("image_url")
    if part_type == "input_audio":
        payload = _as_dict(value, "input_audio") if value is not None else {}
        return payload.get("data"), payload.get("format")
    if value is None:
        for key in ("url", "data", "image_url", "path", "file"):
            if part.get(key) is not None:
                value = part[key]
                break
    if value is not None and not isinstance(value, (str, bytes)):
        inner = _as_dict(value, part_type)
        value = inner.get("url") or inner.get("data") or inner.get("path")
    return value, part.get("format")


def _normalize_content(content: Any, media: list[MediaItem], where: str) -> tuple[Any, bool]:
    """Content as a string (text only) or a list of parts with media placeholders. Returns (content, had_media)."""
    if content is None or isinstance(content, str):
        return content, False
    if isinstance(content, Mapping) or not isinstance(content, Sequence):
        content = [content]
    parts: list[dict[str, Any]] = []
    had_media = False
    for index, raw in enumerate(content):
        if isinstance(raw, str):
            parts.append({"type": "text", "text": raw})
            continue
        part = _as_dict(raw, f"{where} part {index}")
        part_type = str(part.get("type") or "")
        if not part_type:
            part_type = next((key for key in _PART_KINDS if key in part), "text" if "text" in part else "")
        if part_type in _TEXT_PART_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(f"{where} part {index}: a text part needs a string 'text'")
            parts.append({"type": "text", "text": text})
        elif part_type in _PART_KINDS:
            kind = _PART_KINDS[part_type]
            data, fmt = _media_reference(part, part_type)
            if data is None or data == "":
                raise RequestError(f"{where} part {index}: {part_type} part has no data or URL")
            media.append(MediaItem(kind=kind, data=data, format=fmt))
            parts.append({"type": kind})
            had_media = True
        else:
            raise RequestError(f"{where} part {index}: unknown content part type {part_type!r}")
    if not had_media:
        return "\n".join(p["text"] for p in parts), False
    return parts, True


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise RequestError(f"{where}: tool_calls must be a list of tool calls", field="messages")
    calls = []
    for index, raw in enumerate(value):
        call = {k: v for k, v in _as_dict(raw, f"{where} tool call {index}").items() if v is not None}
        function = call.get("function")
        if function is None:
            raise RequestError(f"{where} tool call {index} has no function", field="messages")
        function = _as_dict(function, f"{where} tool call {index} function")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f"{where} tool call {index}: the function needs a name", field="messages")
        arguments = function.get("arguments")
        if arguments is None:
            function["arguments"] = {}
        elif isinstance(arguments, str):
            # Templates read a mapping (transformers' chat format, what vLLM passes); clients send a JSON string.
            # A string that is no JSON object (a model's broken call sent back) stays a string: templates print
            # it as it is, and the conversation goes on.
            try:
                parsed = load_json(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError):
                parsed = None
            if isinstance(parsed, dict):  # the template walks it: the same depth/text checks as the request
                json_text_size(parsed, "messages")
            if isinstance(parsed, dict):
                function["arguments"] = parsed
        elif not isinstance(arguments, Mapping):
            raise RequestError(
                f"{where} tool call {index}: arguments must be a JSON object or string", field="messages"
            )
        call["function"] = function
        call.setdefault("type", "function")
        calls.append(call)
    return calls


def _join(a: Any, b: Any) -> Any:
    if isinstance(a, str) and isinstance(b, str):
        return f"{a}\n\n{b}" if a and b else a or b
    parts_a = [{"type": "text", "text": a}] if isinstance(a, str) else list(a or [])
    parts_b = [{"type": "text", "text": b}] if isinstance(b, str) else list(b or [])
    return parts_a + parts_b


def normalize_messages(
    raw_messages: Any,
    *,
    supports_system: bool = True,
    supports_developer: bool = False,
    content_as_parts: bool = False,
) -> NormalizedChat:
    """Normalize a chat request's messages (see the module docstring). Raises RequestError.

    supports_developer: the template has a `developer` role of its own (kept as it is).
    content_as_parts: the template renders only list-of-parts content (string content would be dropped),
    so every string content becomes `[{"type": "text", "text": …}]`.
    """
    if (
        raw_messages is None
        or isinstance(raw_messages, (str, bytes, Mapping))
        or not isinstance(raw_messages, Sequence)
    ):
        raise RequestError("messages must be a list of message objects", field="messages")
    if not raw_messages:
        raise RequestError("messages is empty", field="messages")
    if len(raw_messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages ({len(raw_messages)} > {MAX_MESSAGES})", field="messages")
    media: list[MediaItem] = []
    changes: list[str] = []
    cleaned: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for index, raw in enumerate(raw_messages):
        where = f"message {index}"
        given = _as_dict(raw, where)
        # None values are dropped (a client's `"name": null` means no name), except content: see the docstring.
        message = {k: v for k, v in given.items() if v is not None}
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(f"{where} has no role", field="messages")
        if role == "developer" and not supports_developer:
            role = "system"
            changes.append(f"{where}: developer role sent as system")
        if role not in ("system", "developer", "user", "assistant", "tool", "function", "ipython"):
            raise RequestError(f"{where}: unknown role {role!r}", field="messages")
        message["role"] = role
        content, _ = _normalize_content(message.get("content"), media, where)
        message["content"] = content
        if role == "tool" and content is not None and not isinstance(content, (str, list)):
            message["content"] = json.dumps(content)
        if "tool_calls" in message:
            message["tool_calls"] = _tool_calls(message["tool_calls"], where)
            if not message["tool_calls"]:
                del message["tool_calls"]
            for call in message.get("tool_calls", []):
                if isinstance(call.get("id"), str):
                    call_names[call["id"]] = call["function"]["name"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise RequestError(f"{where}: tool_call_id must be a string", field="messages")
            if "name" not in message and call_id in call_names:
                message["name"] = call_names[call_id]
        if content is None and "tool_calls" not in message:
            message["content"] = ""  # only a turn that calls tools has no content (OpenAI's rule)
        cleaned.append(message)

    # System messages: one leading system message, as strict templates demand.
    systems = [m for m in cleaned if m["role"] == "system"]
    leading = cleaned[0]["role"] == "system"
    if len(systems) > 1 or (systems and not leading):
        merged = systems[0].get("content", "")
        for extra in systems[1:]:
            merged = _join(merged, extra.get("content", ""))
        cleaned = [m for m in cleaned if m["role"] != "system"]
        cleaned.insert(0, {"role": "system", "content": merged})
        changes.append("system messages after the first turn merged into the leading system message")
    if not supports_system and cleaned and cleaned[0]["role"] == "system":
        system = cleaned.pop(0)
        first_user = next((m for m in cleaned if m["role"] == "user"), None)
        if first_user is None:
            cleaned.insert(0, {"role": "user", "content": system.get("content", "")})
        else:
            first_user["content"] = _join(system.get("content", ""), first_user.get("content", ""))
        changes.append("this template rejects system messages: system text folded into the first user turn")

    # Consecutive same-role messages (plain user or plain assistant turns) merged.
    merged_list: list[dict[str, Any]] = []
    for message in cleaned:
        previous = merged_list[-1] if merged_list else None
        mergeable = (
            previous is not None
            and message["role"] == previous["role"]
            and message["role"] in ("user", "assistant")
            and "tool_calls" not in message
            and "tool_calls" not in previous
        )
        if mergeable:
            assert previous is not None
            previous["content"] = _join(previous.get("content", ""), message.get("content", ""))
            changes.append(f"consecutive {message['role']} messages merged")
        else:
            merged_list.append(message)
    if content_as_parts:
        for message in merged_list:
            if isinstance(message.get("content"), str):
                message["content"] = [{"type": "text", "text": message["content"]}]
    return NormalizedChat(messages=merged_list, media=media, changes=changes)
