"""The decoders the engine drives, one step at a time, on its one MLX thread.

- TextBatcher: continuous batching with mlx-lm's BatchGenerator. Requests join and leave at step
  boundaries, each with its own sampler, logits processors, stop ids and max tokens; prompts are processed
  in chunks (one chunk per step, so a long prompt never holds the batch for long, and a cancelled one is
  dropped between chunks). Prefix reuse uses mlx-lm's LRUPromptCache: a request starts from the longest
  cached prefix of its token ids; finished (and cancelled) requests are stored back, and, for caches that
  cannot be trimmed (sliding-window, SSM), so is the prompt itself (one token short, where the batch
  generator splits it off) so that the same prompt can reuse it exactly.
- TextStreams: one mlx-lm generator per request, advanced round-robin, for what BatchGenerator cannot
  batch: a draft model (speculative decoding) and a quantized KV cache. Same prefix cache.
- VlmStreams: one mlx-vlm generator per request (images, audio, video; text on VLMs without a shared text
  route, or with a drafter), advanced round-robin; prefix reuse through mlx-vlm's PromptCacheState, kept per
  set of media (by content hash), so a prefix is reused only with the same images. mlx-vlm keeps per-request
  state on shared objects (the stop criteria on the tokenizer, mRoPE offsets on the language model): each
  request's copy is swapped in before its step and out after, so interleaved requests never see each
  other's state. A drafter (bundled MTP layers, or a separate one) keeps its drafting state on itself, so
  each request drafts with its own shallow copy.

Each step returns `Token`s: the token id, its text when the library detokenized it (VLM), the finish
reason ("stop" when it is one of the request's stop ids, "length" at max tokens) and log-probabilities
when asked for. The engine turns tokens into answers.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from backends.sampling import Processor, token_logprobs

# Attributes mlx-vlm language models keep per generation (mRoPE offsets): swapped per request.
_PER_REQUEST_MODEL_STATE = ("_rope_deltas", "_position_ids", "_rope_delta")


class PrefillAborted(Exception):
    """Raised inside a prefill callback to stop processing a prompt whose request was cancelled."""


@dataclasses.dataclass
class DecodeSpec:
    """What a decoder needs to generate one answer."""

    uid: int
    max_tokens: int
    stop_ids: frozenset[int]
    sampler: Callable[[Any], Any] | None = None
    processors: list[Processor] = dataclasses.field(default_factory=list)
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the top n alternatives
    prompt: list[int] = dataclasses.field(default_factory=list)  # text routes: the prompt's token ids
    prompt_text: str = ""  # VLM route: the rendered prompt (mlx-vlm tokenizes it with the media)
    images: list[Any] = dataclasses.field(default_factory=list)
    audio: list[str] = dataclasses.field(default_factory=list)
    video: list[str] = dataclasses.field(default_factory=list)
    media_key: tuple[str, ...] = ()  # content hashes of the media, in order
    speculative: bool = False  # use the draft model (text streams)
    num_draft_tokens: int | None = None
    should_stop: Callable[[], bool] = lambda: False  # checked between prompt chunks (cancel, shutdown)


@dataclasses.dataclass
class Token:
    """One generated token of one request."""

    uid: int
    token: int | None
    text: str | None = None  # set when the library detokenized it (VLM route)
    finish: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    from_draft: bool = False
    error: str | None = None  # with finish "error": why this request failed
    prompt_tokens: int | None = None  # when the library counted the prompt itself (VLM: images expanded)
    cached_tokens: int | None = None  # when the library reused a cached prefix itself (VLM)


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


def _logprobs(
    spec: DecodeSpec, logprobs: Any, token: int
) -> tuple[float | None, list[tuple[int, float]] | None]:
    if spec.logprobs is None or logprobs is None:
        return None, None
    chosen, top = token_logprobs(logprobs, token, spec.logprobs)
    return chosen, top


def _cache_length(cache: list[Any]) -> int | None:
    """Tokens held by a prompt cache (None when the cache kind does not say)."""
    offset = getattr(cache[0], "offset", None) if cache else None
    return int(offset) if isinstance(offset, int) else None


def check_kv_quantization(model: Any, bits: int | None, group_size: int) -> str | None:
    """Why a quantized KV cache cannot work for this model (MLX quantizes each head's vectors in groups), or None."""
    if bits is None:
        return None
    if bits not in (2, 3, 4, 5, 6, 8):
        return f"kv_bits {bits} is not supported (2, 3, 4, 5, 6 or 8)"
    if group_size not in (32, 64, 128):
        return f"kv_group_size {group_size} is not supported (32, 64 or 128)"
    args = getattr(model, "args", None) or getattr(getattr(model, "language_model", model), "args", None)
    if args is None:
        return None
    head_dim = getattr(args, "head_dim", None)
    if not head_dim and getattr(args, "hidden_size", None) and getattr(args, "num_attention_heads", None):
        head_dim = args.hidden_size // args.num_attention_heads
    if head_dim and head_dim % group_size:
        return f"kv_group_size {group_size} does not divide this model's head size {head_dim}"
    return None


class PrefixCache:
    """mlx-lm's LRUPromptCache, with a switch, counters, and the exact-hit rule the batch generator needs."""

    def __init__(self, *, entries: int, max_bytes: int, deferred_eviction: bool = False) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self.enabled = entries > 0 and max_bytes > 0
        self.max_bytes = max(max_bytes, 1)
        # Deferred (distributed): ranks hold different parts of each cache, so their byte counts differ and
        # evicting by bytes on every rank would make their caches (and then their batches) diverge. Instead
        # only rank 0 measures bytes, between steps, and every rank evicts the same number of LRU entries.
        self.deferred = deferred_eviction
        self.lru = LRUPromptCache(
            max_size=max(entries, 1), max_bytes=(1 << 62) if deferred_eviction else self.max_bytes
        )
        self.stats = CacheStats()

    def evict_over_budget(self) -> int:
        """Deferred mode, rank 0: drop least-recently-used entries until under the byte budget; how many it dropped."""
        dropped = 0
        while len(self.lru) and self.lru.nbytes > self.max_bytes:
            self.lru.trim_to(n_sequences=len(self.lru) - 1)
            dropped += 1
        return dropped

    def evict(self, count: int) -> None:
        """Deferred mode, other ranks: drop the `count` least-recently-used entries, as rank 0 did."""
        for _ in range(count):
            if not len(self.lru):
                return
            self.lru.trim_to(n_sequences=len(self.lru) - 1)

    def fetch(self, key: Any, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A copy of the nearest cached prefix of `tokens` and how many tokens it covers (never all of them)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if not self.enabled:
            return None, 0
        self.stats.lookups += 1
        cache, rest = self.lru.fetch_nearest_cache(key, tokens)
        if cache is None:
            return None, 0
        covered = len(tokens) - len(rest)
        if covered >= len(tokens):
            # At least one token must still run through the model to give the first logits.
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, covered - len(tokens) + 1)
            covered = len(tokens) - 1
        if covered <= 0:
            return None, 0
        self.stats.hits += 1
        self.stats.reused_tokens += covered
        return cache, covered

    def store(self, key: Any, tokens: list[int], cache: list[Any], kind: str = "assistant") -> None:
        """Keep a prompt cache for the tokens it holds (a no-op when the cache is off or they disagree)."""
        if not self.enabled or not tokens:
            return
        length = _cache_length(cache)
        if length is not None and length != len(tokens):
            return  # never store a cache under tokens it does not hold
        self.lru.insert_cache(key, list(tokens), cache, cache_type=kind)
        self.stats.stored += 1

    def describe(self) -> dict[str, Any]:
        """Entries, bytes and counters."""
        return {
            "enabled": self.enabled,
            "entries": len(self.lru),
            "bytes": int(self.lru.nbytes),
            **dataclasses.asdict(self.stats),
        }


# ----------------------------------------------------------------------------------------------- text, batched
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
    ) -> None:
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        self.model = model
        self.prefix = prefix
        self.key = key
        self.generator = BatchGenerator(
            model,
            max_tokens=1,
            completion_batch_size=max_batch,
            prefill_batch_size=min(prefill_batch, max_batch),
            prefill_step_size=prefill_step,
            max_kv_size=max_kv_size,
        )
        self.specs: dict[int, DecodeSpec] = {}  # generator uid -> spec
        self.uids: dict[int, int] = {}  # request uid -> generator uid
        # A trimmable cache of (prompt + answer) serves the next turn by trimming; one that cannot be trimmed
        # serves it only if the exact prompt was kept too (the batch generator stops one token short of it).
        self.checkpoints = prefix.enabled and not can_trim_prompt_cache(make_prompt_cache(model, max_kv_size))

    def busy(self) -> bool:
        """Whether any request is queued, prefilling or decoding."""
        return bool(self.specs)

    def add(self, spec: DecodeSpec) -> Started:
        """Queue a request; it starts prefilling on the next step."""
        from mlx_lm.generate import StopSequences

        prompt = spec.prompt
        cache, cached = self.prefix.fetch(self.key, prompt)
        (guid,) = self.generator.insert(
            [prompt[cached:]],
            max_tokens=[spec.max_tokens],
            caches=None if cache is None else [cache],
            all_tokens=[prompt[:cached]],
            samplers=None if spec.sampler is None else [spec.sampler],
            logits_processors=[list(spec.processors)],
            stop_sequences=[StopSequences([(i,) for i in sorted(spec.stop_ids)])],
        )
        self.specs[guid] = spec
        self.uids[spec.uid] = guid
        return Started(cached_tokens=cached)

    def step(self) -> list[Token]:
        """One generation step for every decoding row, and one prompt chunk for the rows still prefilling."""
        prompt_responses, responses = self.generator.next()
        if self.checkpoints:
            ends = [
                r.uid
                for r in prompt_responses
                if r.end_of_segment and not r.end_of_prompt and r.uid in self.specs
            ]
            for cache, tokens in self.generator.extract_cache(ends).values():
                self.prefix.store(self.key, list(tokens), cache, kind="user")
        out: list[Token] = []
        for response in responses:
            spec = self.specs.get(response.uid)
            if spec is None:
                continue
            logprob, top = _logprobs(spec, response.logprobs, response.token)
            out.append(
                Token(
                    spec.uid,
                    int(response.token),
                    finish=response.finish_reason,
                    logprob=logprob,
                    top_logprobs=top,
                )
            )
            if response.finish_reason is not None:
                self._forget(response.uid)
                if response.prompt_cache is not None and response.all_tokens:
                    self.prefix.store(self.key, list(response.all_tokens), response.prompt_cache)
        return out

    def prefilling(self) -> set[int]:
        """Request uids whose prompts are still being processed (checked for cancellation between chunks)."""
        decoding = set(self.generator._generation_batch.uids)
        return {spec.uid for guid, spec in self.specs.items() if guid not in decoding}

    def cancel(self, uid: int) -> None:
        """Drop a request at once; what it had computed goes back into the prefix cache."""
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
        if spec is not None:
            self.uids.pop(spec.uid, None)

    def close(self) -> None:
        """Release the generator."""
        self.generator.close()


