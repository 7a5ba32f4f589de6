"""The one interface between the runtime and a decoder, and the types that cross it.

A decoder (backends.text_decoders: the continuous batch and per-request text streams; backends.vlm_decoder:
mlx-vlm streams, with or without a drafter; runtime.cluster's mirror of the batch across ranks) takes
`DecodeSpec`s, advances every request it holds by one step at a time, and reports `TokenEvent`s: the token,
its text (each decoder detokenizes its own requests, so mlx-lm and mlx-vlm routes look alike above it),
its log-probabilities with their texts, and the finish reason. The runtime drives any `Decoder` the same
way and never asks which one it is.

Stop ids are decided here, once per token, by `StopIds`; stop strings are text and belong to the runtime's
output pipeline (runtime.output). Finish reasons are a `str` enum, so the wire strings stay the same.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mlx.core import array as Array
    from PIL.Image import Image


class FinishReason(str, enum.Enum):
    """Why an answer ended; the value is what every interface sends."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CANCELLED = "cancelled"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value

    @property
    def aborted(self) -> bool:
        """Cancelled or failed: no tail of text is flushed, no tool call is reported."""
        return self in (FinishReason.CANCELLED, FinishReason.ERROR)


# A request's sampler: log-probabilities (batch, vocab) -> token ids; a processor: (tokens, logits) -> logits.
Sampler = Callable[["Array"], "Array"]
Processor = Callable[["Array", "Array"], "Array"]


class PrefillAborted(Exception):
    """Raised inside a prefill callback to stop processing a prompt whose request was cancelled."""


class StreamingDetokenizer(Protocol):
    """mlx-lm's streaming detokenizers (one per request: they hold state)."""

    def add_token(self, token: int) -> None:
        """Take the next token."""

    def finalize(self) -> None:
        """Flush what is held back."""

    @property
    def last_segment(self) -> str:
        """Text completed since the last read."""


class TextCodec(Protocol):
    """What a decoder needs from a backend to turn token ids into text."""

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids to text."""

    def detokenizer(self) -> StreamingDetokenizer | None:
        """A fresh streaming detokenizer (None: the library streams text itself)."""


class StopIds:
    """A request's stop token ids: the one place that decides whether a token id ends its answer."""

    def __init__(self, ids: Iterable[int]) -> None:
        self.ids = frozenset(ids)

    def __contains__(self, token: object) -> bool:
        value = token.item() if hasattr(token, "item") else token
        try:
            return int(value) in self.ids  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def sorted(self) -> list[int]:
        """The ids in order (what libraries take as their EOS list)."""
        return sorted(self.ids)


@dataclasses.dataclass
class DecodeSpec:
    """What a decoder needs to generate one answer."""

    uid: int
    max_tokens: int
    stop_ids: frozenset[int]
    sampler: Sampler | None = None
    processors: list[Processor] = dataclasses.field(default_factory=list)
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the top n alternatives
    prompt: list[int] = dataclasses.field(default_factory=list)  # text routes: the prompt's token ids
    prompt_text: str = ""  # VLM route: the rendered prompt (mlx-vlm tokenizes it with the media)
    images: list[Image] = dataclasses.field(default_factory=list)
    audio: list[str] = dataclasses.field(default_factory=list)
    video: list[str] = dataclasses.field(default_factory=list)
    media_key: tuple[str, ...] = ()  # content hashes of the media, in order
    speculative: bool = False  # use the draft model (text streams)
    num_draft_tokens: int | None = None
    should_stop: Callable[[], bool] = lambda: False  # checked between prompt chunks (cancel, shutdown)
    # Its JSON form (made on demand), for a decoder that replays it on other processes (runtime.cluster).
    wire: Callable[[], Mapping[str, object]] | None = None

    @functools.cached_property
    def stops(self) -> StopIds:
        """The stop ids as the one stop check (made once per request)."""
        return StopIds(self.stop_ids)

    def finish_after(self, token: int, produced: int) -> FinishReason | None:
        """Why the answer ends with its `produced`-th token `token`: a stop id, else the token limit (None: on)."""
        if token in self.stops:
            return FinishReason.STOP
        return FinishReason.LENGTH if produced >= self.max_tokens else None


