"""Prepare a request on the caller's thread, so bad input fails before it queues.

Preparing renders the pinned template (or takes the raw prompt), decodes media, tokenizes text-route
prompts and enforces the context size, resolves every sampling value (request, then load options, then
the config's defaults), compiles a structured-output grammar, and decides the route: media to the
vision path, text to the fastest text path. The worker thread then only generates.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

from backends.sampling import SamplingParams
from gallery.config import ModelConfig
from gallery.errors import RequestError
from runtime.media import DecodedMedia, MediaPolicy, decode_media
from runtime.prompt import check_media_allowed, check_media_markers, render_request_prompt, thinking_setting
from runtime.request import GenerationRequest, RequestLimits, check_request
from runtime.sampling import SamplingDefaults
from runtime.tool_grammar import needs_grammar_for_single_call, tool_call_grammar

Route = Literal["text", "text-route", "vlm"]
# What a route is called in answers and logs: the library that runs it.
ROUTE_NAMES: dict[Route, str] = {"text": "mlx", "text-route": "text-route", "vlm": "mlx-vlm"}


@dataclasses.dataclass
class Prepared:
    """A request ready for the worker."""

    route: Route
    prompt_text: str
    prompt_ids: list[int] | None  # None on the VLM route (mlx-vlm tokenizes with the media)
    media: DecodedMedia | None
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int]
    stops: list[str]
    thinking: bool
    starts_inside: bool
    tools: list[dict[str, Any]] | None
    logprobs: int | None
    grammar: str | None
    thinking_budget: int | None
    speculative: bool
    num_draft_tokens: int | None = None
    max_tool_calls: int | None = None  # parallel_tool_calls false: the answer ends after its first call
    truncated_tokens: int = 0
    submitted: float = dataclasses.field(default_factory=time.perf_counter)

    def cleanup(self) -> None:
        """Delete the request's temporary media files."""
        if self.media is not None:
            self.media.cleanup()


@dataclasses.dataclass
class Runtime:
    """What preparing needs to know about the loaded model (filled in by the engine once it has loaded)."""

    config: ModelConfig
    text_backend: Any | None  # mlx-lm backend for the text routes (the text model, or a VLM's text route)
    vlm_backend: Any | None
    limits: RequestLimits
    media_policy: MediaPolicy
    context_size: int | None
    speculative: bool  # a draft model is loaded for the text route
    vlm_for_text: bool  # text requests go to mlx-vlm too (no text route, or bundled MTP drafting there)
    sampling: SamplingDefaults  # load options over the config's parameters, merged once at load


