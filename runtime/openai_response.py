"""Answers in OpenAI's JSON shapes: usage (with cached and reasoning tokens), tool calls, log-probabilities.

Shared by the HTTP server, the stdio protocol and the gRPC reply's `logprobs` field, so every interface
reports the same numbers the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from runtime.request import Timings, TokenLogprob, Usage
from runtime.textstream import ToolCall


def usage_json(usage: Usage | None) -> dict[str, Any]:
    """OpenAI's usage, with prompt_tokens_details.cached_tokens and completion_tokens_details.reasoning_tokens."""
    usage = usage or Usage()
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "accepted_prediction_tokens": usage.draft_tokens_accepted,
        },
    }
    if usage.draft_tokens_proposed:
        # A drafter ran: OpenAI's rejected_prediction_tokens, and the drafts proposed (this project's extra field).
        # mlx-vlm counts drafts per verification round, so a round cut by the end of the answer counts whole.
        rejected = max(usage.draft_tokens_proposed - usage.draft_tokens_accepted, 0)
        body["completion_tokens_details"]["rejected_prediction_tokens"] = rejected
        body["draft_tokens_proposed"] = usage.draft_tokens_proposed
    return body


def timings_json(timings: Timings | None) -> dict[str, float]:
    """Timings in seconds and rates (non-finite numbers become 0: JSON has no infinity)."""
    timings = timings or Timings()
    return {
        key: round(value if math.isfinite(value) else 0.0, 6)
        for key, value in dataclasses.asdict(timings).items()
    }


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI-shaped tool calls."""
    return [
        {
            "index": call.index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in calls
    ]


def _token_json(text: str, logprob: float) -> dict[str, Any]:
    return {
        "token": text,
        "logprob": logprob if math.isfinite(logprob) else -9999.0,
        "bytes": list(text.encode("utf-8", "surrogatepass")),
    }


def logprobs_json(items: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat logprobs object: {"content": [{token, logprob, bytes, top_logprobs: [...]}, …]}."""
    return {
        "content": [
            {
                **_token_json(item.token, item.logprob),
                "top_logprobs": [_token_json(text, logprob) for text, _id, logprob in item.top],
            }
            for item in items
        ]
    }
