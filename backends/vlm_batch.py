"""The mlx-vlm continuous batch: media requests (and text on VLMs without a text route) decoded together.

Each request is prepared alone — mlx-vlm's processor, then the model's `get_input_embeddings` with its own
media (its towers' outputs come from the feature cache when the same media was seen before) — and queued on
mlx-vlm's `BatchGenerator` with its embeddings and per-row prompt kwargs (Qwen's mRoPE positions and deltas);
the generator prefills queued prompts together, one `prefill_step` chunk per step, and decodes every row in
one batch. A request cancelled (or a shutdown) while its prompt is being processed stops between chunks.

mlx-vlm's batch takes one sampler and one stop set for all rows; per-request controls are kept here instead:
- the sampler given to the generator samples each row with that row's own sampler (greedy rows by argmax)
  and keeps the row's log-probabilities when the request asked for them;
- its stop criteria never stop: each row's stop ids and token limit are checked here (`StopIds`), and a
  finished row's KV cache is kept for the next turn (the per-request streams reuse it, see `VlmStreams`)
  before the row leaves the batch.
A media request whose media have a kept prefix (the last turn of the same chat) starts its row from it: the
kept KV cache, trimmed to the prefix the new prompt shares, goes to mlx-vlm's warm-row admission (the path
its automatic prefix cache uses, see `_warm_start_class`), which prefills only the suffix, right-padded
beside the other rows it admits, so turn N of a media chat batches and processes only what turn N added.
What the batch cannot honour goes to the per-request `VlmStreams` (kept as the fallback, see `_batchable`):
a drafter, a quantized or rotating KV cache, a model whose caches cannot batch, and a text-only request
that continues the kept text state (the streams reuse it, so turn N of a chat processes only what it added).
On a model with linear-attention state (whose recurrence would run over the right-padding of a mixed
admission) a later media turn's row starts cold.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

from backends.decoder import (
    CacheInfo,
    DecoderStats,
    DecodeSpec,
    FinishReason,
    Started,
    TokenEvent,
    TokenText,
)
from backends.feature_cache import FeatureCache
from backends.text_decoders import token_event
from backends.vlm_decoder import VlmStreams


@dataclasses.dataclass
class _Row:
    """One request in the batch."""

    spec: DecodeSpec
    guid: int
    prompt: list[int]
    text: TokenText
    produced: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: collections.deque[Any] = dataclasses.field(default_factory=collections.deque)
    cached: int = 0  # prompt tokens taken from a kept prefix (not prefilled)


class _NeverStop:
    """mlx-vlm's batch stop criteria: never (each row's own stop ids are checked by the decoder)."""

    def __init__(self) -> None:
        self.eos_token_ids: list[int] = []

    def __call__(self, token: Any) -> bool:
        return False

    def add_eos_token_ids(self, new_eos_token_ids: Any = None) -> None:
        """Ignored: stops are per row."""

    def reset(self, eos_token_ids: Any = None) -> None:
        """Ignored: stops are per row."""


class _Shim:
    """What BatchGenerator reads off its processor: only the tokenizer's stop criteria."""

    def __init__(self) -> None:
        self.tokenizer = self
        self.stopping_criteria = _NeverStop()


class _RowSampler:
    """The generator's one sampler, sampling each row with its own request's sampler (see the docstring).

    mlx-vlm calls `sample_target` with the rows of its prompt batch (positions all 0, the first token) or of
    its generation batch (positions from 1); the row order is that batch's uid order.
    """

    def __init__(self, decoder: VlmBatch) -> None:
        self.decoder = decoder

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx

        return mx.argmax(logprobs, axis=-1)

    def sample_target(self, logprobs: Any, *, row_ids: list[int], positions: list[int]) -> Any:
        """Sample every row (argmax for greedy rows), keeping the log-probabilities rows asked for."""
        import mlx.core as mx

        generator = self.decoder.generator
        first = all(position == 0 for position in positions)
        batch = generator._prompt_batch if first else generator._generation_batch
        rows = [self.decoder.by_guid.get(guid) for guid in batch.uids]
        greedy = mx.argmax(logprobs, axis=-1)
        if all(row is None or row.spec.sampler is None for row in rows):
            picked = greedy
        else:
            picked = mx.concatenate(
                [
                    greedy[i : i + 1]
                    if row is None or row.spec.sampler is None
                    else row.spec.sampler(logprobs[i : i + 1]).reshape(1).astype(greedy.dtype)
                    for i, row in enumerate(rows)
                ]
            )
        for i, row in enumerate(rows):
            if row is not None and row.spec.logprobs is not None:
                row.logprobs.append(logprobs[i])
        return picked


