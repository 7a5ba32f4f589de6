"""The one request model every interface speaks, its checks, and the events an answer streams as.

gRPC (PredictOptions), stdio (`chat`/`complete` params), the HTTP server (OpenAI bodies) and `gallery run`
each translate their wire format into a GenerationRequest and nothing else; `check_request` is the one
place that bounds sizes and validates every sampling value (ranges, finiteness, integer bounds), so a
value no interface should pass never reaches the model. An answer streams as Events; `Answer` folds them
into the whole answer (the only fold there is).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from gallery.errors import RequestError
from runtime.errors import RequestTooLarge
from runtime.jsonvalue import json_text_size, load_json
from runtime.messages import MediaItem
from runtime.textstream import ToolCall
from runtime.tool_grammar import strict_schema

MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1000
MAX_LOGIT_BIAS = 1024
MAX_PENALTY_CONTEXT = 1 << 20

GrammarKind = Literal["json_schema", "json_object", "regex", "lark"]


@dataclasses.dataclass
class ResponseFormat:
    """Structured output: a JSON schema, any JSON object, a regex or a Lark grammar the answer must match."""

    kind: GrammarKind
    value: str | dict[str, Any] | None = None  # the schema (or pattern, or grammar); None for json_object


@dataclasses.dataclass
class GenerationRequest:
    """One request: chat messages (rendered with the pinned template) or a raw prompt, and how to sample."""

    messages: Any = None
    prompt: str | None = None
    media: list[MediaItem] = dataclasses.field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tools_required: bool = False  # the answer must be tool calls (tool_choice "required" or a named function)
    parallel_tool_calls: bool = True  # False: at most one call
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repetition_context_size: int | None = None
    presence_penalty: float | None = None
    presence_context_size: int | None = None
    frequency_penalty: float | None = None
    frequency_context_size: int | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False  # the pinned stop ids stop nothing; max tokens and stop strings still do
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: ResponseFormat | None = None
    thinking_budget: int | None = None  # at most this many reasoning tokens, then the block is closed
    num_draft_tokens: int | None = None  # speculative decoding with the config's draft model
    truncate: bool = False  # left-truncate a prompt that does not fit the context (else it is refused)
    enable_thinking: bool | None = None
    template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    correlation_id: str | None = None


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What a runtime accepts (from its load options)."""

    max_request_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 32768
    grammar_budget_s: float = 0.5  # building a grammar's matcher may take at most this long


_MEDIA_KEYS = frozenset(("image", "audio", "video", "image_url", "input_audio", "video_url", "data"))


def _text_size(value: Any, field: str) -> int:
    """Bytes of the text inside a request part (media data walked but not counted: it is bounded separately).

    Refuses nesting, lone surrogates and too-long integers by the field's name (runtime.jsonvalue).
    """
    return json_text_size(value, field, uncounted=_MEDIA_KEYS)


