"""The mlx-vlm decoder: one generator per request (images, audio, video; text on VLMs without a shared text
route, or with a drafter), advanced round-robin, on the engine's one MLX thread.

Prefix reuse goes through mlx-vlm's PromptCacheState, kept per set of media (by content hash), so a prefix is
reused only with the same images. mlx-vlm keeps per-request state on shared objects (the stop criteria on
the tokenizer, mRoPE offsets on the language model): each request's copy is swapped in before its step and
out after, so interleaved requests never see each other's state. A drafter (bundled MTP layers, or a
separate one) keeps its drafting state on itself, so each request drafts with its own shallow copy.
mlx-vlm detokenizes; log-probability texts come from the same tokenizer.

The batch decoder (backends.vlm_batch) sends here what it cannot batch. The towers run inside the request's
media-key scope of the model's feature cache (backends.feature_cache), so a turn about media seen before
takes their features from it. A prompt is processed in `prefill_step` chunks inside the generator's first
step; a cancel or shutdown stops it between two chunks.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from backends.decoder import (
    CacheInfo,
    CacheStats,
    DecoderStats,
    DecodeSpec,
    FinishReason,
    PrefillAborted,
    Started,
    StopIds,
    TokenEvent,
    TokenText,
)
from backends.feature_cache import FeatureCache
from backends.text_decoders import RoundRobin, Stream, request_logprobs

# Attributes mlx-vlm language models keep per generation (mRoPE offsets): swapped per request.
_PER_REQUEST_MODEL_STATE = ("_rope_deltas", "_position_ids", "_rope_delta")


class VlmStreams(RoundRobin):
    """mlx-vlm generators, one per request: media to the towers, text on VLMs without a text route."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        prefix_entries: int,
        prefill_step: int = 512,
        max_kv_size: int | None = None,
        kv_bits: float | None = None,
        kv_quant_scheme: str | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 0,
        draft_model: Any = None,
        draft_kind: str | None = None,
        num_draft_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
        self.language_model = getattr(model, "language_model", model)
        # mlx-vlm 0.7.10 slices a model's per-layer inputs (Gemma 4 E2B/E4B) by the cache offset, which is
        # wrong for the uncached suffix it prefills on a prefix hit: answers change, so no reuse there.
        inner = getattr(self.language_model, "model", self.language_model)
        self.prefix_unsafe = bool(getattr(inner, "hidden_size_per_layer_input", 0))
        self.prefix_entries = 0 if self.prefix_unsafe else prefix_entries
        self.states: OrderedDict[tuple[str, ...], Any] = OrderedDict()  # media key -> PromptCacheState
        self.cache_stats = CacheStats()
        self.options: dict[str, Any] = {"prefill_step_size": prefill_step}
        if max_kv_size:
            self.options["max_kv_size"] = max_kv_size
        if kv_bits:
            # mlx-vlm treats fractional bits as TurboQuant whatever the scheme: the scheme is always passed.
            self.options.update(
                kv_bits=kv_bits,
                kv_quant_scheme=kv_quant_scheme or "uniform",
                kv_group_size=kv_group_size,
                quantized_kv_start=quantized_kv_start,
            )
        self.draft_model = draft_model
        self.draft_kind = draft_kind or "mtp"
        self.num_draft_tokens = num_draft_tokens
        self.proposed = 0  # draft tokens the drafter proposed, accepted or not
        self.features: FeatureCache | None = None  # set by the batch decoder that owns this one
        self.prefill_guard = _guard_prefill(self.language_model)

    def add(self, spec: DecodeSpec) -> Started:
        """Start a request's generator (the processor, the towers and the prompt run inside its first step)."""
        from mlx_vlm import stream_generate
        from mlx_vlm.generate.common import PromptCacheState

        state = None
        if self.prefix_entries > 0:
            # One request at a time may use a state: mlx-vlm updates its cache in place.
            state = self.states.pop(spec.media_key, None) or PromptCacheState()
        import mlx.core as mx

        sampler = spec.sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
        options = dict(self.options)
        drafter = self._drafter(spec)
        if drafter is not None:
            options.update(draft_model=drafter, draft_kind=self.draft_kind)
            drafts = spec.num_draft_tokens or self.num_draft_tokens
            if drafts:
                options["draft_block_size"] = drafts + 1  # a verification block is the drafts plus one token
        generator = stream_generate(
            self.model,
            self.processor,
            spec.prompt_text,
            image=spec.images or None,  # type: ignore[arg-type]  # it loads PIL images too
            audio=spec.audio or None,
            video=spec.video or None,
            max_tokens=spec.max_tokens,
            sampler=sampler,
            logits_processors=list(spec.processors) or None,
            prompt_cache_state=state,
            **options,
        )
        stream = Stream(spec, generator, prefix_state=state, drafter=drafter, text=TokenText(self, spec))
        stream.state = {"stopping_criteria": _StopIds(spec.stops)}
        self.streams[spec.uid] = stream
        return Started()

    def _drafter(self, spec: DecodeSpec) -> Any:
        """This request's drafter, or None: none is loaded, or the request needs what drafting drops.

        mlx-vlm's speculative loop applies logits processors (penalties, bias, grammar, thinking budget) to the
        first token only and returns no log-probabilities after it, so such requests decode without drafts. The
        drafter keeps a generation's state (its KV cache, positions, acceptance history) on itself: each request
        gets its own shallow copy, which shares the weights.
        """
        if self.draft_model is None or spec.processors or spec.logprobs is not None:
            return None
        return copy.copy(self.draft_model)

    def _from_draft(self, stream: Stream) -> bool:
        """Whether the token just yielded was a draft the model accepted.

        mlx-vlm records a verification round's accepted count on the drafter before it yields the round's
        tokens, which are the accepted drafts first and then the model's own token.
        """
        rounds = getattr(stream.drafter, "accept_lens", None) or []
        while stream.rounds < len(rounds):
            stream.drafts_left = int(rounds[stream.rounds])
            stream.rounds += 1
        if stream.drafts_left <= 0:
            return False
        stream.drafts_left -= 1
        return True

    def _swap_in(self, stream: Stream) -> dict[str, Any]:
        saved = {"stopping_criteria": getattr(self.tokenizer, "stopping_criteria", None)}
        self.tokenizer.stopping_criteria = stream.state["stopping_criteria"]
        for name in _PER_REQUEST_MODEL_STATE:
            if hasattr(self.language_model, name):
                saved[name] = getattr(self.language_model, name)
                setattr(self.language_model, name, stream.state.get(name))
        return saved

    def _swap_out(self, stream: Stream, saved: dict[str, Any]) -> None:
        for name in _PER_REQUEST_MODEL_STATE:
            if name in saved:
                stream.state[name] = getattr(self.language_model, name)
                setattr(self.language_model, name, saved[name])
        self.tokenizer.stopping_criteria = saved["stopping_criteria"]

    def _advance(self, stream: Stream) -> TokenEvent | None:
        spec = stream.spec
        saved = self._swap_in(stream)
        guard = self.prefill_guard if stream.produced == 0 else None
        if guard is not None:
            guard.stop_check = spec.should_stop
        try:
            with (
                self.features.scope(spec.media_key) if self.features is not None else contextlib.nullcontext()
            ):
                result = next(stream.generator)
        except StopIteration:
            return TokenEvent(spec.uid, None, finish=FinishReason.LENGTH)
        finally:
            if guard is not None:
                guard.stop_check = None
            self._swap_out(stream, saved)
        reason = getattr(result, "finish_reason", None)
        finish = FinishReason(reason) if reason is not None else None
        count = int(result.generation_tokens)
        token = result.token
        token_id = int(token.item() if hasattr(token, "item") else token) if token is not None else None
        if stream.produced == 0:
            cached = int(getattr(result, "cached_tokens", 0) or 0)
            stream.cached_tokens = cached
            if self.prefix_entries > 0:
                self.cache_stats.lookups += 1
                if cached:
                    self.cache_stats.hits += 1
                    self.cache_stats.reused_tokens += cached
        if finish is not None and count == stream.last_count:
            token_id = None  # mlx-vlm's closing result repeats the last token: it is not a new one
        stream.last_count = count
        from_draft = False
        if token_id is not None:
            stream.produced += 1
            if stream.drafter is not None:
                from_draft = self._from_draft(stream)
                self.drafted += 1
                self.accepted += from_draft
        logprob, top = (
            request_logprobs(spec, result.logprobs, token_id) if token_id is not None else (None, None)
        )
        event = TokenEvent(
            spec.uid,
            token_id,
            text=result.text,
            finish=finish,
            logprob=logprob,
            top_logprobs=top,
            from_draft=from_draft,
            drafts_proposed=_proposed(stream.drafter),
            prompt_tokens=int(result.prompt_tokens),
            cached_tokens=stream.cached_tokens,
        )
        assert stream.text is not None
        is_stop = finish is FinishReason.STOP and token_id in spec.stops
        return stream.text.describe(event, is_stop=is_stop)

    def _finished(self, stream: Stream, *, cancelled: bool) -> None:
        if stream.drafter is not None:
            self.proposed += _proposed(stream.drafter) or 0
        if stream.prefix_state is None or cancelled:
            return  # a cancelled request never recorded its tokens: its state is not reusable
        # mlx-vlm records the conversation's tokens in the state after its last result: let it run that part.
        for _ in stream.generator:
            pass
        self.keep(stream.spec.media_key, stream.prefix_state)

    def keep(self, media_key: tuple[str, ...], state: Any) -> None:
        """Keep a prompt cache state for the next request with these media (the oldest beyond the bound go)."""
        self.states[media_key] = state
        self.states.move_to_end(media_key)
        while len(self.states) > self.prefix_entries:
            self.states.popitem(last=False)

    def describe(self) -> CacheInfo:
        """Entries and counters of the VLM prefix cache."""
        return {
            "enabled": self.prefix_entries > 0,
            "reuse_refused": self.prefix_unsafe,  # reuse would change this model's answers
            "entries": len(self.states),
            **vars(self.cache_stats),
        }

    def stats(self) -> DecoderStats:
        """Requests, drafting counters and the VLM prefix cache."""
        return DecoderStats(
            active=len(self.streams),
            drafted=self.drafted,
            accepted=self.accepted,
            proposed=self.proposed,
            cache=("vlm", self.describe()),
        )

    # TextCodec, for log-probability texts (mlx-vlm detokenizes the answer itself).
    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids to text, with the processor's tokenizer."""
        return str(self.tokenizer.decode(list(ids)))

    def detokenizer(self) -> None:
        """None: mlx-vlm streams the text itself."""
        return None


