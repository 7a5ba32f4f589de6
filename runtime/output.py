"""The output processor: one request's text pipeline, from decoder token events to the events a caller reads.

Each `TokenEvent` (backends.decoder: a token, its text, its log-probabilities, the decoder's finish reason)
goes through stop strings, the reasoning split and tool-call extraction (runtime.textstream); the one stop
check (`check_stop`) decides whether the answer ends here and why; `finish` closes the answer with its
finish reason, usage and timings. Nothing here touches a decoder or a thread: the scheduler calls it on the
worker thread and sends what it returns.
"""

from __future__ import annotations

import dataclasses
import time

from backends import tool_parser
from backends.decoder import FinishReason, TokenEvent
from gallery.config import ModelConfig
from runtime.prepare import ROUTE_NAMES, Prepared
from runtime.request import Event, Timings, TokenLogprob, Usage
from runtime.textstream import ReasoningSplitter, StopStringMatcher, ToolCallExtractor


def check_stop(
    decoder_finish: FinishReason | None, stops: StopStringMatcher, tools: ToolCallExtractor | None = None
) -> FinishReason | None:
    """Whether the answer ends at this token, and why: a stop string in its text, or the last tool call it may
    make (parallel_tool_calls false), else the decoder's reason (one of the request's stop ids, or its token
    limit). The one place a request is judged stopped."""
    if stops.stopped or (tools is not None and tools.complete):
        return FinishReason.STOP
    return decoder_finish


@dataclasses.dataclass
class Outcome:
    """What one token event did to a request: output to send, and whether (and why) the answer ended."""

    event: Event | None
    finish: FinishReason | None = None
    error: str | None = None
    cut: bool = False  # a stop string ended it while the decoder would go on: drop it from the decoder


class OutputProcessor:
    """Turns one request's token events into events: text pipeline, log-probabilities, counters, the end."""

    def __init__(self, prepared: Prepared, config: ModelConfig) -> None:
        self.prepared = prepared
        self.route = ROUTE_NAMES[prepared.route]
        reasoning = config.mlx.reasoning
        self.stops = StopStringMatcher(prepared.stops)
        self.splitter = ReasoningSplitter(
            reasoning.start if reasoning.supported else None,
            reasoning.end if reasoning.supported else None,
            thinking=prepared.thinking,
            starts_inside=prepared.starts_inside,
        )
        tool_calls = config.mlx.tool_calls
        fmt = tool_calls.format if prepared.tools else None
        self.tools = ToolCallExtractor(
            fmt,
            tool_calls.start,
            tool_calls.end,
            prepared.tools,
            library=tool_parser(fmt) if fmt else (None, None, None),
            max_calls=prepared.max_tool_calls,
        )
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_tokens = len(prepared.prompt_ids) if prepared.prompt_ids is not None else 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.draft_accepted = 0
        self.draft_proposed = 0

    def pipe(self, text: str, *, final: bool = False) -> Event:
        """Run text through stop strings, reasoning split and tool extraction."""
        event = Event(route=self.route)
        visible = self.stops.feed(text) if text else ""
        if final:
            visible += self.stops.flush()
        pieces = self.splitter.feed(visible) if visible else []
        if final:
            pieces += self.splitter.flush()
        for piece in pieces:
            if piece.kind == "reasoning":
                event.reasoning += piece.text
                continue
            content, calls = self.tools.feed(piece.text)
            event.content += content
            event.tool_calls.extend(calls)
        if final:
            content, calls = self.tools.flush()
            event.content += content
            event.tool_calls.extend(calls)
        return event

    def on_token(self, token: TokenEvent) -> Outcome:
        """Take one token event: count it, pipe its text, and say whether the answer ended."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token.prompt_tokens is not None:
            self.prompt_tokens = token.prompt_tokens
        if token.cached_tokens is not None:
            self.cached_tokens = token.cached_tokens
        if token.finish is not None and token.finish.aborted:
            return Outcome(None, token.finish, token.error)
        if token.token is not None:
            self.completion_tokens += 1
            self.draft_accepted += int(token.from_draft)
            if self.splitter.inside:
                self.reasoning_tokens += 1
        if token.drafts_proposed is not None:
            self.draft_proposed = token.drafts_proposed
        event = self.pipe(token.text or "")
        if token.logprobs is not None:
            lp = token.logprobs
            event.logprobs.append(TokenLogprob(lp.text, lp.token, lp.logprob, list(lp.top)))
        finish = check_stop(token.finish, self.stops, self.tools)
        return Outcome(event, finish, cut=finish is not None and token.finish is None)

    def finish(self, reason: FinishReason, pending: Event | None = None, error: str | None = None) -> Event:
        """The final event: the text held back, the finish reason, usage and timings."""
        clean = error is None and not reason.aborted
        tail = self.pipe("", final=True) if clean else Event(route=self.route)
        final = pending or Event(route=self.route)
        final.content += tail.content
        final.reasoning += tail.reasoning
        final.tool_calls.extend(tail.tool_calls)
        finish = check_stop(reason, self.stops) if not reason.aborted else reason
        if clean and (final.tool_calls or (self.tools.calls and finish is FinishReason.STOP)):
            finish = FinishReason.TOOL_CALLS
        params = self.prepared.params
        final.done = True
        final.finish_reason = finish
        final.error = error
        final.seed = params.seed if not params.greedy else None
        final.stop_sequence = self.stops.matched if finish is FinishReason.STOP else None
        final.usage = self.usage()
        final.timings = self._timings()
        return final

    def usage(self) -> Usage:
        """Token counts so far."""
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            reasoning_tokens=self.reasoning_tokens,
            draft_tokens_accepted=self.draft_accepted,
            draft_tokens_proposed=self.draft_proposed,
        )

    def _timings(self) -> Timings:
        now = time.perf_counter()
        first = self.first_token_at or now
        prompt_s = max(first - self.started, 0.0)
        generation_s = max(now - first, 0.0)
        computed = max(self.prompt_tokens - self.cached_tokens, 0)
        return Timings(
            queued_s=max(self.started - self.prepared.submitted, 0.0),
            prompt_s=prompt_s,
            generation_s=generation_s,
            prompt_tps=computed / prompt_s if prompt_s > 0 and self.first_token_at else 0.0,
            generation_tps=(self.completion_tokens - 1) / generation_s
            if generation_s > 0 and self.completion_tokens > 1
            else 0.0,
        )


def unstarted(reason: FinishReason, error: str | None) -> Event:
    """The final event of a request that never reached a decoder (cancelled in the queue, shutdown)."""
    return Event(done=True, finish_reason=reason, usage=Usage(), timings=Timings(), error=error)