# ----------------------------------------------------------------------------------------------- one by one
@dataclasses.dataclass
class _Stream:
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


class _RoundRobin:
    """Requests with a generator each, advanced one token per step, in turn."""

    def __init__(self) -> None:
        self.streams: OrderedDict[int, _Stream] = OrderedDict()

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

    def step(self) -> list[Token]:
        """One token for every active request."""
        out: list[Token] = []
        for uid in list(self.streams):
            stream = self.streams.get(uid)
            if stream is None:
                continue
            try:
                token = self._advance(stream)
            except PrefillAborted:
                token = Token(uid, None, finish="cancelled")
            except Exception as exc:  # one request's failure must not take the others down
                token = Token(
                    uid,
                    None,
                    finish="error",
                    error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                )
            if token is None:
                continue
            out.append(token)
            if token.finish is not None:
                self.streams.pop(uid, None)
                self._finished(stream, cancelled=token.finish in ("cancelled", "error"))
        return out

    def _advance(self, stream: _Stream) -> Token | None:
        raise NotImplementedError

    def _finished(self, stream: _Stream, *, cancelled: bool) -> None:
        """Hook: store what the request computed."""

    def close(self) -> None:
        """Drop every request."""
        for uid in list(self.streams):
            self.cancel(uid)


class TextStreams(_RoundRobin):
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
    ) -> None:
        super().__init__()
        self.model = model
        self.prefix = prefix
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
        self.drafted = 0
        self.accepted = 0

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
        self.streams[spec.uid] = _Stream(
            spec, generator, cached_tokens=cached, tokens=list(spec.prompt), cache=cache if plain else None
        )
        return Started(cached_tokens=cached)

    def _advance(self, stream: _Stream) -> Token | None:
        spec = stream.spec
        try:
            token, logprobs, from_draft = next(stream.generator)
        except StopIteration:
            return Token(spec.uid, None, finish="length")
        token = int(token)
        stream.produced += 1
        if spec.speculative:
            self.drafted += 1
            self.accepted += int(bool(from_draft))
        logprob, top = _logprobs(spec, logprobs, token)
        finish = (
            "stop" if token in spec.stop_ids else "length" if stream.produced >= spec.max_tokens else None
        )
        stream.tokens.append(token)
        return Token(
            spec.uid, token, finish=finish, logprob=logprob, top_logprobs=top, from_draft=bool(from_draft)
        )

    def _finished(self, stream: _Stream, *, cancelled: bool) -> None:
        if stream.cache is not None:
            # The generator computes one token ahead: its cache holds every token it yielded.
            self.prefix.store(self.key, stream.tokens, stream.cache)


