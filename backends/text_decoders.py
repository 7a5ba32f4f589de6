"""The text-route decoders (mlx-lm), driven one step at a time on the engine's one MLX thread.

- TextBatcher: continuous batching with mlx-lm's BatchGenerator. Requests join and leave at step
  boundaries, each with its own sampler, logits processors, stop ids and max tokens; prompts are processed
  in chunks (one chunk per step, so a long prompt never holds the batch for long, and a cancelled one is
  dropped between chunks). Prefix reuse uses the PrefixCache (backends.prefix_cache): a request starts from
  the longest cached prefix of its token ids; finished (and cancelled) requests are stored back, and, for
  caches that cannot be trimmed (sliding-window, SSM), so is the prompt itself (one token short, where the
  batch generator splits it off) so that the same prompt can reuse it exactly.
  A request that arrives while nothing else runs decodes alone (backends.solo: mlx-lm's single-sequence
  speed) and joins the batch, exactly where it is, as soon as a second request arrives.
- TextStreams: one mlx-lm generator per request, advanced round-robin, for what BatchGenerator cannot
  batch: a draft model (speculative decoding) and a quantized KV cache. Same prefix cache.

Both detokenize their own requests (given a TextCodec) and report `TokenEvent`s (backends.decoder).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from backends.decoder import (
    DecoderStats,
    DecodeSpec,
    FinishReason,
    PrefillAborted,
    Started,
    TextCodec,
    TokenEvent,
    TokenText,
    failure_text,
)
from backends.prefix_cache import PrefixCache
from backends.sampling import token_logprobs
from backends.solo import Solo, SoloToken


def request_logprobs(
    spec: DecodeSpec, logprobs: Any, token: int
) -> tuple[float | None, list[tuple[int, float]] | None]:
    """The chosen token's log-probability and the top alternatives the request asked for (None, None: none)."""
    if spec.logprobs is None or logprobs is None:
        return None, None
    chosen, top = token_logprobs(logprobs, token, spec.logprobs)
    return chosen, top


def token_event(
    spec: DecodeSpec, text: TokenText, token: int, logprobs: Any, finish: FinishReason | None, **fields: Any
) -> TokenEvent:
    """A decoded token as its request reports it: the log-probabilities it asked for, then its text."""
    logprob, top = request_logprobs(spec, logprobs, token)
    event = TokenEvent(spec.uid, token, finish=finish, logprob=logprob, top_logprobs=top, **fields)
    return text.describe(event, is_stop=finish is FinishReason.STOP and token in spec.stops)


