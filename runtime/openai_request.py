"""OpenAI-shaped request bodies (chat completions, completions) as GenerationRequests.

One pydantic model per body, shared by the HTTP server (`/v1/chat/completions`, `/v1/completions`) and the
stdio `chat` / `complete` methods, so the two accept exactly the same fields. Every field is either
honoured or refused: an unknown key is an error naming it (a request that sets something this runtime
would silently ignore gets told so), and `n` > 1, `tool_choice: "required"`, `parallel_tool_calls: false`
and completion `echo`/`suffix`/`best_of` are refused by name. Beyond OpenAI's fields: `top_k`, `min_p`,
`repetition_penalty` and the penalties' context sizes, `ignore_eos`, `thinking_budget`, `enable_thinking`,
`chat_template_kwargs`, `num_draft_tokens`, `truncate`, and media lists (`images`, `audios`, `videos`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gallery.errors import RequestError
from runtime.jsonvalue import json_text_size, text_size
from runtime.request import (
    GenerationRequest,
    apply_tool_choice,
    attach_media,
    check_tools,
    logit_bias,
    media_items,
    response_format,
)


def one_line(exc: ValidationError) -> str:
    """A pydantic error as one line: `field: problem; field: problem`."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(item) for item in error["loc"]) or "params"
        message = (
            "not a field this runtime understands" if error["type"] == "extra_forbidden" else error["msg"]
        )
        parts.append(f"{where}: {message}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _walkable(cls, data: Any) -> Any:
        # Before pydantic or anything else recurses into a field: depth, lone surrogates (a model name too) and
        # integers too long for Python are refused by the field's name (a RequestError passes through pydantic).
        if isinstance(data, dict):
            for key, value in data.items():
                text_size(str(key), "params")  # an unknown key is named in the error: it must be text
                json_text_size(value, str(key))
        return data


class StreamOptions(_Params):
    """OpenAI's stream_options."""

    include_usage: bool = False


class _Common(_Params):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repeat_penalty: float | None = None
    repetition_context_size: int | None = None
    presence_penalty: float | None = None
    presence_context_size: int | None = None
    frequency_penalty: float | None = None
    frequency_context_size: int | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None  # an end-user id: recorded in logs, changes nothing
    ignore_eos: bool = False
    thinking_budget: int | None = None
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    num_draft_tokens: int | None = None
    truncate: bool = False
    images: list[str] = Field(default_factory=list)
    audios: list[str] = Field(default_factory=list)
    videos: list[str] = Field(default_factory=list)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported (send several requests: they are batched)")
        return value


class ChatParams(_Common):
    """`/v1/chat/completions` and stdio `chat`: messages (OpenAI shape, media parts allowed), tools, sampling."""

    messages: list[Any]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompleteParams(_Common):
    """`/v1/completions` and stdio `complete`: a raw prompt (no template); the prompt carries any media markers."""

    prompt: str
    logprobs: int | None = None  # the completions API's logprobs is the number of alternatives per token
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None


class TokenizeParams(_Params):
    """stdio `tokenize`: text, or messages to render with the template first."""

    text: str | None = None
    messages: list[Any] | None = None
    tools: list[dict[str, Any]] | None = None
    enable_thinking: bool | None = None


class DetokenizeParams(_Params):
    """stdio `detokenize`: token ids."""

    tokens: list[int] = Field(max_length=1_000_000)

    @field_validator("tokens")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if any(token < 0 for token in value):
            raise ValueError("token ids must not be negative")
        return value


class LoadParams(_Params):
    """stdio `load`: a model spec, options (`["key:value", …]` or an object) and the base folder."""

    model: str = Field(min_length=1)
    options: list[str] | dict[str, Any] | None = None
    model_path: str | None = None


def _common(request: GenerationRequest, params: _Common) -> GenerationRequest:
    request.max_tokens = params.max_completion_tokens or params.max_tokens
    request.temperature = params.temperature
    request.top_p = params.top_p
    request.top_k = params.top_k
    request.min_p = params.min_p
    # `is not None`, not `or`: a 0 sent by the client must be refused by the check, not read as "unset".
    request.repeat_penalty = (
        params.repetition_penalty if params.repetition_penalty is not None else params.repeat_penalty
    )
    request.repetition_context_size = params.repetition_context_size
    request.presence_penalty = params.presence_penalty
    request.presence_context_size = params.presence_context_size
    request.frequency_penalty = params.frequency_penalty
    request.frequency_context_size = params.frequency_context_size
    request.logit_bias = logit_bias(params.logit_bias)
    request.seed = params.seed
    request.stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    request.response_format = response_format(params.response_format)
    request.ignore_eos = params.ignore_eos
    request.thinking_budget = params.thinking_budget
    request.num_draft_tokens = params.num_draft_tokens
    request.truncate = params.truncate
    request.enable_thinking = params.enable_thinking
    kwargs = dict(params.chat_template_kwargs or {})
    if "enable_thinking" in kwargs:
        value = kwargs.pop("enable_thinking")
        if not isinstance(value, bool):
            raise RequestError(
                "chat_template_kwargs.enable_thinking must be true or false", field="chat_template_kwargs"
            )
        if request.enable_thinking is None:
            request.enable_thinking = value
    if params.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", params.reasoning_effort)
    request.template_kwargs = kwargs
    return request


def chat_request(params: ChatParams) -> GenerationRequest:
    """A chat GenerationRequest: tools checked and chosen by tool_choice, media lists attached."""
    tools, required = apply_tool_choice(check_tools(params.tools, "tools"), params.tool_choice)
    messages = [dict(m) if isinstance(m, dict) else m for m in params.messages]
    extra = media_items(params.images, params.audios, params.videos)
    if extra:
        messages = attach_media(messages, extra)
    request = _common(GenerationRequest(messages=messages, tools=tools, tools_required=required), params)
    request.parallel_tool_calls = params.parallel_tool_calls is not False
    request.logprobs = params.logprobs
    request.top_logprobs = params.top_logprobs or 0
    return request


def complete_request(params: CompleteParams) -> GenerationRequest:
    """A raw-prompt GenerationRequest."""
    request = _common(
        GenerationRequest(
            prompt=params.prompt, media=media_items(params.images, params.audios, params.videos)
        ),
        params,
    )
    request.logprobs = params.logprobs is not None
    request.top_logprobs = params.logprobs or 0
    return request
