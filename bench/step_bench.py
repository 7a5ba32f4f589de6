"""Per-token work of the engine, in process: raw mlx-lm against the engine on the same model, in one run.

On a tiny model the forward pass costs almost nothing, so what separates the engine from raw mlx-lm is the
engine's own per-step work (scheduling, sampling, stop checks, detokenizing, delivery); on a GPU with a real
model it is the same work next to a short forward. Prints decode tok/s for one stream and aggregate tok/s at
each concurrency, with the ratio engine / raw.

    python bench/step_bench.py [--model fixtures/.models/text-qwen2] [--tokens 200] [--levels 8,32]
        [--options batching=false]

To see where the engine's worker spends a step, run it under py-spy (`py-spy record -o out.svg -- python ...`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _prompt(tokenizer: Any, i: int, words: int) -> list[int]:
    text = " ".join(f"w{(i * 7919 + j) % 997}" for j in range(words))
    return list(tokenizer.encode(text))


def raw_stream(model: Any, tokenizer: Any, tokens: int, words: int, reps: int) -> float:
    """Decode tok/s of mlx_lm.stream_generate, greedy, median of reps."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    rates = []
    for i in range(reps + 1):
        first = last = 0.0
        n = 0
        for r in mlx_lm.stream_generate(
            model, tokenizer, _prompt(tokenizer, i, words), max_tokens=tokens, sampler=make_sampler(temp=0.0)
        ):
            now = time.perf_counter()
            first = first or now
            last, n = now, r.generation_tokens
        if i:
            rates.append((n - 1) / (last - first))
    return statistics.median(rates)


def raw_batch(model: Any, tokenizer: Any, level: int, tokens: int, words: int) -> float:
    """Aggregate tok/s of mlx-lm's BatchGenerator with `level` rows (all in one batch)."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, completion_batch_size=max(32, level), prefill_step_size=2048)
    prompts = [_prompt(tokenizer, 1000 + i, words) for i in range(level)]
    t0 = time.perf_counter()
    gen.insert(prompts, [tokens] * level)
    count = 0
    while responses := gen.next_generated():
        count += len(responses)
    wall = time.perf_counter() - t0
    gen.close()
    return count / wall


def engine_run(
    engine: Any, tokenizer: Any, level: int, tokens: int, words: int
) -> tuple[float, float, float]:
    """(aggregate tok/s, median per-stream decode tok/s, TTFT p95 s) with `level` concurrent requests."""
    from runtime.request import GenerationRequest

    boxes: list[dict[str, float]] = [{} for _ in range(level)]

    def one(i: int) -> None:
        text = tokenizer.decode(_prompt(tokenizer, 2000 + i, words))
        first = last = 0.0
        n = 0
        request = GenerationRequest(prompt=text, max_tokens=tokens, temperature=0.0, ignore_eos=True)
        for event in engine.submit(request):
            now = time.perf_counter()
            first = first or now
            last = now
            if event.done and event.usage is not None:
                n = event.usage.completion_tokens
        boxes[i].update(first=first, last=last, n=n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(level)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(b["n"] for b in boxes)
    per = statistics.median((b["n"] - 1) / max(b["last"] - b["first"], 1e-9) for b in boxes)
    ttfts = sorted(b["first"] - t0 for b in boxes)
    return total / wall, per, ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]


def main() -> None:
    """Run the references and the engine; print one JSON line per measure and a ratio table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fixtures/.models/text-qwen2")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--levels", default="8,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--options", default="", help="engine load options, k=v,k=v")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",") if x]

    import mlx_lm

    from importers import import_model
    from runtime.engine import Engine
    from runtime.engine_setup import EngineSettings
    from runtime.load_options import parse_options

    model, tokenizer = mlx_lm.load(a.model)[:2]
    results: dict[str, Any] = {"single_raw": raw_stream(model, tokenizer, a.tokens, a.words, a.reps)}
    for level in levels:
        results[f"batch_raw_{level}"] = raw_batch(model, tokenizer, level, a.tokens, a.words)
    del model

    options = parse_options([kv.replace("=", ":", 1) for kv in a.options.split(",") if kv])
    config = import_model(a.model).config
    engine = Engine(config, settings=EngineSettings.from_options(options)).start()
    try:
        engine_run(engine, tokenizer, 1, 16, a.words)  # warm-up
        singles = [engine_run(engine, tokenizer, 1, a.tokens, a.words)[1] for _ in range(a.reps)]
        results["single_engine"] = statistics.median(singles)
        for level in levels:
            agg, _per, ttft = engine_run(engine, tokenizer, level, a.tokens, a.words)
            results[f"batch_engine_{level}"] = agg
            results[f"ttft_p95_engine_{level}"] = ttft
    finally:
        engine.shutdown()
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))
    print(f"{'measure':<24}{'raw tok/s':>12}{'engine tok/s':>14}{'ratio':>8}")
    rows = [("one stream, decode", "single")] + [
        (f"{lv} streams, aggregate", f"batch_{{}}_{lv}") for lv in levels
    ]
    for label, key in rows:
        raw = results[f"{key}_raw"] if key == "single" else results[key.format("raw")]
        eng = results[f"{key}_engine"] if key == "single" else results[key.format("engine")]
        print(f"{label:<24}{raw:>12.1f}{eng:>14.1f}{eng / raw:>8.2f}")


if __name__ == "__main__":
    main()
