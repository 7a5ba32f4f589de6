"""One vectorized sampler over the text batch: per-row parameters, keyed draws, one call per step.

- `sample_rows` gives every row the token it gets alone, whatever rows share the batch and in any order
  (mixed temperature, top-p, top-k, min-p, greedy rows); the same seed reproduces, another seed differs.
- Its draws follow the filtered, tempered distribution: empirical frequencies over a fixed set of seeds on a
  four-token distribution match the expected probabilities (no timing, no randomness at test time).
- On the real text batch (mlx-lm's BatchGenerator over the tiny text-qwen2 model) every row is drawn in one
  call per step — no request's own sampler is called — and the tokens equal mlx-lm's one-call-per-row path.
- A request whose sampler fails inside the batch fails alone (its guard reports it, its row falls back to
  greedy) and the other rows keep exactly their tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.sampling import KeyedSampler, SamplingParams

pytestmark = pytest.mark.mlx

MIXED = [
    SamplingParams(temperature=0.7, top_p=0.9, seed=1),
    SamplingParams(temperature=1.3, top_k=5, seed=2),
    None,  # greedy
    SamplingParams(temperature=1.0, min_p=0.2, seed=3),
    SamplingParams(temperature=1.0, top_k=3, top_p=0.5, min_p=0.1, seed=4),
    SamplingParams(temperature=2.0, seed=5),
    SamplingParams(temperature=0.3, top_k=1000, top_p=0.99, seed=6),  # k beyond the vocabulary: no filter
    SamplingParams(temperature=1.1, top_k=40, seed=8),
]


def _rows(params: list[SamplingParams | None], vocab: int) -> list[KeyedSampler | None]:
    return [None if p is None else KeyedSampler(p, p.seed or 0, vocab) for p in params]


def _logprobs(rows: int, vocab: int, seed: int) -> Any:
    import mlx.core as mx

    logits = mx.random.normal((rows, vocab), key=mx.random.key(seed)) * 3.0
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _draw(logprobs: Any, rows: list[KeyedSampler | None]) -> list[int]:
    from backends.sampling import sample_rows

    tokens: list[int] = sample_rows(logprobs, rows).tolist()  # type: ignore[assignment]
    return tokens


def test_a_row_draws_the_same_alone_and_in_any_batch_in_any_order() -> None:
    import mlx.core as mx

    vocab = 64
    batched, alone, shuffled = _rows(MIXED, vocab), _rows(MIXED, vocab), _rows(MIXED, vocab)
    order = [5, 2, 7, 0, 6, 3, 1, 4]
    for step in range(8):
        logprobs = _logprobs(len(MIXED), vocab, step)
        together = _draw(logprobs, batched)
        one_by_one = [
            _draw(logprobs[i : i + 1], [row])[0] if row is not None else int(mx.argmax(logprobs[i]).item())
            for i, row in enumerate(alone)
        ]
        permuted = _draw(logprobs[mx.array(order)], [shuffled[i] for i in order])
        assert together == one_by_one
        assert [permuted[order.index(i)] for i in range(len(MIXED))] == together
        assert together[2] == int(mx.argmax(logprobs[2]).item())  # the greedy row is the argmax
    # A request's own sampler is the same function on its one row (what the lone-request path calls).
    own = _rows(MIXED, vocab)
    again = _rows(MIXED, vocab)
    logprobs = _logprobs(len(MIXED), vocab, 99)
    for i, row in enumerate(own):
        if row is not None:
            assert int(row(logprobs[i : i + 1]).item()) == _draw(logprobs, again)[i]
            again = _rows(MIXED, vocab)
            own = _rows(MIXED, vocab)


def test_the_same_seed_reproduces_and_another_seed_differs() -> None:
    import mlx.core as mx

    vocab = 256
    params = SamplingParams(temperature=1.0, top_p=0.95)
    uniform = mx.full((1, vocab), -math.log(vocab))  # the same distribution at every position

    def answer(seed: int) -> list[int]:
        row = KeyedSampler(params, seed, vocab)
        return [_draw(uniform, [row])[0] for _ in range(24)]

    assert answer(7) == answer(7)
    assert answer(7) != answer(8)
    assert len(set(answer(7))) > 12  # positions are keyed apart: not the same token every time


# ----------------------------------------------------------------------------------------------- distribution
PROBS = [0.45, 0.25, 0.18, 0.12]  # no ties: top-k keeps tokens tied with the k-th
DRAWS = 4000  # fixed seeds 0..3999: deterministic, and a standard error of under 0.008 per frequency


def _expected(params: SamplingParams) -> list[float]:
    """The filtered, tempered distribution over PROBS, computed the textbook way."""
    order = sorted(range(len(PROBS)), key=lambda i: -PROBS[i])
    keep: set[int] = set()
    mass = 0.0
    for rank, i in enumerate(order):
        if params.top_p < 1.0 and mass >= params.top_p:
            break
        if params.top_k and rank >= params.top_k:
            break
        if PROBS[i] < params.min_p * max(PROBS):
            break
        keep.add(i)
        mass += PROBS[i]
    weights = [PROBS[i] ** (1.0 / params.temperature) if i in keep else 0.0 for i in range(len(PROBS))]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=2.0),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.3),
        SamplingParams(temperature=2.0, top_k=3, min_p=0.2),
    ],
    ids=["t1", "t2", "t0.5", "top_k2", "top_p0.6", "min_p0.3", "t2-k3-minp0.2"],
)
def test_draws_follow_the_filtered_tempered_distribution(params: SamplingParams) -> None:
    import mlx.core as mx

    logprobs = mx.broadcast_to(mx.log(mx.array(PROBS)), (DRAWS, len(PROBS)))
    rows: list[KeyedSampler | None] = [KeyedSampler(params, seed, len(PROBS)) for seed in range(DRAWS)]
    tokens = _draw(logprobs, rows)  # one vectorized call: 4000 rows, one key each
    counts = [tokens.count(i) / DRAWS for i in range(len(PROBS))]
    for seen, expected in zip(counts, _expected(params), strict=True):
        if expected == 0.0:
            assert seen == 0.0, (counts, params)
        else:
            assert abs(seen - expected) < 4 * math.sqrt(expected * (1 - expected) / DRAWS) + 1e-9, (
                counts,
                _expected(params),
            )


# ----------------------------------------------------------------------------------------------- the text batch
class CountingSampler(KeyedSampler):
    """A keyed sampler that counts the calls made to it directly (the batch reads it instead)."""

    def __init__(self, params: SamplingParams, seed: int, vocab_size: int, *, fail: bool = False) -> None:
        super().__init__(params, seed, vocab_size)
        self.calls = 0
        self.fail = fail

    def __call__(self, logprobs: Any) -> Any:
        self.calls += 1
        if self.fail:
            raise ValueError("this sampler always fails")
        return super().__call__(logprobs)

    @property
    def params(self) -> SamplingParams:
        if self.fail:
            raise ValueError("this sampler always fails")
        return self._params

    @params.setter
    def params(self, value: SamplingParams) -> None:
        self._params = value


@pytest.fixture(scope="module")
def tiny_text(text_qwen2_model: Path) -> Iterator[Any]:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(text_qwen2_model))[:2]
    yield model, tokenizer


def _batch_answers(
    tiny_text: Any,
    rows: list[tuple[int, SamplingParams | None, bool]],
    *,
    batch_sampling: bool = True,
    failures: list[str] | None = None,
) -> tuple[dict[int, list[int]], list[CountingSampler | None], Any]:
    """Rows (tag: its prompt and token limit, params, whether its sampler fails) decoded together on a
    TextBatcher: the answers by tag, the samplers, the batcher."""
    from backends.decoder import DecodeSpec
    from backends.prefix_cache import PrefixCache
    from backends.text_decoders import TextBatcher
    from runtime.controls import Guarded

    model, tokenizer = tiny_text
    batcher = TextBatcher(model, PrefixCache(entries=0, max_bytes=0), batch_sampling=batch_sampling)
    samplers: list[CountingSampler | None] = []
    for uid, (tag, params, fail) in enumerate(rows):
        sampler = None if params is None else CountingSampler(params, params.seed or 0, 1088, fail=fail)
        samplers.append(sampler)
        report = failures.append if failures is not None else None
        batcher.add(
            DecodeSpec(
                uid=uid,
                max_tokens=12 + tag,
                stop_ids=frozenset(),
                sampler=None if sampler is None else Guarded(sampler, report, sampler=True),
                prompt=list(tokenizer.encode(f"tell me about the sea number {tag} " * (1 + tag % 3))),
            )
        )
    answers: dict[int, list[int]] = {tag: [] for tag, _params, _fail in rows}
    while batcher.busy():
        for event in batcher.step():
            if event.token is not None:
                answers[rows[event.uid][0]].append(event.token)
    batcher.close()
    return answers, samplers, batcher


def test_the_text_batch_draws_every_row_in_one_call_with_the_tokens_of_one_call_per_row(
    tiny_text: Any,
) -> None:
    rows = [(tag, params, False) for tag, params in enumerate(MIXED)]
    rows.append((len(MIXED), SamplingParams(temperature=0.9, top_p=0.8, seed=9), False))
    vectorized, samplers, batcher = _batch_answers(tiny_text, rows)
    per_row, own_calls, _ = _batch_answers(tiny_text, rows, batch_sampling=False)
    assert vectorized == per_row
    assert all(len(vectorized[tag]) == 12 + tag for tag, _params, _fail in rows)
    assert all(sampler is None or sampler.calls == 0 for sampler in samplers)  # never called one by one
    assert batcher.sampler.calls > 0 and batcher.sampler.fallbacks == 0
    assert all(sampler is None or sampler.calls > 0 for sampler in own_calls)  # the per-row path calls each
    # Each keyed row drew one position per token (and the one the batch computes ahead of its last).
    for (tag, _params, _fail), sampler in zip(rows, samplers, strict=True):
        if sampler is not None:
            assert sampler.position == len(vectorized[tag]) + 1


def test_a_failing_sampler_in_the_batch_fails_only_its_own_request(tiny_text: Any) -> None:
    healthy = [(tag, params, False) for tag, params in enumerate(MIXED)]
    reference, _, _ = _batch_answers(tiny_text, healthy)
    failures: list[str] = []
    broken = [*healthy[:3], (99, SamplingParams(temperature=1.0, seed=42), True), *healthy[3:]]
    answers, _, batcher = _batch_answers(tiny_text, broken, failures=failures)
    assert failures and all("this sampler always fails" in failure for failure in failures)
    assert batcher.sampler.fallbacks > 0  # the batched draw failed; each row was drawn alone
    assert {tag: answers[tag] for tag in reference} == reference
