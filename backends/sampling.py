"""Per-request sampling: position-keyed samplers, one vectorized draw per batch, processors, log-probabilities.

Every request gets its own sampler and processors, and no request touches MLX's global random state:
- a sampled request draws token n with noise keyed by (its seed, n) — splitmix64 of the two, the key of an
  MLX (threefry) Gumbel draw over the vocabulary — so a seeded request gives the same tokens alone or inside
  any batch, and an unseeded one gets a fresh seed of its own. (mlx-lm's samplers draw from the global
  random state, which one bad value inside a compiled sampler can leave unusable for every later request.)
- `sample_rows` draws a whole batch in one call with each row's own temperature, top-p, top-k, min-p and
  key (greedy rows: argmax); a request's own sampler is that same function on its one row, so a row
  samples the same whether it is alone (the lone-request path, the streams) or inside a batch. The text
  batch shares one `BatchSampler` over every row, so mlx-lm samples the batch in one call, not one per row.
- greedy requests get no sampler at all, so a batch of them shares one batched argmax.
- the penalties are mlx-lm's own logits processors; the filters are written here, vectorized per row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import secrets
from collections.abc import Callable, Iterator, Sequence
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
    """Samples one sequence's next token from its log-probabilities, keyed by (seed, token position).

    Calling it draws one position with `sample_rows` on its single row; inside the text batch, the
    `BatchSampler` reads its parameters and position instead and draws it together with the other rows.
    """

    def __init__(self, params: SamplingParams, seed: int, vocab_size: int) -> None:
        self.params = params
        self.seed = seed
        self.position = 0
        self.vocab_size = vocab_size

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx

        if logprobs.ndim == 1:  # one unbatched row: a token id of shape ()
            return sample_rows(logprobs[None], [self])[0]
        if logprobs.shape[0] == 1:  # what every decoder here gives a request's own sampler
            return sample_rows(logprobs, [self])
        # Several rows of this one request: one position each, in order.
        return mx.concatenate([sample_rows(logprobs[i : i + 1], [self]) for i in range(logprobs.shape[0])])


def _row_key(seed: int, position: int) -> tuple[int, int]:
    # The two 32-bit words of mx.random.key(_position_seed(seed, position)), built on the host for a batch.
    key = _position_seed(seed, position)
    return key >> 32, key & 0xFFFFFFFF


def sample_rows(logprobs: Any, rows: Sequence[KeyedSampler | None]) -> Any:
    """One token per row of `logprobs` (rows, vocab), drawn in one vectorized pass; advances each row's position.

    A None row is greedy (argmax). A keyed row keeps the tokens that pass all of its filters — top-p (the
    most likely tokens whose mass before them is under top_p, as mlx-lm's apply_top_p), top-k (tokens at
    least as likely as the k-th), min-p (at least min_p times the best token's probability) — and takes
    argmax(logprobs / temperature + Gumbel noise) over them: a draw from the filtered, tempered
    distribution. Every operation is row-wise and the noise of a row depends only on (seed, position,
    vocabulary size), so a row's token does not depend on which rows share the batch.
    """
    import mlx.core as mx

    greedy = mx.argmax(logprobs, axis=-1)
    count, vocab = logprobs.shape
    if len(rows) != count:
        raise ValueError(f"{len(rows)} samplers for a batch of {count} rows")
    keyed = [row for row in rows if row is not None]
    argmax_rows = [row is None or row.params.greedy for row in rows]
    if all(argmax_rows):
        for row in keyed:
            row.position += 1
        return greedy
    rest = KeyedSampler(SamplingParams(temperature=1.0), 0, vocab)  # a stand-in in greedy rows' lanes
    lanes = [
        rest if greedy_row or row is None else row for row, greedy_row in zip(rows, argmax_rows, strict=True)
    ]
    params = [lane.params for lane in lanes]
    lp = logprobs.astype(mx.float32)
    floor = mx.max(lp, axis=-1, keepdims=True) + mx.array(
        [[math.log(p.min_p) if p.min_p > 0.0 else -math.inf] for p in params], dtype=mx.float32
    )
    # top_k at or above the vocabulary filters nothing (the logits may be wider than the vocabulary)
    tops = [
        p.top_k if 0 < p.top_k < min(lane.vocab_size, vocab) else vocab
        for p, lane in zip(params, lanes, strict=True)
    ]
    nucleus = [p.top_p if 0.0 < p.top_p < 1.0 else 2.0 for p in params]  # 2.0: every token's mass is under it
    cutoff = _rank_cutoffs(lp, tops, nucleus)
    if cutoff is not None:
        floor = mx.maximum(floor, cutoff)
    inverse = mx.array([[1.0 / p.temperature] for p in params], dtype=mx.float32)
    keys = mx.array([_row_key(lane.seed, lane.position) for lane in lanes], dtype=mx.uint32)
    noise = mx.vmap(lambda key: mx.random.gumbel(shape=(vocab,), key=key))(keys)
    scores = mx.where(lp >= floor, lp * inverse + noise, -mx.inf)
    drawn = mx.argmax(scores, axis=-1)
    if any(argmax_rows):
        drawn = mx.where(mx.array(argmax_rows), greedy, drawn)
    for row in keyed:  # the draw is built: each row moves on to its next position
        row.position += 1
    return drawn


def _rank_cutoffs(lp: Any, tops: list[int], nucleus: list[float]) -> Any:
    """Each row's lowest kept log-probability under its top-k and top-p, (rows, 1); None if no row has either.

    The kept tokens are the most likely prefix of the row's order, so only its first ranks are sorted: a row
    with top-k k needs the best w tokens, w the power of two at or above k (its top-p, if any, is decided
    inside them: it can only keep fewer than k); a row with top-p alone needs the whole order. Rows are
    grouped by w — a value of the row's own, so a row computes the same in any batch — and each group takes
    one top-w and one sort; rows that filter neither way are left out of both.
    """
    import mlx.core as mx

    count, vocab = lp.shape
    groups: dict[int, list[int]] = {}
    for row, (k, p) in enumerate(zip(tops, nucleus, strict=True)):
        if k < vocab:
            groups.setdefault(min(vocab, 1 << (k - 1).bit_length()), []).append(row)
        elif p < 1.0:
            groups.setdefault(vocab, []).append(row)
    if not groups:
        return None
    order: list[int] = []
    parts = []
    for window, members in sorted(groups.items()):
        sub = lp if len(members) == count else lp[mx.array(members)]
        best = sub if window == vocab else mx.topk(sub, window, axis=-1)
        ranked = -mx.sort(-best, axis=-1)
        probs = mx.exp(ranked)
        mass_before = mx.cumsum(probs, axis=-1, inclusive=False)
        total = mx.sum(mx.exp(sub), axis=-1, keepdims=True)
        top_p = mx.array([[nucleus[row]] for row in members], dtype=mx.float32)
        within = (mass_before < top_p * total).sum(axis=-1)
        limit = mx.array([min(tops[row], window) for row in members], dtype=within.dtype)
        kept = mx.maximum(mx.minimum(within, limit), 1)
        parts.append(mx.take_along_axis(ranked, (kept - 1)[:, None], axis=-1))
        order.extend(members)
    if len(order) == count and order == list(range(count)):
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)
    # Back into row order; rows outside every group get -inf (no cutoff).
    grouped = set(order)
    rest = [row for row in range(count) if row not in grouped]
    if rest:
        parts.append(mx.full((len(rest), 1), -mx.inf, dtype=mx.float32))
    position = {row: i for i, row in enumerate([*order, *rest])}
    return mx.concatenate(parts)[mx.array([position[row] for row in range(count)])]


def keyed_sampler(sampler: Any) -> KeyedSampler | None:
    """The KeyedSampler a request's sampler draws with: itself, or the one a guard wraps as `.fn`
    (runtime.controls.Guarded); None for any other sampler (the batch then calls it on its own row)."""
    if isinstance(sampler, KeyedSampler):
        return sampler
    inner = getattr(sampler, "fn", None)
    return inner if isinstance(inner, KeyedSampler) else None


class BatchSampler:
    """The one sampler every row of a text batch shares, so mlx-lm samples the batch in one call.

    mlx-lm's batch calls a shared sampler once with every row's log-probabilities, but tells it nothing
    about the rows: the batch (backends.keyed_batch) names the rows, in order, with `rows_of` around each
    call. Each row's request sampler (registered by generator uid with `add`) supplies its parameters and
    position; a greedy row has none. If the vectorized draw raises, every row is drawn again on its own,
    through its own sampler (and its guard): only the request whose sampler fails is failed, and the
    other rows get exactly the tokens the batched draw would have given them.
    """

    def __init__(self) -> None:
        self.samplers: dict[int, Any] = {}  # generator uid -> the request's sampler (guarded); absent: greedy
        self.rows: list[int] | None = None  # the generator uids of the rows being sampled, in row order
        self.calls = 0  # sampler calls on batches with sampled rows (one per batch step)
        self.fallbacks = 0  # of those, calls drawn row by row

    def add(self, uid: int, sampler: Any) -> None:
        """Register the sampler of the request at generator uid `uid` (None: greedy)."""
        if sampler is not None:
            self.samplers[uid] = sampler

    def discard(self, uid: int) -> None:
        """Forget a row that left the batch."""
        self.samplers.pop(uid, None)

    def clear(self) -> None:
        """Forget every row."""
        self.samplers.clear()
        self.rows = None

    @contextlib.contextmanager
    def rows_of(self, uids: list[int]) -> Iterator[None]:
        """Name the rows (generator uids, in row order) that the calls inside the block sample."""
        self.rows = uids
        try:
            yield
        finally:
            self.rows = None

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx

        if not self.samplers:  # nothing sampled anywhere: the shared argmax, as mlx-lm's greedy sampler
            return mx.argmax(logprobs, axis=-1)
        uids = self.rows
        if uids is None or len(uids) != logprobs.shape[0]:
            raise RuntimeError(
                "the batch sampler was called on rows it was not told about (an mlx-lm batch step changed?)"
            )
        samplers = [self.samplers.get(uid) for uid in uids]
        if all(sampler is None for sampler in samplers):
            return mx.argmax(logprobs, axis=-1)
        self.calls += 1
        keyed = [keyed_sampler(sampler) for sampler in samplers]
        if all(k is not None or s is None for k, s in zip(keyed, samplers, strict=True)):
            try:
                return sample_rows(logprobs, keyed)
            except Exception:  # one row's values broke the batched draw: each row alone, through its guard
                pass
        self.fallbacks += 1
        greedy = mx.argmax(logprobs, axis=-1)
        return mx.concatenate(
            [
                greedy[i : i + 1]
                if sampler is None
                else sampler(logprobs[i : i + 1]).reshape(1).astype(greedy.dtype)
                for i, sampler in enumerate(samplers)
            ]
        )


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