def _proposed(drafter: Any) -> int | None:
    """Drafts a request's drafter proposed so far (None when it does not draft)."""
    return None if drafter is None else int(sum(getattr(drafter, "draft_lens", None) or []))


def _guard_prefill(language_model: Any) -> Any:
    """Make every language-model call of a request's prompt a point where a cancel or shutdown stops it.

    mlx-vlm's per-request generator processes the whole prompt (in `prefill_step` chunks, one model call
    each) inside its first step; the model's class is given a subclass whose call checks the request's
    `should_stop` (set only while its prompt runs) and raises PrefillAborted between chunks.
    """
    cls = type(language_model)
    if getattr(cls, "_prefill_guard", False):
        return cls

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        check: Callable[[], bool] | None = type(self).stop_check
        if check is not None and check():
            raise PrefillAborted
        return cls.__call__(self, *args, **kwargs)

    guarded = type(
        cls.__name__,
        (cls,),
        {"__call__": __call__, "__module__": cls.__module__, "_prefill_guard": True, "stop_check": None},
    )
    language_model.__class__ = guarded
    return guarded


class _StopIds:
    """mlx-vlm's stopping criteria, fixed to one request's stop ids (library code may not change them)."""

    def __init__(self, stops: StopIds) -> None:
        self.eos_token_ids = stops.sorted()
        self._stops = stops

    def __call__(self, token: Any) -> bool:
        return token in self._stops

    def reset(self, eos_token_ids: Any = None) -> None:
        """Ignored: the pinned set is not to be changed by library code."""

    def add_eos_token_ids(self, new_eos_token_ids: Any = None) -> None:
        """Ignored: the pinned set is not to be changed by library code."""