@dataclasses.dataclass(frozen=True)
class Logprob:
    """A generated token's log-probability and its most likely alternatives, with their texts."""

    text: str
    token: int
    logprob: float
    top: tuple[tuple[str, int, float], ...] = ()


@dataclasses.dataclass
class TokenEvent:
    """One step's news about one request: a token (with its text) and/or how the request ended."""

    uid: int
    token: int | None
    text: str | None = (
        None  # this token's new text (None: the decoder has no detokenizer, e.g. a follower rank)
    )
    finish: FinishReason | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    logprobs: Logprob | None = None  # with texts, when the request asked for them
    from_draft: bool = False
    drafts_proposed: int | None = None  # drafts the request's drafter proposed so far (mlx-vlm's draft_lens)
    error: str | None = None  # with finish ERROR: why this request failed
    prompt_tokens: int | None = None  # when the library counted the prompt itself (VLM: images expanded)
    cached_tokens: int | None = None  # when the decoder reused a cached prefix


@dataclasses.dataclass
class Started:
    """What a decoder did with a new request: how many prompt tokens it reused from the prefix cache."""

    cached_tokens: int = 0


@dataclasses.dataclass
class CacheStats:
    """Prefix-cache counters, for Status and metrics."""

    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    stored: int = 0


CacheInfo = dict[str, "int | bool"]


@dataclasses.dataclass(frozen=True)
class DecoderStats:
    """What a decoder reports for Status: its requests, drafting counters and its own prefix cache."""

    active: int = 0
    drafted: int = 0  # tokens generated by requests that drafted
    accepted: int = 0  # of those, drafts the model confirmed
    proposed: int = 0  # drafts proposed, accepted or not (where the library counts them)
    solo_tokens: int = 0  # the text batch: tokens of requests decoded alone (backends.solo)
    handovers: int = 0  # the text batch: lone requests that joined the batch mid-way
    cache: tuple[str, CacheInfo] | None = None  # (route, description) of a cache this decoder owns alone
    features: CacheInfo | None = None  # its media feature cache (backends.feature_cache), if it has one


class Decoder(Protocol):
    """A decoder the runtime drives: one thread calls every method, between steps."""

    def add(self, spec: DecodeSpec) -> Started:
        """Take a request; it starts on the next step."""

    def cancel(self, uid: int) -> None:
        """Drop a request now (a no-op for one it does not hold)."""

    def busy(self) -> bool:
        """Whether a step has anything to do."""

    def step(self) -> list[TokenEvent]:
        """Advance every request by one token (or a prompt chunk). Raises when the whole step failed."""

    def stats(self) -> DecoderStats:
        """Counters for Status."""

    def reset(self) -> None:
        """After a failed step: drop every request and be ready for new ones."""

    def close(self) -> None:
        """Release everything."""


class TokenText:
    """One request's detokenizer and log-probability texts, kept behind the decoder."""

    def __init__(self, codec: TextCodec | None, spec: DecodeSpec) -> None:
        self.codec = codec
        self.want_logprobs = spec.logprobs is not None
        self.detokenizer = codec.detokenizer() if codec is not None else None

    def describe(self, event: TokenEvent, *, is_stop: bool) -> TokenEvent:
        """Fill in the event's text and log-probability texts (a stop token has neither).

        Without a streaming detokenizer the event keeps the text the library gave it (mlx-vlm), or none.
        """
        if event.token is not None:
            if not is_stop and self.detokenizer is not None:
                self.detokenizer.add_token(event.token)
                event.text = self.detokenizer.last_segment
            if self.want_logprobs and event.logprob is not None and not is_stop and self.codec is not None:
                decode = self.codec.detokenize
                event.logprobs = Logprob(
                    decode([event.token]),
                    event.token,
                    event.logprob,
                    tuple((decode([i]), i, lp) for i, lp in event.top_logprobs or []),
                )
        if event.finish is not None and self.detokenizer is not None:
            self.detokenizer.finalize()
            event.text = (event.text or "") + self.detokenizer.last_segment
        return event


def failure_text(exc: BaseException) -> str:
    """One line naming an exception (what a failed request reports)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