def _number(
    value: Any, field: str, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{field} must be a number, got {value!r}", field=field)
    number = float(value)
    if not math.isfinite(number):
        raise RequestError(f"{field} must be a finite number, got {value!r}", field=field)
    if low is not None and (number <= low if low_open else number < low):
        raise RequestError(
            f"{field} must be {'above' if low_open else 'at least'} {low:g}, got {value!r}", field=field
        )
    if high is not None and number > high:
        raise RequestError(f"{field} must be at most {high:g}, got {value!r}", field=field)
    return number


def _integer(value: Any, field: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise RequestError(f"{field} must be an integer, got {value!r}", field=field)
    if not low <= value <= high:
        raise RequestError(f"{field} must be between {low} and {high}, got {value}", field=field)
    return int(value)


def check_request(request: GenerationRequest, limits: RequestLimits) -> None:
    """Refuse a request whose size or any sampling value is out of range. Raises RequestError naming the field."""
    size = (
        _text_size(request.prompt, "prompt")
        + _text_size(request.messages, "messages")
        + _text_size(request.tools, "tools")
        + _text_size(request.stop, "stop")
        + _text_size(request.response_format.value if request.response_format else None, "response_format")
    )
    _text_size(request.template_kwargs, "chat_template_kwargs")
    if size > limits.max_request_bytes:
        raise RequestTooLarge(
            f"request text is {size} bytes, over this runtime's limit of {limits.max_request_bytes} "
            "bytes (load option max_request_bytes)",
            field="messages",
        )
    if request.max_tokens is not None:
        _integer(request.max_tokens, "max_tokens", low=1, high=limits.max_tokens)
    if request.temperature is not None:
        _number(request.temperature, "temperature", low=0.0, high=100.0)
    if request.top_p is not None:
        _number(request.top_p, "top_p", low=0.0, high=1.0, low_open=True)
    if request.top_k is not None:
        _integer(request.top_k, "top_k", low=0, high=2**31 - 1)
    if request.min_p is not None:
        _number(request.min_p, "min_p", low=0.0, high=1.0)
    if request.repeat_penalty is not None:
        _number(request.repeat_penalty, "repetition_penalty", low=0.0, high=100.0, low_open=True)
    for field in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, field)
        if value is not None:
            _number(value, field, low=-2.0, high=2.0)
    for field in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
        value = getattr(request, field)
        if value is not None:
            _integer(value, field, low=1, high=MAX_PENALTY_CONTEXT)
    if request.seed is not None:
        _integer(request.seed, "seed", low=0, high=MAX_SEED)
    if request.logit_bias:
        if len(request.logit_bias) > MAX_LOGIT_BIAS:
            raise RequestError(
                f"logit_bias has {len(request.logit_bias)} entries, over {MAX_LOGIT_BIAS}", field="logit_bias"
            )
        for token, bias in request.logit_bias.items():
            _integer(token, "logit_bias token id", low=0, high=2**31 - 1)
            _number(bias, f"logit_bias[{token}]", low=-100.0, high=100.0)
    _integer(request.top_logprobs, "top_logprobs", low=0, high=MAX_TOP_LOGPROBS)
    if request.top_logprobs and not request.logprobs:
        raise RequestError("top_logprobs needs logprobs", field="top_logprobs")
    if request.thinking_budget is not None:
        _integer(request.thinking_budget, "thinking_budget", low=0, high=limits.max_tokens)
    if request.num_draft_tokens is not None:
        _integer(request.num_draft_tokens, "num_draft_tokens", low=1, high=64)
    if len(request.stop) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(request.stop)}", field="stop")
    for stop in request.stop:
        if not isinstance(stop, str) or not stop:
            raise RequestError("stop strings must be non-empty strings", field="stop")
        if len(stop) > MAX_STOP_CHARS:
            raise RequestError(
                f"a stop string is {len(stop)} characters, over {MAX_STOP_CHARS}", field="stop"
            )


# ----------------------------------------------------------------------------------------------- building
# What every interface needs to turn its wire format into a GenerationRequest.
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
        value = load_json(text)
    except (ValueError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise RequestError(f"{what}: not valid JSON ({detail})", field=what) from None
    json_text_size(value, what)
    return value


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


def apply_tool_choice(
    tools: list[dict[str, Any]] | None, choice: Any, what: str = "tool_choice"
) -> tuple[list[dict[str, Any]] | None, bool]:
    """OpenAI tool_choice as (the tools the prompt offers, whether the answer must call one).

    "auto" keeps the tools; "none" hides them; "required" (and "any", Anthropic's and LangChain's word) keeps
    them and requires a call; a named function keeps only that one and requires it. A requirement is enforced
    by constrained decoding over the config's own tool-call syntax (runtime.tool_grammar).
    """
    if choice in (None, "", "auto"):
        return tools, False
    if choice == "none":
        return None, False
    if choice in ("required", "any"):
        if not tools:
            raise RequestError(f"{what} {choice!r} needs tools", field="tool_choice")
        return tools, True
    if isinstance(choice, Mapping):
        function = choice.get("function") if isinstance(choice.get("function"), Mapping) else choice
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise RequestError(
                f'{what}: expected "auto", "none", "required" or {{"function": {{"name": …}}}}',
                field="tool_choice",
            )
        chosen = [tool for tool in tools or [] if tool.get("function", tool).get("name") == name]
        if not chosen:
            raise RequestError(
                f"{what} names {name!r}, which is not among the request's tools", field="tool_choice"
            )
        return chosen, True
    raise RequestError(f"{what}: unsupported value {choice!r}", field="tool_choice")


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


def logit_bias(value: Any, what: str = "logit_bias") -> dict[int, float] | None:
    """OpenAI's logit_bias (token id, as a string or an int, -> bias) as {int: float}."""
    if value is None or value == {}:
        return None
    if not isinstance(value, Mapping):
        raise RequestError(f"{what}: must be an object mapping token ids to biases", field="logit_bias")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"{what}: {key!r} is not a token id", field="logit_bias") from None
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise RequestError(f"{what}[{key}]: must be a number", field="logit_bias")
        bias[token] = float(amount)
    return bias


