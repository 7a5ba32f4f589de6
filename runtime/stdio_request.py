"""Parameters of the stdio JSON-RPC methods, validated by pydantic, and their GenerationRequests.

`chat` takes OpenAI-style chat-completion params (unknown keys such as `n` or `user` are ignored, so
an OpenAI request body can be passed as is); `complete` takes a raw prompt. Sampling keys left out
fall back to the load options, then to the config's defaults.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.engine import GenerationRequest
from runtime.grpc_request import apply_tool_choice, attach_media, check_size, check_tools, media_items


def one_line(exc: ValidationError) -> str:
    """A pydantic error as one line: `field: problem; field: problem`."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(item) for item in error["loc"]) or "params"
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Sampling(_Params):
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    images: list[str] = Field(default_factory=list)
    audios: list[str] = Field(default_factory=list)
    videos: list[str] = Field(default_factory=list)
    stream: bool = True
    model: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 64:
            raise ValueError("at most 64 stop strings")
        return value


class ChatParams(_Sampling):
    """`chat`: messages (OpenAI shape, media parts allowed), tools, sampling, media lists."""

    messages: list[Any]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompleteParams(_Sampling):
    """`complete`: a raw prompt (no template), sampling, media lists (the prompt carries the markers)."""

    prompt: str


class LoadParams(_Params):
    """`load`: a model spec, options (`["key:value", …]` or an object) and the base folder."""

    model: str = Field(min_length=1)
    options: list[str] | dict[str, Any] | None = None
    model_path: str | None = None


class TokenizeParams(_Params):
    """`tokenize`: text, or messages to render with the template first."""

    text: str | None = None
    messages: list[Any] | None = None
    tools: list[dict[str, Any]] | None = None
    enable_thinking: bool | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TokenizeParams:
        if (self.text is None) == (self.messages is None):
            raise ValueError("send either text or messages")
        return self


class DetokenizeParams(_Params):
    """`detokenize`: token ids."""

    tokens: list[int] = Field(max_length=1_000_000)

    @field_validator("tokens")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if any(token < 0 for token in value):
            raise ValueError("token ids must not be negative")
        return value


def _sampling(request: GenerationRequest, params: _Sampling) -> GenerationRequest:
    request.max_tokens = params.max_tokens or params.max_completion_tokens
    request.temperature = params.temperature
    request.top_p = params.top_p
    request.top_k = params.top_k
    request.min_p = params.min_p
    request.repeat_penalty = params.repeat_penalty or params.repetition_penalty
    request.seed = params.seed
    request.stop = [params.stop] if isinstance(params.stop, str) else [s for s in params.stop or [] if s]
    request.enable_thinking = params.enable_thinking
    kwargs = dict(params.chat_template_kwargs or {})
    if "enable_thinking" in kwargs and request.enable_thinking is None:
        request.enable_thinking = bool(kwargs.pop("enable_thinking"))
    request.template_kwargs = kwargs
    return request


def chat_request(params: ChatParams, *, max_request_bytes: int) -> GenerationRequest:
    """A chat GenerationRequest: tools checked and filtered by tool_choice, media lists attached."""
    tools = apply_tool_choice(check_tools(params.tools, "tools"), params.tool_choice)
    messages = [dict(m) if isinstance(m, dict) else m for m in params.messages]
    extra = media_items(params.images, params.audios, params.videos)
    if extra:
        messages = attach_media(messages, extra)
    request = _sampling(GenerationRequest(messages=messages, tools=tools), params)
    check_size(request, max_request_bytes)
    return request


def complete_request(params: CompleteParams, *, max_request_bytes: int) -> GenerationRequest:
    """A raw-prompt GenerationRequest."""
    request = _sampling(GenerationRequest(prompt=params.prompt,
                                          media=media_items(params.images, params.audios, params.videos)), params)
    check_size(request, max_request_bytes)
    return request
