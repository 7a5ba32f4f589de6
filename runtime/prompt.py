"""Turn a request into the exact prompt: the pinned template, rendered in the sandbox.

The thinking switch is passed explicitly on every request (mlx-lm turns thinking on whenever
`<think>` is in the vocabulary, mlx-vlm turns it off; passing it ourselves makes both routes render
the same prompt, the one the template's author meant by default).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gallery.chat_template import TemplateError, render_chat
from gallery.config import ModelConfig
from gallery.errors import RequestError
from runtime.messages import MediaItem, NormalizedChat, normalize_messages

MAX_PROMPT_CHARS = 4 * 1024 * 1024
_RESERVED_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


@dataclasses.dataclass
class RenderedPrompt:
    """A prompt ready for a backend, with the media it references and how reasoning starts."""

    text: str
    media: list[MediaItem]
    thinking: bool
    starts_inside_reasoning: bool
    changes: list[str]


def thinking_setting(config: ModelConfig, requested: bool | None) -> bool:
    """The effective thinking switch: the request's, else the template's own default."""
    if requested is not None:
        return requested
    default = config.mlx.reasoning.default_enabled
    return True if default is None else default


def render_request_prompt(
    config: ModelConfig,
    messages: Any,
    *,
    tools: list[dict[str, Any]] | None = None,
    enable_thinking: bool | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> RenderedPrompt:
    """Normalize messages and render the pinned template. Raises RequestError."""
    template = config.mlx.chat_template
    if template.status != "pinned" or not template.text:
        raise RequestError(
            f"{config.name} has no chat template, so chat messages cannot be formatted as the model expects; "
            "send a raw prompt, or pin a template in the config (mlx.chat_template)"
        )
    chat = normalize_messages(
        messages,
        supports_system=template.supports_system,
        # A template that names the developer role (harmony's, for one) renders it itself.
        supports_developer="'developer'" in template.text or '"developer"' in template.text,
        content_as_parts=template.content_format == "parts",
    )
    check_media_allowed(config, chat.media)
    reasoning = config.mlx.reasoning
    thinking = thinking_setting(config, enable_thinking)
    kwargs: dict[str, Any] = {}
    for key, value in (template_kwargs or {}).items():
        if not isinstance(key, str) or key in _RESERVED_KWARGS:
            raise RequestError(f"chat_template_kwargs may not set {key!r}")
        kwargs[key] = value
    switch = reasoning.switch or "enable_thinking"
    if switch != "reasoning_effort":
        kwargs.setdefault(switch, thinking)
    elif enable_thinking is not None and "reasoning_effort" not in kwargs:
        kwargs["reasoning_effort"] = "medium" if enable_thinking else "low"
    text = _render(template.text, chat, tools=tools, variables=template.variables, kwargs=kwargs)
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(
            f"the rendered prompt is {len(text)} characters, over the {MAX_PROMPT_CHARS} limit"
        )
    check_media_markers(config, text, chat.media)
    starts_inside = bool(reasoning.supported and reasoning.start and text.rstrip().endswith(reasoning.start))
    return RenderedPrompt(
        text=text,
        media=chat.media,
        thinking=thinking,
        starts_inside_reasoning=starts_inside,
        changes=chat.changes,
    )


def _render(
    template: str,
    chat: NormalizedChat,
    *,
    tools: list[dict[str, Any]] | None,
    variables: dict[str, Any],
    kwargs: dict[str, Any],
) -> str:
    """Render as transformers' apply_chat_template does (it drops None-valued keys, so `content: null` is a missing
    key); a template that fails on a missing content (`message.content.split(...)`, as the Qwen3 template does
    on an assistant turn that only calls tools) gets an empty string there instead, as vLLM passes it."""
    try:
        return render_chat(template, chat.messages, tools=tools, variables=variables, **kwargs)
    except TemplateError as exc:
        first_error = exc
    if not any(message.get("content", "") is None for message in chat.messages):
        raise RequestError(f"the chat template rejected this conversation: {first_error}") from None
    messages = [
        {**message, "content": ""} if message.get("content", "") is None else message
        for message in chat.messages
    ]
    try:
        text = render_chat(template, messages, tools=tools, variables=variables, **kwargs)
    except TemplateError:
        raise RequestError(f"the chat template rejected this conversation: {first_error}") from None
    chat.changes.append("null content sent as an empty string (the template cannot take a missing content)")
    return text


def check_media_markers(config: ModelConfig, prompt: str, media: list[MediaItem]) -> None:
    """Refuse media the prompt has no place for (the processor would encode it and the model never see it)."""
    pinned = config.mlx.media
    for kind, marker in (
        ("image", pinned.marker),
        ("audio", pinned.audio_token),
        ("video", pinned.video_token),
    ):
        count = sum(1 for item in media if item.kind == kind)
        if count and marker and prompt.count(marker) < count:
            raise RequestError(
                f"{count} {kind} input(s) sent but the prompt has only {prompt.count(marker)} {marker!r} "
                f"marker(s): the {kind} inputs would be dropped"
            )


def accepted_media(config: ModelConfig) -> set[str]:
    """The media kinds this config's towers accept."""
    media = config.mlx.media
    if config.backend != "mlx-vlm":
        return set()
    return {
        kind for kind, on in (("image", media.image), ("audio", media.audio), ("video", media.video)) if on
    }


def check_media_allowed(config: ModelConfig, media: list[MediaItem]) -> None:
    """Refuse media the model cannot see: a text config, or a kind with no tower."""
    if not media:
        return
    kinds = sorted({item.kind for item in media})
    if config.backend != "mlx-vlm":
        raise RequestError(
            f"{config.name} runs on the mlx (text-only) backend and cannot take {'/'.join(kinds)} input; "
            "use a vision-language model, or re-import with --backend mlx-vlm if the checkpoint has a vision tower"
        )
    unsupported = sorted(set(kinds) - accepted_media(config))
    if unsupported:
        raise RequestError(
            f"{config.name} has no {'/'.join(unsupported)} tower; it accepts "
            f"{'/'.join(sorted(accepted_media(config))) or 'text only'}"
        )