class VlmBatch:
    """mlx-vlm requests in one continuous batch, with the per-request streams as the fallback (see above)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        streams: VlmStreams,
        features: FeatureCache,
        *,
        enabled: bool = True,
        max_batch: int = 32,
        prefill_batch: int = 8,
        prefill_step: int = 512,
    ) -> None:
        self.model = model
        self.processor = processor
        self.streams = streams
        self.features = features
        self._shape: dict[str, Any] = {
            # mlx-vlm admits a prompt batch only while this leaves room for a whole one; the engine's
            # max_active already bounds the rows, so a waiting prompt is never held back by that rule.
            "completion_batch_size": max_batch + prefill_batch,
            "prefill_batch_size": min(prefill_batch, max_batch),
            "prefill_step_size": prefill_step,
        }
        self.refusal = None if enabled else "media_batching is off"
        if self.refusal is None:
            self.refusal = batch_refusal(model, streams)
        features.attach(model)
        self.generator: Any = self._new_generator() if self.refusal is None else None
        self.rows: dict[int, _Row] = {}  # request uid -> row
        self.by_guid: dict[int, _Row] = {}  # generator uid -> row
        self.fallback: set[int] = set()  # request uids on the streams
        self.batched = 0  # requests that ran in the batch
        self.sent_back = 0  # requests sent to the streams
        self.warm_started = 0  # batch rows started from a kept prefix
        self.steps = 0  # decoding steps of the batch
        self.step_rows = 0  # tokens those steps produced (over steps: the mean batch size)

    def _new_generator(self) -> Any:
        language_model = getattr(self.model, "language_model", self.model)
        return _warm_start_class()(
            language_model,
            _Shim(),
            sampler=_RowSampler(self),
            compute_logprobs=False,  # the row sampler keeps what a request asked for
            **self._shape,
        )

    # ----- the Decoder interface -----
    def add(self, spec: DecodeSpec) -> Started:
        """Prepare a request (processor, towers, embeddings) and queue it on the batch, or on the streams."""
        inputs = self._inputs(spec) if self._batchable(spec) else None
        warm = self._warm_start(spec, inputs["input_ids"]) if inputs is not None else None
        if inputs is None or self._reuses_text_prefix(spec, inputs["input_ids"]):
            self.fallback.add(spec.uid)
            self.sent_back += 1
            return self.streams.add(spec)
        if warm is not None:
            self.streams.states.pop(spec.media_key, None)  # the row owns (and extends) the kept cache now
        ids, kwargs = self._embed(spec, inputs)
        (guid,) = self.generator.insert(
            [ids],
            # One more than allowed: the decoder ends the row itself, after keeping its cache.
            max_tokens=[spec.max_tokens + 1],
            prompt_kwargs=[kwargs],
            logits_processors=[list(spec.processors) or None],
        )
        row = _Row(spec, guid, ids, TokenText(self, spec), cached=warm[0] if warm is not None else 0)
        if warm is not None:
            self.generator.warm[guid] = warm
            self.warm_started += 1
            self.streams.cache_stats.hits += 1
            self.streams.cache_stats.reused_tokens += warm[0]
        if spec.media_key and self.streams.prefix_entries > 0:
            self.streams.cache_stats.lookups += 1
        self.rows[spec.uid] = self.by_guid[guid] = row
        self.batched += 1
        return Started()

    def _batchable(self, spec: DecodeSpec) -> bool:
        """Whether a request may run in the batch (else the streams: see the module docstring)."""
        return self.refusal is None and not spec.speculative

    def _kept(self, spec: DecodeSpec) -> Any:
        """The kept prefix state for a media request's media (None: none, or the prefix cache is off)."""
        if not spec.media_key or self.streams.prefix_entries <= 0:
            return None
        return self.streams.states.get(spec.media_key)

    def _warm_start(self, spec: DecodeSpec, input_ids: Any) -> tuple[int, list[Any]] | None:
        """The prefix kept for a media request's media to start its batch row from: (prefix length, its KV
        cache trimmed to it); None: the row starts cold.

        No reuse when no state is kept for its media, the prompt shares none of it (or all of it: a row needs
        a token to prefill), the part after the prefix holds media tokens, or the cache cannot be cut back to
        the prefix (mlx-vlm's per-request rules). A batch row starts only from attention KV caches: a recurrent
        (linear-attention) state would also run over the right-padding mlx-vlm gives a warm row admitted
        beside longer ones (answers changed on Qwen 3.5), so such a model's rows start cold. (The streams could
        reuse an exact continuation there, but a penalised one reused so on Qwen 3.5 answered differently from
        the cache off, not yet explained: cold keeps answers equal.)
        """
        state = self._kept(spec)
        if state is None or state.cache is None:
            return None
        from mlx_vlm.apc import multimodal_token_ids_from_config, prefix_leaves_text_only_suffix
        from mlx_vlm.generate.dispatch import _prefix_cache_trim_amount

        ids = [int(i) for i in input_ids.reshape(-1).tolist()]
        prefix = int(state.find_prefix_length(ids))
        if not 0 < prefix < len(ids):
            return None
        if not prefix_leaves_text_only_suffix(
            ids, prefix, multimodal_token_ids_from_config(self.model.config)
        ):
            return None
        drop = _prefix_cache_trim_amount(state.cache, prefix)
        trimmable = all(getattr(layer, "is_trimmable", lambda: False)() for layer in state.cache)
        if drop is None or not trimmable:
            return None
        for layer in state.cache:
            if drop:
                layer.trim(drop)
        return prefix, list(state.cache)

    def _reuses_text_prefix(self, spec: DecodeSpec, input_ids: Any) -> bool:
        """Whether a text-only request shares at least half its prompt with the kept text state.

        Text-only requests share one kept state (every conversation), so only one that continues it goes to
        the streams; others batch.
        """
        state = (
            self.streams.states.get(()) if not spec.media_key and self.streams.prefix_entries > 0 else None
        )
        if state is None:
            return False
        ids = [int(i) for i in input_ids.reshape(-1).tolist()]
        return 2 * int(state.find_prefix_length(ids)) >= len(ids)

    def _inputs(self, spec: DecodeSpec) -> dict[str, Any]:
        """mlx-vlm's processor outputs for a request, as its own generator would prepare them."""
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

        config = self.model.config
        return dict(
            prepare_inputs(
                self.processor,
                images=spec.images or None,
                audio=spec.audio or None,
                videos=spec.video or None,
                prompts=spec.prompt_text,
                image_token_index=getattr(config, "image_token_index", None),
                add_special_tokens=should_add_special_tokens(config.model_type, self.processor),
            )
        )

    def _embed(self, spec: DecodeSpec, inputs: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        """The prompt's ids and the generator's per-row kwargs (embeddings, mRoPE positions and deltas)."""
        input_ids = inputs["input_ids"]
        data = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        with self.features.scope(spec.media_key):
            embedded = self.model.get_input_embeddings(
                input_ids, inputs.get("pixel_values"), mask=inputs.get("attention_mask"), **data
            )
        kwargs = {**data, **{k: v for k, v in embedded.to_dict().items() if v is not None}}
        return [int(i) for i in input_ids.reshape(-1).tolist()], _row_kwargs(kwargs)

    def busy(self) -> bool:
        """Whether a request is queued, prefilling or decoding here or on the streams."""
        return bool(self.rows) or self.streams.busy()

    def cancel(self, uid: int) -> None:
        """Drop a request now: out of the batch (between prompt chunks too), or off the streams."""
        if uid in self.fallback:
            self.fallback.discard(uid)
            self.streams.cancel(uid)
            return
        row = self.rows.get(uid)
        if row is not None:
            self._drop(row)

    def _drop(self, row: _Row) -> None:
        self.generator.warm.pop(row.guid, None)
        self.generator.remove(row.guid)
        self.rows.pop(row.spec.uid, None)
        self.by_guid.pop(row.guid, None)

    def step(self) -> list[TokenEvent]:
        """One token (or one prompt chunk) for the batch, and one token for each request on the streams."""
        out: list[TokenEvent] = []
        if self.fallback:
            out += self.streams.step()
            self.fallback &= set(self.streams.streams)
        if not self.rows:
            return out
        for row in list(self.rows.values()):
            if (
                row.produced == 0 and row.spec.should_stop()
            ):  # cancelled or shutting down: stop between chunks
                self._drop(row)
                out.append(TokenEvent(row.spec.uid, None, finish=FinishReason.CANCELLED))
        if not self.rows:
            return out
        _prompts, responses = self.generator.next()
        if responses:
            self.steps += 1
            self.step_rows += len(responses)
        for response in responses:
            live = self.by_guid.get(response.uid)
            if live is not None:
                out.append(self._on_token(live, int(response.token)))
        return out

    def _on_token(self, row: _Row, token: int) -> TokenEvent:
        spec = row.spec
        row.produced += 1
        row.tokens.append(token)
        vector = row.logprobs.popleft() if row.logprobs else None
        finish = spec.finish_after(token, row.produced)
        event = token_event(
            spec, row.text, token, vector, finish, prompt_tokens=len(row.prompt), cached_tokens=row.cached
        )
        if finish is not None:
            self._keep_prefix(row)
            self._drop(row)
        return event

    def _keep_prefix(self, row: _Row) -> None:
        """Keep a finished row's KV cache (prompt and answer) for the next turn with the same media."""
        if self.streams.prefix_entries <= 0:
            return
        from mlx_vlm.generate.common import PromptCacheState

        batch = self.generator._generation_batch  # the row's cache lives only there
        if row.guid not in batch.uids:
            return
        index = batch.uids.index(row.guid)
        try:
            # A batch that only ever held this row keeps mlx-vlm's plain per-layer caches: those are the row's.
            cache = [layer.extract(index) if _batched(layer) else layer for layer in batch.prompt_cache]
        except (AttributeError, NotImplementedError, ValueError):
            return  # a cache kind that cannot be taken out of a batch: the next turn starts cold
        state = PromptCacheState()
        # The cache holds the prompt and every answer token the batch has fed back (the last one included).
        state.update(row.prompt + row.tokens, cache)
        self.streams.keep(row.spec.media_key, state)

    def stats(self) -> DecoderStats:
        """Requests here and on the streams, drafting counters, the prefix cache and the feature cache."""
        streams = self.streams.stats()
        return dataclasses.replace(
            streams,
            active=len(self.rows) + streams.active,
            features=self.features.describe(),
            cache=("vlm", {**self.streams.describe(), **self.describe()}),
        )

    def describe(self) -> CacheInfo:
        """How requests were split between the batch and the streams."""
        return {
            "batching": self.refusal is None,
            "batched": self.batched,
            "sent_to_streams": self.sent_back,
            "warm_started": self.warm_started,
            "batch_steps": self.steps,
            "batch_rows": self.step_rows,
        }

    def reset(self) -> None:
        """After a failed step: a fresh generator, no requests (the caches are kept)."""
        self.streams.reset()
        self.fallback.clear()
        self.rows.clear()
        self.by_guid.clear()
        if self.generator is not None:
            self.generator.close()
            self.generator = self._new_generator()

    def close(self) -> None:
        """Release the generator and the streams."""
        self.streams.close()
        if self.generator is not None:
            self.generator.close()

    # ----- TextCodec: mlx-vlm's batch gives token ids; text comes from mlx-vlm's own streaming detokenizer -----
    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids to text, with the processor's tokenizer."""
        return self.streams.detokenize(ids)

    def detokenizer(self) -> Any:
        """A fresh copy of the processor's streaming detokenizer (the one mlx-vlm's own generator uses)."""
        from mlx_vlm.tokenizer_utils import make_streaming_detokenizer

        return make_streaming_detokenizer(self.processor)


class _NoHarvest:
    """The prefix-cache manager mlx-vlm's warm-row admission expects: the decoder keeps prefixes itself (per
    media, see `VlmStreams`), so nothing is stored here and there are no shared blocks to release."""

    exact_cache_guard_tokens = 1

    def release(self, blocks: Any) -> None:
        """Nothing was lent."""

    def store_exact_cache(self, *args: Any, **kwargs: Any) -> bool:
        """Nothing is kept here."""
        return False


_WARM_START: type | None = None


def _warm_start_class() -> type:
    """mlx-vlm's BatchGenerator whose rows may start from a given KV cache (`warm`: generator uid -> (prefix
    length, per-layer caches)).

    mlx-vlm 0.7.10's `insert` takes no caches; its only way to start a row from one is the automatic prefix
    cache's admission, which looks each admitted prompt up (`_apc_pick_for`) and, on a hit, prefills only the
    suffixes of the batch's rows, right-padded, over the hit's cache merged with fresh ones for the other rows.
    Its lookup is answered here from `warm` (in its "exact" form: a whole cache and its length); hashing,
    harvesting and checkpoints are off, so rows without a warm start are admitted exactly as before.
    """
    global _WARM_START
    if _WARM_START is not None:
        return _WARM_START
    from mlx_vlm.generate.ar import BatchGenerator

    class WarmStart(BatchGenerator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.warm: dict[int, tuple[int, list[Any]]] = {}
            self.apc_manager = _NoHarvest()  # type: ignore[assignment]  # the two methods it calls
            self.apc_mode = "exact"

        def _build_mixed_prompt_batch(self, sequences: list[Any]) -> Any:
            # Only an admission with a warm row takes the warm path; the others are admitted as before.
            if not any(sequence[0] in self.warm for sequence in sequences):
                return None
            batch = super()._build_mixed_prompt_batch(sequences)
            if batch is not None and batch._token_context:
                # Logits processors (penalties) see the whole prompt, as on a cold row, not just the suffix.
                batch._token_context = [list(sequence[1]) for sequence in sequences]
            return batch

        def _apc_pick_for(self, sequence: Any) -> dict[str, Any] | None:
            found = self.warm.pop(sequence[0], None)
            if found is None:
                # A cold row admitted beside a warm one: its own empty cache (mlx-vlm would ask the language
                # model's make_cache, which not every model has).
                from mlx_vlm.models.cache import make_prompt_cache

                found = (0, make_prompt_cache(self.model))
            prefix, cache = found
            return {
                "matched_blocks": [],
                "warm_cache": cache,
                "prefix_len": prefix,
                "extra_hash": 0,
                "full_input_ids": list(sequence[1]),
            }

        def _apc_extra_hash(self, prompt_kwargs: Any) -> int:
            return 0

        def _apc_exact_checkpoint_len(self, ids_list: Any) -> int:
            return 0

        def _apc_exact_checkpoint_lengths(self, ids_list: Any) -> list[int]:
            return []

        def _build_apc_meta_for_cold(self, input_ids_list: Any, prompt_kwargs_list: Any) -> None:
            return None

    _WARM_START = WarmStart
    return WarmStart


def _row_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The prompt kwargs one batch row carries: without the towers' raw inputs, which the embeddings already
    hold and which cannot be stacked across rows (audio features and video patches differ in length)."""
    import mlx.core as mx
    from mlx_vlm.generate.ar import _prompt_kwarg_batch_size

    return {
        key: value
        for key, value in kwargs.items()
        if not key.startswith(("pixel_values", "input_features", "feature_attention_mask"))
        and not (isinstance(value, mx.array) and value.ndim > 0 and _prompt_kwarg_batch_size(key, value) != 1)
    }


def _batched(layer: Any) -> bool:
    from mlx_vlm.generate.ar import _is_batch_cache_entry

    return bool(_is_batch_cache_entry(layer))


def batch_refusal(model: Any, streams: VlmStreams) -> str | None:
    """Why a model's requests cannot run in mlx-vlm's batch (None: they can)."""
    if streams.draft_model is not None:
        return "a drafter is loaded (drafting runs per request)"
    if "kv_bits" in streams.options or "max_kv_size" in streams.options:
        return "a quantized or rotating KV cache (they run per request)"
    from mlx_vlm.generate.ar import _make_cache

    try:
        _make_cache(getattr(model, "language_model", model), [0])
    except (ValueError, NotImplementedError, TypeError) as exc:
        return f"its caches cannot batch ({' '.join(str(exc).split())[:120]})"
    return None
