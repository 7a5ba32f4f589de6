"""Where a batched decode step's time goes, by phase, at several batch sizes (run it where the GPU is).

For each batch size B it builds B sequences in mlx-lm's BatchGenerator, then times, with evaluation barriers
(`mx.synchronize`) around each phase, what one `GenerationBatch` step does: the model forward over the batch
cache (BatchKVCache: per-row offsets, left-padding masks), the log-softmax and greedy sampling, the split of
the log-probabilities into rows, and the whole pipelined `next()` as BatchGenerator runs it. For comparison it
times the same forward over plain per-layer KVCaches holding the same B rows (no padding, no mask arrays),
and the forward of one sequence alone. Prints one JSON line per batch size and a table in ms.

    python bench/step_profile.py --model DIR [--sizes 1,8,32,64] [--prompt 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from op_profile import ms_per_call


def profile(model: Any, size: int, prompt_len: int, steps: int) -> dict[str, float]:
    """Phase times (ms) of one batched decode step with `size` rows."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache

    vocab = model.args.vocab_size if hasattr(model, "args") else 32000
    prompts = [[(7 * r + 3 * i) % (vocab - 10) + 5 for i in range(prompt_len + r % 5)] for r in range(size)]
    gen = BatchGenerator(
        model, completion_batch_size=max(size, 32), prefill_batch_size=size, prefill_step_size=2048
    )
    gen.insert(prompts, [10_000] * size)
    while len(gen._generation_batch) < size:  # mlx-lm's own batch, on purpose
        gen.next()
    batch = gen._generation_batch
    for _ in range(3):
        gen.next()
    out: dict[str, float] = {"rows": size}

    # The whole step as BatchGenerator runs it (pipelined: the host work overlaps the next forward).
    t0 = time.perf_counter()
    for _ in range(steps):
        gen.next()
    mx.synchronize()
    out["next_ms"] = (time.perf_counter() - t0) * 1000 / steps

    tokens = mx.zeros((size,), dtype=mx.int32) + 11
    cache = batch.prompt_cache

    def forward_batch() -> Any:
        return model(tokens[:, None], cache=cache)[:, -1, :]

    out["forward_batchcache_ms"] = ms_per_call(forward_batch, steps)
    logits = forward_batch()
    mx.eval(logits)

    def sample() -> Any:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.argmax(logprobs, axis=-1), logprobs

    out["sample_ms"] = ms_per_call(sample, steps)

    def split_rows() -> Any:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return list(logprobs)

    out["sample_and_split_ms"] = ms_per_call(split_rows, steps)
    gen.close()

    # The same rows in plain caches: one prompt length, no padding, no mask arrays.
    plain = make_prompt_cache(model)
    same = mx.array([p[:prompt_len] for p in prompts])
    model(same, cache=plain)
    mx.eval([c.state for c in plain])

    def forward_plain() -> Any:
        return model(tokens[:, None], cache=plain)[:, -1, :]

    out["forward_plaincache_ms"] = ms_per_call(forward_plain, steps)
    plain.clear()
    mx.clear_cache()
    return out


def main() -> None:
    """Profile each batch size; print JSON lines and a table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", default="1,8,32,64")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    import mlx.core as mx
    import mlx_lm

    model = mlx_lm.load(a.model)[0]
    print("device", mx.default_device(), flush=True)
    rows = []
    for size in [int(s) for s in a.sizes.split(",") if s]:
        result = profile(model, size, a.prompt, a.steps)
        print(json.dumps({k: round(v, 2) for k, v in result.items()}), flush=True)
        rows.append(result)
    keys = ["next_ms", "forward_batchcache_ms", "forward_plaincache_ms", "sample_ms", "sample_and_split_ms"]
    print(f"{'rows':>5}" + "".join(f"{k:>24}" for k in keys))
    for r in rows:
        print(f"{int(r['rows']):>5}" + "".join(f"{r[k]:>24.2f}" for k in keys))


if __name__ == "__main__":
    main()
