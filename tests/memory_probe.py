"""Measure what a model folder really occupies in MLX memory: run as `python -m tests.memory_probe FOLDER KIND N`.

Prints one JSON line: the MLX active-memory growth from loading the model (weights), and the bytes of the
KV cache after a forward pass over N prompt tokens (the cache arrays' own size, sliced to what they hold,
so mlx-lm's 256-token allocation steps do not count). A separate process per model keeps other tests'
arrays out of the measurement.
"""

from __future__ import annotations

import gc
import json
import sys


def measure(folder: str, kind: str, tokens: int) -> dict[str, int]:
    """Weights bytes (active memory after load minus before) and KV bytes after `tokens` tokens."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    gc.collect()
    before = mx.get_active_memory()
    if kind == "vlm":
        from mlx_vlm import load as load_vlm

        model, _ = load_vlm(folder)
        language = model.language_model
    else:
        from mlx_lm import load

        model, _ = load(folder)
        language = model
    mx.eval(model.parameters())
    gc.collect()
    weights = mx.get_active_memory() - before
    parameters = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    cache = make_prompt_cache(language)
    prompt = mx.arange(1, tokens + 1)[None] % 200 + 10
    language(prompt, cache=cache)
    kv = 0
    for entry in cache:
        arrays = [a for a in entry.state if isinstance(a, mx.array)]
        mx.eval(arrays)
        kv += sum(a.nbytes for a in arrays)
    return {"weights_active": weights, "parameters": parameters, "kv": kv, "tokens": tokens}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