def _pick(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _check_sampling_defaults(params: SamplingParams) -> None:
    # Defaults come from a config or load options, not a request: still never hand a bad one to the model.
    check_request(
        GenerationRequest(
            prompt="",
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            repeat_penalty=params.repetition_penalty,
        ),
        RequestLimits(),
    )


def prepare(request: GenerationRequest, runtime: Runtime) -> Prepared:
    """Validate, render, tokenize and route a request. Raises RequestError (one line, naming the field)."""
    config = runtime.config
    check_request(request, runtime.limits)
    if (request.messages is None) == (request.prompt is None):
        raise RequestError("send either messages (chat) or a prompt (raw completion)")
    if request.messages is not None:
        rendered = render_request_prompt(
            config,
            request.messages,
            tools=request.tools,
            enable_thinking=request.enable_thinking,
            template_kwargs=request.template_kwargs,
        )
        prompt, media_items = rendered.text, rendered.media + list(request.media)
        thinking, starts_inside = rendered.thinking, rendered.starts_inside_reasoning
    else:
        if not isinstance(request.prompt, str):
            raise RequestError("prompt must be a string", field="prompt")
        prompt, media_items = request.prompt, list(request.media)
        check_media_markers(config, prompt, media_items)
        thinking = thinking_setting(config, request.enable_thinking)
        reasoning = config.mlx.reasoning
        starts_inside = bool(
            reasoning.supported and reasoning.start and prompt.rstrip().endswith(reasoning.start)
        )
    check_media_allowed(config, media_items)
    params = runtime.sampling.params(request)
    _check_sampling_defaults(params)
    route: Route = (
        "vlm"
        if media_items or runtime.vlm_for_text or runtime.text_backend is None
        else ("text" if config.backend == "mlx" else "text-route")
    )
    backend = runtime.vlm_backend if route == "vlm" else runtime.text_backend
    assert backend is not None  # a route is only chosen for a backend that is loaded
    vocab = backend.vocab_size
    if params.logit_bias and max(params.logit_bias) >= vocab:
        raise RequestError(
            f"logit_bias token id {max(params.logit_bias)} is outside the vocabulary (0..{vocab - 1})",
            field="logit_bias",
        )
    # No limit from the request, the load options or the config: the rest of the context (OpenAI's default),
    # bounded by the runtime's max_tokens limit.
    max_tokens = _pick(
        request.max_tokens,
        runtime.sampling.max_tokens,
        runtime.limits.max_tokens,
    )
    max_tokens = min(int(max_tokens), runtime.limits.max_tokens)
    prompt_ids: list[int] | None = None
    truncated = 0
    context = runtime.context_size
    _refuse_long_prompt_early(
        prompt, backend, context, config.name, can_truncate=request.truncate and route != "vlm"
    )
    counted = backend.tokenize(prompt)
    if route != "vlm":
        prompt_ids = counted
    if context:
        if len(counted) >= context:
            if not request.truncate or route == "vlm":
                raise RequestError(
                    f"the prompt is {len(counted)} tokens, and the context of {config.name} is {context} "
                    "tokens (send a shorter conversation, or ask for truncation)",
                    field="messages",
                )
            keep = max(context - max_tokens, context // 2)
            truncated = len(counted) - keep
            prompt_ids = counted[-keep:]
            counted = prompt_ids
        max_tokens = max(1, min(max_tokens, context - len(counted)))
    stop_ids = frozenset() if request.ignore_eos else frozenset(config.mlx.stop_token_ids)
    _check_tools(request, config)
    budget_s = runtime.limits.grammar_budget_s
    grammar = _tool_grammar(request, config, backend, budget_s) or _grammar(request, backend, budget_s)
    budget = request.thinking_budget
    if budget is not None and not (config.mlx.reasoning.supported and config.mlx.reasoning.end):
        raise RequestError(
            f"thinking_budget: {config.name} has no reasoning block to limit", field="thinking_budget"
        )
    speculative = route != "vlm" and runtime.speculative
    vlm_drafts = runtime.vlm_backend is not None and runtime.vlm_backend.draft_model is not None
    if request.num_draft_tokens and not runtime.speculative and not vlm_drafts:
        raise RequestError(
            f"num_draft_tokens: {config.name} has no draft model (pin one in mlx.drafter)",
            field="num_draft_tokens",
        )
    media = decode_media(media_items, runtime.media_policy) if media_items else None
    # The config's stopwords are its stop tokens as text: with ignore_eos they stop nothing either.
    stops = list(dict.fromkeys([*([] if request.ignore_eos else config.stopwords), *request.stop]))
    return Prepared(
        route=route,
        prompt_text=prompt,
        prompt_ids=prompt_ids,
        media=media,
        params=params,
        max_tokens=max_tokens,
        stop_ids=stop_ids,
        stops=stops,
        thinking=thinking,
        starts_inside=starts_inside,
        tools=request.tools,
        logprobs=request.top_logprobs if request.logprobs else None,
        grammar=grammar,
        thinking_budget=budget,
        max_tool_calls=None if request.parallel_tool_calls or not request.tools else 1,
        speculative=speculative,
        num_draft_tokens=request.num_draft_tokens,
        truncated_tokens=truncated,
    )


def _grammar(request: GenerationRequest, backend: Any, budget_s: float) -> str | None:
    if request.response_format is None:
        return None
    from backends.grammar import GrammarError, compile_grammar, llg_tokenizer

    try:
        return compile_grammar(
            request.response_format.kind,
            request.response_format.value,
            llg_tokenizer(backend.hf_tokenizer),
            budget_s=budget_s,
        )
    except GrammarError as exc:
        raise RequestError(f"response_format: {exc}", field="response_format") from None


def _check_tools(request: GenerationRequest, config: ModelConfig) -> None:
    """Tools are honoured or refused, never dropped: a config without a tool-call format cannot parse calls."""
    if request.tools and not config.mlx.tool_calls.format:
        raise RequestError(
            f"{config.name} has no tool-call format pinned (mlx.tool_calls.format), so it cannot be offered tools: "
            "its calls could not be recognised. Send the request without tools, or pin the format in the config",
            field="tools",
        )
    if request.tools_required and request.response_format is not None:
        raise RequestError(
            "response_format cannot be combined with a required tool call (both would constrain the answer)",
            field="response_format",
        )


def _tool_grammar(
    request: GenerationRequest, config: ModelConfig, backend: Any, budget_s: float
) -> str | None:
    """The grammar that keeps tool_choice "required"/named and parallel_tool_calls false (None if not needed)."""
    tool_calls = config.mlx.tool_calls
    single = not request.parallel_tool_calls
    if not request.tools or not (
        request.tools_required or (single and needs_grammar_for_single_call(tool_calls))
    ):
        return None
    from backends.grammar import GrammarError, compile_grammar, llg_tokenizer, marker_lark

    lark = tool_call_grammar(
        tool_calls,
        request.tools,
        required=request.tools_required,
        single=single,
        template=config.mlx.chat_template.text or "",
        marker=lambda marker: marker_lark(marker, backend.hf_tokenizer),
    )
    try:
        return compile_grammar("lark", lark, llg_tokenizer(backend.hf_tokenizer), budget_s=budget_s)
    except GrammarError as exc:
        raise RequestError(
            f"tools: the tools' parameter schemas cannot be enforced ({exc})", field="tools"
        ) from None


# A prompt longer than this many characters per context token is measured on its head first.
_PROBE_CHARS_PER_TOKEN = 8


def _refuse_long_prompt_early(
    prompt: str, backend: Any, context: int | None, name: str, *, can_truncate: bool
) -> None:
    """Refuse a prompt whose head alone is over the context, before tokenizing all of it (a 4 MB prompt's
    tokens and offsets take hundreds of MB). A prefix has at most one token fewer than the text it starts."""
    if not context or can_truncate or len(prompt) <= context * _PROBE_CHARS_PER_TOKEN:
        return
    head = context * _PROBE_CHARS_PER_TOKEN
    tokens = len(backend.tokenize(prompt[:head])) - 1
    if tokens >= context:
        raise RequestError(
            f"the prompt is over {tokens} tokens (its first {head} of {len(prompt)} characters alone), and the "
            f"context of {name} is {context} tokens (send a shorter conversation, or ask for truncation)",
            field="messages",
        )
