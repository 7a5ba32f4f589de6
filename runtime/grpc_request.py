"""LocalAI's PredictOptions (gRPC) as a GenerationRequest: every field honoured, or refused by name.

Proto3 cannot tell 0 from unset, so 0 (or an empty string) means "the default" for every field, and the
neutral value of a sampling knob LocalAI fills from its own config (TypicalP 1, TailFreeSamplingZ 1) is
accepted as "off". A field that would change the answer and that this runtime cannot honour (Mirostat,
typical-p, tail-free sampling, a negative prompt, RoPE frequency overrides, embeddings input) refuses
the request naming the field; fields that only tune llama.cpp's resources (Threads, Batch, F16KV, MLock,
MMap, MainGPU, TensorSplit, prompt-cache files, Debug) change no answer and need nothing.
Everything here is pure and raises RequestError with a one-line message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gallery.errors import RequestError
from runtime.request import (
    GenerationRequest,
    ResponseFormat,
    apply_tool_choice,
    attach_media,
    check_tools,
    logit_bias,
    media_items,
    parse_bool,
    parse_json,
    response_format,
)

# Metadata keys this runtime reads (anything else is refused: it would be silently ignored otherwise).
METADATA_KEYS = (
    "enable_thinking",
    "reasoning_effort",
    "chat_template_kwargs",
    "response_format",
    "thinking_budget",
    "truncate",
    "parallel_tool_calls",
)


def parse_tool_choice(text: str) -> Any:
    """ToolChoice arrives as JSON (`"auto"`, `{"type": "function", …}`) or as a bare word."""
    text = text.strip()
    if not text:
        return None
    if text[0] in '{["':
        return parse_json(text, "ToolChoice")
    return text


def _metadata(request: GenerationRequest, metadata: Mapping[str, str]) -> None:
    """Thinking switch, template kwargs, structured output, thinking budget and truncation from Metadata."""
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        raise RequestError(
            f"Metadata {', '.join(repr(k) for k in unknown)}: not understood by this runtime "
            f"(known: {', '.join(METADATA_KEYS)})",
            field="Metadata",
        )
    kwargs: dict[str, Any] = {}
    raw_kwargs = metadata.get("chat_template_kwargs")
    if raw_kwargs:
        parsed = parse_json(raw_kwargs, "Metadata chat_template_kwargs")
        if not isinstance(parsed, dict):
            raise RequestError("Metadata chat_template_kwargs: must be a JSON object", field="Metadata")
        kwargs.update(parsed)
    if "enable_thinking" in kwargs:
        request.enable_thinking = parse_bool(
            kwargs.pop("enable_thinking"), "chat_template_kwargs.enable_thinking"
        )
    if metadata.get("enable_thinking", "").strip():
        request.enable_thinking = parse_bool(metadata["enable_thinking"], "Metadata enable_thinking")
    effort = metadata.get("reasoning_effort", "").strip()
    if effort:
        kwargs.setdefault("reasoning_effort", effort)
    request.template_kwargs = kwargs
    if metadata.get("response_format", "").strip():
        request.response_format = response_format(
            parse_json(metadata["response_format"], "Metadata response_format"), "Metadata response_format"
        )
    if metadata.get("thinking_budget", "").strip():
        try:
            request.thinking_budget = int(metadata["thinking_budget"])
        except ValueError:
            raise RequestError("Metadata thinking_budget: must be an integer", field="Metadata") from None
    if metadata.get("truncate", "").strip():
        request.truncate = parse_bool(metadata["truncate"], "Metadata truncate")
    if metadata.get("parallel_tool_calls", "").strip():
        request.parallel_tool_calls = parse_bool(
            metadata["parallel_tool_calls"], "Metadata parallel_tool_calls"
        )


def _refuse_unsupported(options: Any) -> None:
    """Refuse fields that would change the answer and that this runtime cannot honour."""
    checks = (
        ("Mirostat", options.Mirostat != 0),
        ("TypicalP", options.TypicalP not in (0.0, 1.0)),
        ("TailFreeSamplingZ", options.TailFreeSamplingZ not in (0.0, 1.0)),
        ("NegativePrompt", bool(options.NegativePrompt)),
        ("NegativePromptScale", options.NegativePromptScale not in (0.0, 1.0)),
        ("RopeFreqBase", options.RopeFreqBase != 0),
        ("RopeFreqScale", options.RopeFreqScale not in (0.0, 1.0)),
        ("PenalizeNL", options.PenalizeNL),
        ("NKeep", options.NKeep != 0),
        ("EmbeddingTokens", bool(options.EmbeddingTokens)),
        ("Embeddings", bool(options.Embeddings)),
    )
    refused = [name for name, active in checks if active]
    if refused:
        raise RequestError(
            f"{', '.join(refused)}: not supported by this runtime (mlx-lm / mlx-vlm sampling); "
            "unset or send the neutral value",
            field=refused[0],
        )


def _grammar(text: str) -> ResponseFormat:
    """LocalAI's Grammar field is llama.cpp's GBNF: converted to a Lark grammar for llguidance."""
    from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

    try:
        return ResponseFormat("lark", gbnf_to_lark(text))
    except (GbnfToLarkError, ValueError, RuntimeError) as exc:
        raise RequestError(
            f"Grammar: not a GBNF grammar llguidance can read ({' '.join(str(exc).split())[:200]})",
            field="Grammar",
        ) from None


def predict_request(options: Any) -> GenerationRequest:
    """A GenerationRequest from PredictOptions. Raises RequestError naming the field at fault."""
    _refuse_unsupported(options)
    media = media_items(options.Images, options.Audios, options.Videos)
    tools = check_tools(parse_json(options.Tools, "Tools"), "Tools") if options.Tools.strip() else None
    tools, required = apply_tool_choice(tools, parse_tool_choice(options.ToolChoice), "ToolChoice")
    use_messages = bool(options.Messages) and (options.UseTokenizerTemplate or not options.Prompt)
    request = GenerationRequest(
        tools=tools, tools_required=required, correlation_id=options.CorrelationId or None
    )
    _metadata(request, options.Metadata)
    if use_messages:
        messages = [
            message_dict(
                m.role,
                m.content,
                name=m.name,
                tool_call_id=m.tool_call_id,
                reasoning=m.reasoning_content,
                tool_calls=m.tool_calls,
                index=i,
            )
            for i, m in enumerate(options.Messages)
        ]
        request.messages = attach_media(messages, media)
    elif options.Prompt:
        request.prompt = options.Prompt
        request.media = media
    else:
        raise RequestError(
            "empty request: send Messages (with UseTokenizerTemplate) or a Prompt", field="Prompt"
        )
    request.stop = [stop for stop in options.StopPrompts if stop]
    request.max_tokens = options.Tokens if options.Tokens > 0 else None
    request.temperature = float(options.Temperature)  # 0 is greedy decoding, as in llama.cpp
    request.top_p = float(options.TopP) if options.TopP != 0 else None
    request.top_k = int(options.TopK) if options.TopK != 0 else None
    request.min_p = float(options.MinP) if options.MinP != 0 else None
    request.repeat_penalty = float(options.Penalty) if options.Penalty != 0 else None
    request.repetition_context_size = options.Repeat if options.Repeat != 0 else None
    request.presence_penalty = float(options.PresencePenalty) if options.PresencePenalty != 0 else None
    request.frequency_penalty = float(options.FrequencyPenalty) if options.FrequencyPenalty != 0 else None
    request.seed = int(options.Seed) if options.Seed > 0 else None  # a negative Seed means "random"
    request.ignore_eos = bool(options.IgnoreEOS)
    request.logprobs = options.Logprobs > 0 or options.TopLogprobs > 0
    request.top_logprobs = (
        max(int(options.TopLogprobs), 0)
        if options.TopLogprobs > 0
        else (max(int(options.Logprobs), 0) if options.Logprobs > 1 else 0)
    )
    request.num_draft_tokens = options.NDraft if options.NDraft != 0 else None
    if options.LogitBias.strip():
        request.logit_bias = logit_bias(parse_json(options.LogitBias, "LogitBias"), "LogitBias")
    if options.Grammar.strip():
        if request.response_format is not None:
            raise RequestError("send Grammar or Metadata response_format, not both", field="Grammar")
        request.response_format = _grammar(options.Grammar)
    return request


def message_dict(
    role: str,
    content: str,
    *,
    name: str = "",
    tool_call_id: str = "",
    reasoning: str = "",
    tool_calls: str = "",
    index: int = 0,
) -> dict[str, Any]:
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
            raise RequestError(
                f"Messages[{index}].tool_calls: must be a JSON array of tool calls", field="Messages"
            )
        message["tool_calls"] = calls
    return message
