"""Per-request sampling: position-keyed samplers, logits processors, and log-probabilities.

Every request gets its own sampler and processors, and no request touches MLX's global random state:
- a sampled request draws token n with a key derived from (its seed, n) — the scheme mlx-vlm uses for its
  batched rows — so a seeded request gives the same tokens alone or inside any batch, and an unseeded one
  gets a fresh seed of its own. (mlx-lm's samplers draw from the global random state, which one bad value
  inside a compiled sampler can leave unusable for every later request.)
- greedy requests get no sampler at all, so a batch of them shares one batched argmax.
- the filters (top-p, min-p, top-k) and the penalties are mlx-lm's own functions; only the keyed draw and
  the range checks that keep those compiled functions from failing are written here.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Sequence
from typing import Any

Processor = Callable[[Any, Any], Any]

MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Resolved sampling settings of one request (validated by the runtime before they get here)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    presence_penalty: float | None = None
    presence_context_size: int = 20
    frequency_penalty: float | None = None
    frequency_context_size: int = 20
    logit_bias: dict[int, float] | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether this request decodes greedily (argmax)."""
        return self.temperature <= 0.0


def random_seed() -> int:
    """A fresh seed for a request that did not send one (reported back, so it can be replayed)."""
    return secrets.randbits(62)


def _position_seed(seed: int, position: int) -> int:
    # splitmix64 of (seed, position): a stateless key per token, so a row samples the same in any batch.
    x = (int(seed) * 0x9E3779B97F4A7C15 + (int(position) + 1) * 0xC2B2AE3D27D4EB4F) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


class KeyedSampler:
    """Samples one sequence's next token from its log-probabilities, keyed by (seed, token position)."""

    def __init__(self, params: SamplingParams, seed: int, vocab_size: int) -> None:
        self.params = params
        self.seed = seed
        self.position = 0
        self.vocab_size = vocab_size

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        params = self.params
        key = mx.random.key(_position_seed(self.seed, self.position))
        self.position += 1
        if 0.0 < params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if params.min_p > 0.0:
            logprobs = apply_min_p(logprobs, params.min_p)
        if 0 < params.top_k < min(self.vocab_size, logprobs.shape[-1]):  # k >= vocab filters nothing
            logprobs = apply_top_k(logprobs, params.top_k)
        return mx.random.categorical(logprobs * (1.0 / params.temperature), key=key)


def greedy_token(logprobs: Any) -> Any:
    """The argmax token of log-probabilities (what a failed sampler falls back to for its one step)."""
    import mlx.core as mx

    return mx.argmax(logprobs, axis=-1)


def make_sampler(params: SamplingParams, vocab_size: int) -> KeyedSampler | None:
    """The request's sampler; None for greedy decoding (the batch's shared argmax)."""
    if params.greedy:
        return None
    return KeyedSampler(params, params.seed if params.seed is not None else random_seed(), vocab_size)


def make_processors(params: SamplingParams) -> list[Processor]:
    """mlx-lm's logits processors for the request's bias and penalties (each with its context size)."""
    from mlx_lm.sample_utils import make_logits_processors

    return list(
        make_logits_processors(
            logit_bias=params.logit_bias or None,
            repetition_penalty=params.repetition_penalty
            if params.repetition_penalty not in (None, 1.0)
            else None,
            repetition_context_size=params.repetition_context_size,
            presence_penalty=params.presence_penalty or None,
            presence_context_size=params.presence_context_size,
            frequency_penalty=params.frequency_penalty or None,
            frequency_context_size=params.frequency_context_size,
        )
    )


def token_logprobs(logprobs: Any, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the `top` most likely alternatives (id, logprob), best first."""
    import mlx.core as mx

    row = logprobs.reshape(-1)
    chosen = float(row[token].item())
    if top <= 0:
        return chosen, []
    count = min(top, row.shape[0])
    best = mx.argpartition(-row, kth=count - 1)[:count]
    values = row[best]
    order = mx.argsort(-values)
    ids: list[Any] = best[order].tolist()  # type: ignore[assignment,unused-ignore]  # a 1-d array: a flat list
    scores: list[Any] = values[order].tolist()  # type: ignore[assignment,unused-ignore]
    return chosen, [(int(i), float(v)) for i, v in zip(ids, scores, strict=True)]


class ThinkingBudget:
    """A logits processor that closes the reasoning block after `budget` reasoning tokens.

    It follows the generated tokens (the last one of the context it is given each step): inside a reasoning
    block it counts them, and once the count reaches the budget it forces the tokens of the config's end
    marker, after which the answer follows as usual. The block opens when the prompt ends inside it or when
    the start marker's tokens are generated.
    """

    def __init__(
        self, budget: int, start_ids: Sequence[int], end_ids: Sequence[int], *, inside: bool
    ) -> None:
        self.budget = budget
        self.start_ids = list(start_ids)
        self.end_ids = list(end_ids)
        self.inside = inside
        self.count = 0
        self.recent: list[int] = []
        self.forcing: list[int] = []
        self.first = True
        self.closed_by_budget = False

    def _seen(self, token: int) -> None:
        self.recent = [*self.recent, token][-max(len(self.start_ids), len(self.end_ids), 1) :]
        if self.inside:
            self.count += 1
            if self.end_ids and self.recent[-len(self.end_ids) :] == self.end_ids:
                self.inside = False
        elif self.start_ids and self.recent[-len(self.start_ids) :] == self.start_ids:
            self.inside, self.count = True, 0

    def __call__(self, tokens: Any, logits: Any) -> Any:
        if self.first:
            self.first = False  # the context ends with the prompt's last token: nothing generated yet
        elif len(tokens):
            self._seen(int(tokens[-1].item()))
        if not self.forcing and self.inside and self.count >= self.budget and self.end_ids:
            self.forcing = list(self.end_ids)
            self.closed_by_budget = True
        if not self.forcing:
            return logits
        import mlx.core as mx

        forced = self.forcing.pop(0)
        allowed = mx.arange(logits.shape[-1]) == forced
        return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))


def recover_random_state() -> None:
    """Give MLX's global random generator a fresh, valid state.

    A compiled function that raises while tracing can leave `mx.random.state` holding an unevaluated
    placeholder ("eval an array without a primitive" on every later draw). Requests never draw from the
    global state here, but library code may: after any failed step the worker calls this.
    """
    import mlx.core as mx

    mx.random.seed(secrets.randbits(32))