def response_format(value: Any, what: str = "response_format") -> ResponseFormat | None:
    """OpenAI's response_format: {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": …}}.

    Also takes this runtime's own {"type": "regex", "regex": …} and {"type": "lark", "lark": …}.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RequestError(f'{what}: must be an object with a "type"', field="response_format")
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, (Mapping, bool)):
            raise RequestError(f'{what}: json_schema needs a "schema" object', field="response_format")
        if not isinstance(schema, Mapping):
            return ResponseFormat("json_schema", {})
        if isinstance(spec, Mapping) and spec.get("strict") is True:
            # OpenAI's strict mode: no object admits keys beyond its properties.
            return ResponseFormat("json_schema", strict_schema(schema, "response_format.json_schema.schema"))
        return ResponseFormat("json_schema", dict(schema))
    if kind in ("regex", "lark"):
        pattern = value.get(kind)
        if not isinstance(pattern, str) or not pattern:
            raise RequestError(f'{what}: {kind} needs a non-empty "{kind}" string', field="response_format")
        return ResponseFormat(kind, pattern)
    raise RequestError(
        f"{what}: unsupported type {kind!r} (text, json_object, json_schema, regex, lark)",
        field="response_format",
    )


# ----------------------------------------------------------------------------------------------- answers
@dataclasses.dataclass
class Usage:
    """Token counts of one request. prompt_tokens counts the whole prompt (images expanded); cached_tokens is
    the part of it reused from the prefix cache; completion_tokens every token generated."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    draft_tokens_accepted: int = 0  # answer tokens that were drafts the model confirmed
    draft_tokens_proposed: int = 0  # drafts proposed for this request, accepted or not (mlx-vlm drafters)

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass
class Timings:
    """Where the time went, in seconds, and the rates."""

    queued_s: float = 0.0
    prompt_s: float = 0.0
    generation_s: float = 0.0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0


@dataclasses.dataclass
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives (OpenAI's logprobs shape)."""

    token: str
    id: int
    logprob: float
    top: list[tuple[str, int, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Event:
    """A streamed piece of an answer; the last one has done=True and the totals."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: str | None = None
    fault: str | None = None  # the runtime.faults kind of `error` when it is not a generation failure
    route: str | None = None
    seed: int | None = None  # the seed a sampled request used (its own, or the one drawn for it)
    stop_sequence: str | None = None  # the stop string that ended the answer (finish_reason "stop")

    @property
    def has_output(self) -> bool:
        """Whether the event carries anything for the client (text, reasoning, calls, logprobs)."""
        return bool(self.content or self.reasoning or self.tool_calls or self.logprobs)


@dataclasses.dataclass
class Completion:
    """A whole answer, folded from its events."""

    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    usage: Usage
    timings: Timings
    route: str | None
    error: str | None = None
    seed: int | None = None
    stop_sequence: str | None = None
    fault: str | None = None  # as Event.fault


class Answer:
    """Folds events into the whole answer, as they arrive (sync or async loops alike)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.logprobs: list[TokenLogprob] = []
        self.final: Event | None = None

    def add(self, event: Event) -> None:
        """Take one event."""
        self.content.append(event.content)
        self.reasoning.append(event.reasoning)
        self.tool_calls.extend(event.tool_calls)
        self.logprobs.extend(event.logprobs)
        if event.done:
            self.final = event

    def completion(self) -> Completion:
        """The whole answer so far (complete once the final event was added)."""
        final = self.final or Event(done=False)
        return Completion(
            "".join(self.content),
            "".join(self.reasoning),
            list(self.tool_calls),
            list(self.logprobs),
            final.finish_reason,
            final.usage or Usage(),
            final.timings or Timings(),
            final.route,
            final.error,
            final.seed,
            final.stop_sequence,
            final.fault,
        )


def fold(events: Iterable[Event]) -> Completion:
    """The whole answer of a stream of events."""
    answer = Answer()
    for event in events:
        answer.add(event)
    return answer.completion()