class TextBatcher:
    """Continuous batching over mlx-lm's BatchGenerator (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        prefix: PrefixCache,
        *,
        key: str = "text",
        max_batch: int = 32,
        prefill_batch: int = 8,
        prefill_step: int = 512,
        max_kv_size: int | None = None,
        codec: TextCodec | None = None,
        solo: bool = False,
    ) -> None:
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        self.model = model
        self.solo_enabled = (
            solo  # decode a lone request alone (off on distributed ranks: they mirror the batch)
        )
        self.solo: Solo | None = None
        self.solo_text: TokenText | None = None
        self.carried: list[TokenEvent] = []  # the token a request handed over with, delivered next step
        self.solo_tokens = 0
        self.handovers = 0
        self.prefix = prefix
        self.key = key
        self.codec = codec  # None: no text (a follower rank repeats the batch; rank 0 alone writes answers)
        self._shape: dict[str, Any] = {
            "completion_batch_size": max_batch,
            "prefill_batch_size": min(prefill_batch, max_batch),
            "prefill_step_size": prefill_step,
            "max_kv_size": max_kv_size,
        }
        self.generator = self._new_generator()
        self.specs: dict[int, DecodeSpec] = {}  # generator uid -> spec
        self.uids: dict[int, int] = {}  # request uid -> generator uid
        self.texts: dict[int, TokenText] = {}  # generator uid -> its detokenizer
        # A trimmable cache of (prompt + answer) serves the next turn by trimming; one that cannot be trimmed
        # serves it only if the exact prompt was kept too (the batch generator stops one token short of it).
        self.checkpoints = prefix.enabled and not can_trim_prompt_cache(make_prompt_cache(model, max_kv_size))

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(self.model, max_tokens=1, **self._shape)

    def busy(self) -> bool:
        """Whether any request is queued, prefilling or decoding."""
        return bool(self.specs) or self.solo is not None or bool(self.carried)

    def add(self, spec: DecodeSpec) -> Started:
        """Queue a request; it starts prefilling on the next step (alone, if nothing else runs)."""
        prompt = spec.prompt
        cache, cached = self.prefix.fetch(self.key, prompt)
        if self.solo_enabled and self.solo is None and not self.specs:
            from mlx_lm.models.cache import make_prompt_cache

            self.solo = Solo(
                self.model,
                spec,
                cache if cache is not None else make_prompt_cache(self.model, self._shape["max_kv_size"]),
                cached,
                prefill_step=self._shape["prefill_step_size"],
                checkpoint=self._checkpoint if self.checkpoints else None,
            )
            self.solo_text = TokenText(self.codec, spec)
            return Started(cached_tokens=cached)
        if self.solo is not None:
            self._hand_over()
        self._insert(
            spec, TokenText(self.codec, spec), prompt[cached:], cache, prompt[:cached], spec.max_tokens
        )
        return Started(cached_tokens=cached)

    def _insert(
        self,
        spec: DecodeSpec,
        text: TokenText,
        rest: list[int],
        cache: Any,
        held: list[int],
        tokens_left: int,
    ) -> None:
        from mlx_lm.generate import StopSequences

        (guid,) = self.generator.insert(
            [rest],
            max_tokens=[tokens_left],
            caches=None if cache is None else [cache],
            all_tokens=[held],
            samplers=None if spec.sampler is None else [spec.sampler],
            logits_processors=[list(spec.processors)],
            stop_sequences=[StopSequences([(i,) for i in spec.stops.sorted()])],
        )
        self.specs[guid] = spec
        self.uids[spec.uid] = guid
        self.texts[guid] = text

    def _checkpoint(self, tokens: list[int], cache: list[Any]) -> None:
        self.prefix.store(self.key, tokens, cache, kind="user")

    def _hand_over(self) -> None:
        """The lone request joins the batch where it is (its token in flight is delivered on the next step)."""
        solo, text = self.solo, self.solo_text
        assert solo is not None and text is not None
        self.solo = self.solo_text = None
        self.handovers += 1
        token, state = solo.handover()
        if token is not None:
            self.carried.append(self._solo_event(solo, text, token))
        if state is None:
            self._solo_done(solo)
            return
        self._insert(solo.spec, text, state.rest, state.cache, state.held, state.tokens_left)

    def _solo_event(self, solo: Solo, text: TokenText, token: SoloToken) -> TokenEvent:
        return token_event(solo.spec, text, token.token, token.logprobs, token.finish)

    def _solo_done(self, solo: Solo) -> None:
        tokens, cache = solo.stored()
        self.prefix.store(self.key, tokens, cache)

    def _solo_step(self) -> list[TokenEvent]:
        solo, text = self.solo, self.solo_text
        assert solo is not None and text is not None
        try:
            token = solo.step()
        except PrefillAborted:
            self.solo = self.solo_text = None
            self._solo_done(solo)
            return [TokenEvent(solo.spec.uid, None, finish=FinishReason.CANCELLED)]
        if token is None:
            return []
        self.solo_tokens += 1
        if token.finish is not None:
            self.solo = self.solo_text = None
            self._solo_done(solo)
        return [self._solo_event(solo, text, token)]

    def step(self) -> list[TokenEvent]:
        """One generation step for every decoding row, and one prompt chunk for the rows still prefilling."""
        out, self.carried = self.carried, []
        if self.solo is not None:
            return out + self._solo_step()
        if not self.specs:
            return out
        prompt_responses, responses = self.generator.next()
        if self.checkpoints:
            ends = [
                r.uid
                for r in prompt_responses
                if r.end_of_segment and not r.end_of_prompt and r.uid in self.specs
            ]
            for cache, tokens in self.generator.extract_cache(ends).values():
                self.prefix.store(self.key, list(tokens), cache, kind="user")
        for response in responses:
            spec = self.specs.get(response.uid)
            if spec is None:
                continue
            token = int(response.token)
            finish = FinishReason(response.finish_reason) if response.finish_reason is not None else None
            out.append(token_event(spec, self.texts[response.uid], token, response.logprobs, finish))
            if finish is not None:
                self._forget(response.uid)
                if response.prompt_cache is not None and response.all_tokens:
                    self.prefix.store(self.key, list(response.all_tokens), response.prompt_cache)
        return out

    def cancel(self, uid: int) -> None:
        """Drop a request at once; what it had computed goes back into the prefix cache."""
        if self.solo is not None and self.solo.spec.uid == uid:
            solo, self.solo, self.solo_text = self.solo, None, None
            self._solo_done(solo)
            return
        guid = self.uids.get(uid)
        if guid is None:
            return
        caches = self.generator.remove([guid], return_prompt_caches=self.prefix.enabled)
        self._forget(guid)
        for cache, tokens in caches.values():
            if cache and tokens:
                self.prefix.store(self.key, list(tokens), cache)

    def _forget(self, guid: int) -> None:
        spec = self.specs.pop(guid, None)
        self.texts.pop(guid, None)
        if spec is not None:
            self.uids.pop(spec.uid, None)

    def stats(self) -> DecoderStats:
        """The rows in the batch (its prefix cache is shared with the streams: the engine reports it)."""
        return DecoderStats(
            active=len(self.specs) + (self.solo is not None),
            solo_tokens=self.solo_tokens,
            handovers=self.handovers,
        )

    def reset(self) -> None:
        """After a failed step: a fresh generator, no requests (the prefix cache is kept)."""
        self.solo = self.solo_text = None
        self.carried.clear()
        self.generator.close()
        self.specs.clear()
        self.uids.clear()
        self.texts.clear()
        self.generator = self._new_generator()

    def close(self) -> None:
        """Release the generator."""
        self.generator.close()


# ----------------------------------------------------------------------------------------------- one by one
@dataclasses.dataclass
class Stream:
    """One request on a round-robin decoder: its generator and what it has produced."""

    spec: DecodeSpec
    generator: Iterator[Any]
    produced: int = 0
    cached_tokens: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    cache: list[Any] | None = None
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    prefix_state: Any = None
    last_count: int = -1
    drafter: Any = None  # this request's own drafter (VLM streams that draft)
    rounds: int = 0  # verification rounds of the drafter seen so far
    drafts_left: int = 0  # tokens of the current round still to come that the drafter proposed
    text: TokenText | None = None  # this request's detokenizer (text streams)


class RoundRobin:
    """Requests with a generator each, advanced one token per step, in turn."""

    def __init__(self) -> None:
        self.streams: OrderedDict[int, Stream] = OrderedDict()
        self.drafted = 0  # tokens generated by requests that drafted
        self.accepted = 0  # of those, the ones the drafter proposed (and the model confirmed)

    def busy(self) -> bool:
        """Whether any request is active."""
        return bool(self.streams)

    def cancel(self, uid: int) -> None:
        """Drop a request; its generator is closed (releasing its KV cache) now."""
        stream = self.streams.pop(uid, None)
        if stream is not None:
            self._finished(stream, cancelled=True)
            close = getattr(stream.generator, "close", None)
            if close is not None:
                close()

    def step(self) -> list[TokenEvent]:
        """One token for every active request."""
        out: list[TokenEvent] = []
        for uid in list(self.streams):
            stream = self.streams.get(uid)
            if stream is None:
                continue
            try:
                token = self._advance(stream)
            except PrefillAborted:
                token = TokenEvent(uid, None, finish=FinishReason.CANCELLED)
            except Exception as exc:  # one request's failure must not take the others down
                token = TokenEvent(uid, None, finish=FinishReason.ERROR, error=failure_text(exc))
            if token is None:
                continue
            out.append(token)
            if token.finish is not None:
                self.streams.pop(uid, None)
                self._finished(stream, cancelled=token.finish.aborted)
        return out

    def _advance(self, stream: Stream) -> TokenEvent | None:
        raise NotImplementedError

    def stats(self) -> DecoderStats:
        """Requests and drafting counters."""
        return DecoderStats(active=len(self.streams), drafted=self.drafted, accepted=self.accepted)

    def reset(self) -> None:
        """After a failed step: drop every request."""
        self.close()

    def _finished(self, stream: Stream, *, cancelled: bool) -> None:
        """Hook: store what the request computed."""

    def close(self) -> None:
        """Drop every request."""
        for uid in list(self.streams):
            self.cancel(uid)


class TextStreams(RoundRobin):
    """mlx-lm generators, one per request, for speculative decoding and quantized KV caches."""

    def __init__(
        self,
        model: Any,
        prefix: PrefixCache,
        *,
        key: str = "text",
        draft_model: Any = None,
        num_draft_tokens: int = 3,
        prefill_step: int = 512,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
        codec: TextCodec | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.prefix = prefix
        self.codec = codec
        self.key = key
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens
        self.prefill_step = prefill_step
        self.max_kv_size = max_kv_size
        self.kv: dict[str, Any] = {
            "kv_bits": kv_bits,
            "kv_group_size": kv_group_size,
            "quantized_kv_start": quantized_kv_start,
        }

    def add(self, spec: DecodeSpec) -> Started:
        """Start a request's generator (its prompt runs inside its first step)."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step, speculative_generate_step
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import greedy_sampler

        # Speculative decoding and quantized KV caches change the cache layout: no prefix reuse for them.
        speculative = spec.speculative and self.draft_model is not None
        plain = not speculative and self.kv["kv_bits"] is None
        cache, cached = self.prefix.fetch(self.key, spec.prompt) if plain else (None, 0)
        if cache is None:
            cache = make_prompt_cache(self.model, max_kv_size=self.max_kv_size)
            if speculative:
                cache += make_prompt_cache(self.draft_model)

        def progress(_done: int, _total: int) -> None:
            if spec.should_stop():
                raise PrefillAborted

        prompt = mx.array(spec.prompt[cached:])
        sampler = spec.sampler or greedy_sampler
        if speculative:
            generator = speculative_generate_step(
                prompt,
                self.model,
                self.draft_model,
                num_draft_tokens=spec.num_draft_tokens or self.num_draft_tokens,
                max_tokens=spec.max_tokens,
                sampler=sampler,
                logits_processors=list(spec.processors),
                prompt_cache=cache,
                prefill_step_size=self.prefill_step,
                **self.kv,
            )
        else:
            generator = (
                (token, logprobs, False)
                for token, logprobs in generate_step(
                    prompt,
                    self.model,
                    max_tokens=spec.max_tokens,
                    sampler=sampler,
                    logits_processors=list(spec.processors),
                    prompt_cache=cache,
                    prefill_step_size=self.prefill_step,
                    prompt_progress_callback=progress,
                    **self.kv,
                )
            )
        self.streams[spec.uid] = Stream(
            spec,
            generator,
            cached_tokens=cached,
            tokens=list(spec.prompt),
            cache=cache if plain else None,
            text=TokenText(self.codec, spec),
        )
        return Started(cached_tokens=cached)

    def _advance(self, stream: Stream) -> TokenEvent | None:
        spec = stream.spec
        assert stream.text is not None
        try:
            token, logprobs, from_draft = next(stream.generator)
        except StopIteration:
            return stream.text.describe(TokenEvent(spec.uid, None, finish=FinishReason.LENGTH), is_stop=False)
        token = int(token)
        stream.produced += 1
        if spec.speculative:
            self.drafted += 1
            self.accepted += int(bool(from_draft))
        stream.tokens.append(token)
        finish = spec.finish_after(token, stream.produced)
        return token_event(spec, stream.text, token, logprobs, finish, from_draft=bool(from_draft))

    def _finished(self, stream: Stream, *, cancelled: bool) -> None:
        if stream.cache is not None:
            # The generator computes one token ahead: its cache holds every token it yielded.
            self.prefix.store(self.key, stream.tokens, stream.cache)
