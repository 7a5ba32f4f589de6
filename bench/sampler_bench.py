"""Sampling a text batch in one vectorized call against one sampler call per row, in one run.

Every request of a batch samples with values of its own (temperature, top-p, top-k, min-p, seed). Three modes:
- vectorized: the text batch draws all rows in one call per step (backends.sampling.BatchSampler);
- per_row: `batch_sampling=False` on the TextBatcher, mlx-lm's path for distinct samplers: each request's
  sampler (the same draw, on its one row) called on its own row, the rows concatenated — the same tokens
  as vectorized (checked here);
- before: per_row with the sampler this project used before (mlx-lm's apply_top_p / apply_min_p /
  apply_top_k and a keyed mx.random.categorical per row), for the change against what shipped.
Two measures, modes alternating to even out a shared machine:
- the batch: median wall time of a decode step of the real TextBatcher with N sampled requests (prompts
  processed first, so every timed step is a pure decode step), on the given model;
- the sampler alone: one draw over (N, vocab) log-probabilities, evaluated, for the model's vocabulary and
  for a large one (151,936, Qwen's), which isolates the sampling phase from the forward.

    python bench/sampler_bench.py [--model fixtures/.models/text-qwen2] [--rows 32] [--steps 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _params(rows: int) -> list[Any]:
    """Distinct sampling values per row, every filter represented."""
    from backends.sampling import SamplingParams

    out = []
    for i in range(rows):
        out.append(
            SamplingParams(
                temperature=0.5 + 0.05 * i,
                top_p=(0.8, 0.9, 0.95, 1.0)[i % 4],
                top_k=(0, 10, 40, 100)[(i // 4) % 4],
                min_p=(0.0, 0.02, 0.05)[i % 3],
                seed=1000 + i,
            )
        )
    return out


class BeforeSampler:
    """The per-request sampler as it was before the vectorized draw (kept here as the bench's reference)."""

    def __init__(self, params: Any, seed: int, vocab_size: int) -> None:
        self.params, self.seed, self.position, self.vocab_size = params, seed, 0, vocab_size

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        from backends.sampling import _position_seed

        params = self.params
        key = mx.random.key(_position_seed(self.seed, self.position))
        self.position += 1
        if 0.0 < params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if params.min_p > 0.0:
            logprobs = apply_min_p(logprobs, params.min_p)
        if 0 < params.top_k < min(self.vocab_size, logprobs.shape[-1]):
            logprobs = apply_top_k(logprobs, params.top_k)
        return mx.random.categorical(logprobs * (1.0 / params.temperature), key=key)


def batch_steps(
    model: Any, tokenizer: Any, rows: int, steps: int, *, mode: str
) -> tuple[list[float], list[list[int]]]:
    """Wall seconds of each decode step of a TextBatcher with `rows` sampled requests, and their tokens."""
    import mlx.core as mx

    from backends.decoder import DecodeSpec
    from backends.prefix_cache import PrefixCache
    from backends.sampling import make_sampler
    from backends.text_decoders import TextBatcher
    from runtime.controls import Guarded

    vocab = len(tokenizer.vocab) if hasattr(tokenizer, "vocab") else model.args.vocab_size
    batcher = TextBatcher(
        model,
        PrefixCache(entries=0, max_bytes=0),
        max_batch=rows,
        prefill_batch=rows,
        batch_sampling=mode == "vectorized",
    )
    for uid, params in enumerate(_params(rows)):
        sampler = (
            make_sampler(params, vocab) if mode != "before" else BeforeSampler(params, params.seed, vocab)
        )
        batcher.add(
            DecodeSpec(
                uid=uid,
                max_tokens=steps + 8,
                stop_ids=frozenset(),
                sampler=Guarded(sampler, sampler=True) if sampler is not None else None,
                prompt=list(tokenizer.encode(f"w{uid} tell me about the sea {uid}")),
            )
        )
    tokens: list[list[int]] = [[] for _ in range(rows)]
    times: list[float] = []
    while batcher.busy():
        t0 = time.perf_counter()
        events = batcher.step()
        mx.synchronize()
        wall = time.perf_counter() - t0
        if len(events) == rows:  # a pure decode step: every row produced a token
            times.append(wall)
        for event in events:
            if event.token is not None:
                tokens[event.uid].append(event.token)
    batcher.close()
    return times[1:-1], tokens  # the first and last steps also start or end rows


def sampler_alone(rows: int, vocab: int, reps: int, *, mode: str) -> float:
    """Median ms of one draw over (rows, vocab) log-probabilities (evaluated)."""
    import mlx.core as mx

    from backends.sampling import KeyedSampler, sample_rows

    logits = mx.random.normal((rows, vocab), key=mx.random.key(0))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(logprobs)
    kind = BeforeSampler if mode == "before" else KeyedSampler
    samplers: list[Any] = [kind(p, p.seed or 0, vocab) for p in _params(rows)]
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        if mode == "vectorized":
            out = sample_rows(logprobs, samplers)
        else:
            out = mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(samplers)])
        mx.eval(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000


MODES = ("vectorized", "per_row", "before")


def main() -> None:
    """Run every mode, alternating; print one JSON line and a table of times and ratios."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fixtures/.models/text-qwen2")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-vocab", type=int, default=151936)
    a = ap.parse_args()

    import mlx_lm

    model, tokenizer = mlx_lm.load(a.model)[:2]
    vocab = int(model.args.vocab_size)
    steps: dict[str, list[float]] = {mode: [] for mode in MODES}
    answers: dict[str, list[list[int]]] = {}
    batch_steps(model, tokenizer, a.rows, 8, mode="vectorized")  # warm-up
    for _ in range(a.rounds):
        for mode in MODES:
            times, answers[mode] = batch_steps(model, tokenizer, a.rows, a.steps, mode=mode)
            steps[mode].extend(times)
    alone: dict[str, float] = {}
    for size in (vocab, a.big_vocab):
        for mode in MODES:
            alone[f"{mode}_{size}"] = statistics.median(
                sampler_alone(a.rows, size, 5, mode=mode) for _ in range(a.rounds)
            )
    step_ms = {mode: statistics.median(steps[mode]) * 1000 for mode in MODES}
    results = {
        "rows": a.rows,
        "vocab": vocab,
        **{f"step_ms_{mode}": round(step_ms[mode], 2) for mode in MODES},
        "same_tokens": answers["vectorized"] == answers["per_row"],
        **{f"sampler_ms_{k}": round(v, 2) for k, v in alone.items()},
    }
    print(json.dumps(results))
    print(
        f"{'ms (median)':<36}{'vectorized':>12}{'per-row':>10}{'before':>10}{'per-row/vec':>13}{'before/vec':>12}"
    )
    table = [(f"decode step, {a.rows} sampled rows", [step_ms[mode] for mode in MODES])] + [
        (f"sampler alone, vocab {size}", [alone[f"{mode}_{size}"] for mode in MODES])
        for size in (vocab, a.big_vocab)
    ]
    for label, (vec, per, before) in table:
        print(f"{label:<36}{vec:>12.2f}{per:>10.2f}{before:>10.2f}{per / vec:>13.2f}{before / vec:>12.2f}")
    print(f"same tokens, vectorized and per-row: {results['same_tokens']}")


if __name__ == "__main__":
    main()
