"""KV-cache memory at a long context: TurboQuant 3.5 bits (mlx-vlm) vs a 16-bit cache, same run.

Two measurements, both from the cache objects' own `nbytes` (the arrays they hold), plus MLX's peak memory:

1. cache objects filled directly, at the shape of a real model's attention layer (128-dim heads, 8 KV heads,
   float16 keys and values, as Qwen3 / Llama 3 8B-class models keep them), at 4096 and 8192 tokens: mlx-lm's
   KVCache (16-bit), MLX's uniform 4-bit QuantizedKVCache (for reference) and mlx-vlm's TurboQuantKVCache 3.5;
2. through the model: the tiny qwen2_vl fixture prefills a ~4k-token prompt with mlx-vlm's stream_generate
   and the options the runtime's mlx-vlm decoder passes (quantized_kv_start 0, the scheme); the caches it
   leaves in its PromptCacheState are measured. The fixture's heads are 16-dim and float32, so its ratio is
   also given against the same cache in 16 bits.

Goal (issue 24): TurboQuant 3.5 ≤ 0.35× the 16-bit cache.

    python bench/kv_bench.py [--tokens 4096 8192] [--skip-model]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ROOT / "fixtures" / ".models" / "vlm-qwen2vl"
KV_HEADS, HEAD_DIM, LAYERS = 8, 128, 4


def _nbytes(caches: list[Any]) -> int:
    return int(sum(cache.nbytes for cache in caches))


def _fill(make: Any, tokens: int, chunk: int = 512) -> tuple[int, int]:
    """(cache bytes, peak MLX bytes while filling) for LAYERS caches made by `make`, filled chunk by chunk."""
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    caches = [make() for _ in range(LAYERS)]
    key = mx.random.key(0)
    done = 0
    while done < tokens:
        step = min(chunk, tokens - done)
        key, k1, k2 = mx.random.split(key, 3)
        keys = mx.random.normal((1, KV_HEADS, step, HEAD_DIM), key=k1).astype(mx.float16)
        values = mx.random.normal((1, KV_HEADS, step, HEAD_DIM), key=k2).astype(mx.float16)
        for cache in caches:
            cache.update_and_fetch(keys, values)
        mx.eval([cache.state for cache in caches])
        done += step
    return _nbytes(caches), int(mx.get_peak_memory())


def objects(tokens: list[int]) -> list[dict[str, Any]]:
    """Part 1: the cache objects filled directly."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache
    from mlx_vlm.turboquant import TurboQuantKVCache

    kinds = {
        "16-bit (KVCache, float16)": KVCache,
        "uniform 4-bit (QuantizedKVCache)": lambda: QuantizedKVCache(group_size=64, bits=4),
        "turboquant 3.5 (TurboQuantKVCache)": lambda: TurboQuantKVCache(bits=3.5),
    }
    rows = []
    for count in tokens:
        base = None
        for name, make in kinds.items():
            size, peak = _fill(make, count)
            base = base or size
            rows.append({"tokens": count, "cache": name, "bytes": size, "ratio": size / base, "peak": peak})
    return rows


def through_model(tokens: int) -> list[dict[str, Any]]:
    """Part 2: the fixture VLM prefills a long prompt; the caches mlx-vlm keeps are measured."""
    import mlx.core as mx
    from mlx_vlm import load, stream_generate
    from mlx_vlm.generate.common import PromptCacheState

    model, processor = load(str(MODEL))
    words = "the sea and the river meet the mountain under a cold blue sky " * (tokens // 12 + 1)
    ids = processor.tokenizer.encode(words)[:tokens]
    prompt = processor.tokenizer.decode(ids)
    rows = []
    for name, options in (
        ("plain (the fixture's float32)", {}),
        ("turboquant 3.5", {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}),
    ):
        mx.clear_cache()
        mx.reset_peak_memory()
        state = PromptCacheState()
        for _ in stream_generate(
            model,
            processor,
            prompt,
            max_tokens=2,
            prefill_step_size=512,
            quantized_kv_start=0,
            prompt_cache_state=state,
            **options,
        ):
            pass
        caches = list(state.cache or [])
        held = int(caches[0].offset) if caches else 0
        rows.append(
            {
                "cache": name,
                "kinds": sorted({type(cache).__name__ for cache in caches}),
                "tokens": held,
                "bytes": _nbytes(caches),
                "peak": int(mx.get_peak_memory()),
            }
        )
    config = getattr(model.config, "text_config", None) or model.config
    heads = config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    # The same cache in 16 bits: keys + values, every layer, every token held.
    sixteen = 2 * 2 * rows[0]["tokens"] * config.num_hidden_layers * heads * dim
    for row in rows:
        row["ratio_vs_plain"] = row["bytes"] / rows[0]["bytes"]
        row["ratio_vs_16bit"] = row["bytes"] / sixteen
    return rows


def main() -> None:
    """Run both parts and print a table (and the JSON rows)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    from backends import device_info

    print(f"device: {device_info()}")
    print(f"\n1. cache objects, {LAYERS} layers × {KV_HEADS} KV heads × {HEAD_DIM} dims, float16 input")
    print(f"{'tokens':>7}  {'cache':<36}{'MiB':>9}{'× 16-bit':>10}{'peak MiB':>10}")
    rows = objects(args.tokens)
    for row in rows:
        print(
            f"{row['tokens']:>7}  {row['cache']:<36}{row['bytes'] / 2**20:>9.2f}{row['ratio']:>10.3f}"
            f"{row['peak'] / 2**20:>10.1f}"
        )
    result: dict[str, Any] = {"objects": rows}
    if not args.skip_model:
        tokens = max(args.tokens[0], 16)
        print(
            f"\n2. through mlx-vlm's stream_generate on {MODEL.name} (2 layers, 2 KV heads × 16 dims), {tokens} tokens"
        )
        print(f"{'cache':<32}{'tokens':>7}{'KiB':>10}{'× plain':>9}{'× 16-bit':>10}  kinds")
        model_rows = through_model(tokens)
        for row in model_rows:
            print(
                f"{row['cache']:<32}{row['tokens']:>7}{row['bytes'] / 1024:>10.1f}{row['ratio_vs_plain']:>9.3f}"
                f"{row['ratio_vs_16bit']:>10.3f}  {', '.join(row['kinds'])}"
            )
        result["model"] = model_rows
    print("\n" + json.dumps(result))


if __name__ == "__main__":
    main()
