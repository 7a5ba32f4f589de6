"""Per-request decoding controls (sampler, logits processors) and the text batcher, built one way for every rank.

The engine builds them from a prepared request; in a distributed run each follower rank builds the same ones
from a `Recipe` (the prepared request's decoding inputs, sent as JSON by rank 0), so every rank's batch
makes the same choices: keyed samplers with the same seed, the same penalties, grammar and thinking budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from backends.decoder import TextCodec
from backends.prefix_cache import PrefixCache
from backends.sampling import SamplingParams, ThinkingBudget, greedy_token, make_processors, make_sampler
from backends.text_decoders import TextBatcher
from gallery.config import ModelConfig


@dataclasses.dataclass
class Recipe:
    """What a text-route request needs to decode, and nothing that cannot cross a process boundary."""

    uid: int
    prompt: list[int]
    max_tokens: int
    stop_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None
    grammar: str | None = None
    thinking_budget: int | None = None
    thinking: bool = False
    starts_inside: bool = False

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (logit-bias keys become strings)."""
        data = dataclasses.asdict(self)
        bias = self.params.logit_bias
        data["params"]["logit_bias"] = {str(k): v for k, v in bias.items()} if bias else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        """The recipe to_json wrote."""
        params = dict(data["params"])
        if params.get("logit_bias"):
            params["logit_bias"] = {int(k): float(v) for k, v in params["logit_bias"].items()}
        return cls(**{**data, "params": SamplingParams(**params)})


class Guarded:
    """Runs one request's sampler or processor; a failure is reported (marking that request) instead of
    raised, so it never fails the whole batch: the sampler falls back to greedy, a processor to no change."""

    def __init__(
        self, fn: Callable[..., Any], report: Callable[[str], None] | None = None, *, sampler: bool = False
    ) -> None:
        self.fn, self.report, self.sampler = fn, report, sampler

    def __call__(self, *args: Any) -> Any:
        try:
            return self.fn(*args)
        except Exception as exc:
            if self.report is not None:
                self.report(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            return greedy_token(args[0]) if self.sampler else args[-1]


def text_controls(recipe: Recipe, backend: Any, config: ModelConfig) -> tuple[Any, list[Any]]:
    """(sampler or None for greedy, logits processors) for one request on an mlx-lm backend."""
    reasoning = config.mlx.reasoning
    sampler = make_sampler(recipe.params, backend.vocab_size)
    processors: list[Any] = make_processors(recipe.params)
    end_ids = backend.encode_plain(reasoning.end) if reasoning.supported and reasoning.end else []
    start_ids = backend.encode_plain(reasoning.start) if reasoning.supported and reasoning.start else []
    inside = recipe.starts_inside and recipe.thinking
    if recipe.thinking_budget is not None:
        processors.append(ThinkingBudget(recipe.thinking_budget, start_ids, end_ids, inside=inside))
    if recipe.grammar is not None:
        from backends.grammar import GrammarProcessor, llg_tokenizer

        processors.append(
            GrammarProcessor(
                recipe.grammar,
                llg_tokenizer(backend.hf_tokenizer),
                sorted(recipe.stop_ids) or config.mlx.stop_token_ids,
                reasoning_start=start_ids,
                reasoning_end=end_ids,
                inside=inside,
                may_think=recipe.thinking,
            )
        )
    return sampler, processors


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """What shapes the text batch and its prefix cache (the same on every rank)."""

    max_batch: int = 32
    prefill_batch: int = 8
    prefill_step: int = 512
    max_kv_size: int | None = None
    prefix_entries: int = 32  # 0: prefix cache off
    prefix_bytes: int = 1024 * 1024 * 1024
    deferred_eviction: bool = False  # distributed: evict by bytes only when rank 0 says so (see PrefixCache)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data."""
        return dataclasses.asdict(self)


def new_prefix_cache(settings: BatchSettings) -> PrefixCache:
    """The prefix cache the settings ask for."""
    return PrefixCache(
        entries=settings.prefix_entries,
        max_bytes=settings.prefix_bytes,
        deferred_eviction=settings.deferred_eviction,
    )


def new_batcher(
    model: Any,
    prefix: PrefixCache,
    settings: BatchSettings,
    *,
    codec: TextCodec | None = None,
    solo: bool = False,
) -> TextBatcher:
    """A continuous-batching decoder over model, sharing prefix (`codec`: to write text; None on follower ranks;
    `solo`: a lone request decodes alone until another arrives)."""
    return TextBatcher(
        model,
        prefix,
        max_batch=settings.max_batch,
        prefill_batch=settings.prefill_batch,
        prefill_step=settings.prefill_step,
        max_kv_size=settings.max_kv_size,
        codec=codec,
        solo=solo,
    )