class VlmStreams(_RoundRobin):
    """mlx-vlm generators, one per request: media to the towers, text on VLMs without a text route."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        prefix_entries: int,
        prefill_step: int = 512,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
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
        self.prefix_entries = prefix_entries
        self.states: OrderedDict[tuple[str, ...], Any] = OrderedDict()  # media key -> PromptCacheState
        self.stats = CacheStats()
        self.options: dict[str, Any] = {"prefill_step_size": prefill_step}
        if max_kv_size:
            self.options["max_kv_size"] = max_kv_size
        if kv_bits:
            self.options.update(
                kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start
            )
        self.draft_model = draft_model
        self.draft_kind = draft_kind or "mtp"
        self.num_draft_tokens = num_draft_tokens
        self.drafted = 0  # tokens generated by requests that drafted
        self.accepted = 0  # of those, the ones the drafter proposed (and the model confirmed)
        self.proposed = 0  # draft tokens the drafter proposed, accepted or not

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
            image=spec.images or None,
            audio=spec.audio or None,
            video=spec.video or None,
            max_tokens=spec.max_tokens,
            sampler=sampler,
            logits_processors=list(spec.processors) or None,
            prompt_cache_state=state,
            **options,
        )
        stream = _Stream(spec, generator, prefix_state=state, drafter=drafter)
        stream.state = {"stopping_criteria": _StopIds(spec.stop_ids)}
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

    def _from_draft(self, stream: _Stream) -> bool:
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

    def _swap_in(self, stream: _Stream) -> dict[str, Any]:
        saved = {"stopping_criteria": getattr(self.tokenizer, "stopping_criteria", None)}
        self.tokenizer.stopping_criteria = stream.state["stopping_criteria"]
        for name in _PER_REQUEST_MODEL_STATE:
            if hasattr(self.language_model, name):
                saved[name] = getattr(self.language_model, name)
                setattr(self.language_model, name, stream.state.get(name))
        return saved

    def _swap_out(self, stream: _Stream, saved: dict[str, Any]) -> None:
        for name in _PER_REQUEST_MODEL_STATE:
            if name in saved:
                stream.state[name] = getattr(self.language_model, name)
                setattr(self.language_model, name, saved[name])
        self.tokenizer.stopping_criteria = saved["stopping_criteria"]

    def _advance(self, stream: _Stream) -> Token | None:
        spec = stream.spec
        saved = self._swap_in(stream)
        try:
            result = next(stream.generator)
        except StopIteration:
            return Token(spec.uid, None, finish="length")
        finally:
            self._swap_out(stream, saved)
        finish = getattr(result, "finish_reason", None)
        count = int(result.generation_tokens)
        token = result.token
        token_id = int(token.item() if hasattr(token, "item") else token) if token is not None else None
        if stream.produced == 0:
            cached = int(getattr(result, "cached_tokens", 0) or 0)
            stream.cached_tokens = cached
            if self.prefix_entries > 0:
                self.stats.lookups += 1
                if cached:
                    self.stats.hits += 1
                    self.stats.reused_tokens += cached
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
        logprob, top = _logprobs(spec, result.logprobs, token_id) if token_id is not None else (None, None)
        return Token(
            spec.uid,
            token_id,
            text=result.text,
            finish=finish,
            logprob=logprob,
            top_logprobs=top,
            from_draft=from_draft,
            prompt_tokens=int(result.prompt_tokens),
            cached_tokens=stream.cached_tokens,
        )

    def _finished(self, stream: _Stream, *, cancelled: bool) -> None:
        if stream.drafter is not None:
            self.proposed += int(sum(getattr(stream.drafter, "draft_lens", None) or []))
        if stream.prefix_state is None or cancelled:
            return  # a cancelled request never recorded its tokens: its state is not reusable
        # mlx-vlm records the conversation's tokens in the state after its last result: let it run that part.
        for _ in stream.generator:
            pass
        self.states[stream.spec.media_key] = stream.prefix_state
        self.states.move_to_end(stream.spec.media_key)
        while len(self.states) > self.prefix_entries:
            self.states.popitem(last=False)

    def describe(self) -> dict[str, Any]:
        """Entries and counters of the VLM prefix cache."""
        return {
            "enabled": self.prefix_entries > 0,
            "entries": len(self.states),
            **dataclasses.asdict(self.stats),
        }


class _StopIds:
    """mlx-vlm's stopping criteria, fixed to one request's stop ids (library code may not change them)."""

    def __init__(self, stop_ids: frozenset[int]) -> None:
        self.eos_token_ids = sorted(stop_ids)
        self._ids = stop_ids

    def __call__(self, token: Any) -> bool:
        value = token.item() if hasattr(token, "item") else token
        return int(value) in self._ids

    def reset(self, eos_token_ids: Any = None) -> None:
        """Ignored: the pinned set is not to be changed by library code."""

    def add_eos_token_ids(self, new_eos_token_ids: Any = None) -> None:
        """Ignored: the pinned set is not to be changed by library code."""
