"""Which operations of a decoder layer grow with the batch (run where the GPU is; ms per call, synchronized).

For each batch size B: every quantized linear of layer 0 at M=B rows (the model's own QuantizedLinear
modules), the same products over the weights dequantized to the activation dtype, attention over a KV cache
of `--context` tokens (mx.fast.scaled_dot_product_attention), RMSNorm and the output head; then the whole
layer 0 and the whole model forward over plain caches. Prints JSON lines, one per batch size.

    python bench/op_profile.py --model DIR [--sizes 1,8,32,64] [--context 400] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any


def ms_per_call(fn: Callable[[], Any], steps: int) -> float:
    """Mean ms per call of fn after one warm-up call; each call's result is evaluated (mx.eval blocks)."""
    import mlx.core as mx

    mx.eval(fn())
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        mx.eval(fn())
    mx.synchronize()
    return round((time.perf_counter() - t0) * 1000 / steps, 3)


def _linears(layer: Any) -> dict[str, Any]:
    attn, mlp = layer.self_attn, layer.mlp
    return {
        name: module
        for name, module in (
            ("q", attn.q_proj),
            ("k", attn.k_proj),
            ("v", attn.v_proj),
            ("o", attn.o_proj),
            ("gate", mlp.gate_proj),
            ("up", mlp.up_proj),
            ("down", mlp.down_proj),
        )
    }


def _profile_size(model: Any, dense: dict[str, Any], size: int, context: int, steps: int, dtype: Any) -> dict:
    """Every timing at one batch size."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    inner, args = model.model, model.args
    layer = inner.layers[0]
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    out: dict[str, Any] = {"rows": size}
    x = mx.random.normal((size, 1, args.hidden_size)).astype(dtype)
    for name, module in _linears(layer).items():
        source = mx.random.normal((size, 1, dense[name].shape[1])).astype(dtype)
        out[f"q4_{name}"] = ms_per_call(lambda m=module, s=source: m(s), steps)
        out[f"dense_{name}"] = ms_per_call(lambda w=dense[name], s=source: s @ w.T, steps)
    out["q4_linears_sum"] = round(sum(v for k, v in out.items() if k.startswith("q4_")), 3)
    out["dense_linears_sum"] = round(sum(v for k, v in out.items() if k.startswith("dense_")), 3)
    q = mx.random.normal((size, heads, 1, head_dim)).astype(dtype)
    k = mx.random.normal((size, kv_heads, context, head_dim)).astype(dtype)
    v = mx.random.normal((size, kv_heads, context, head_dim)).astype(dtype)
    out["sdpa"] = ms_per_call(
        lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5, mask=None), steps
    )
    out["rmsnorm"] = ms_per_call(lambda: layer.input_layernorm(x), steps)
    head = model.lm_head if hasattr(model, "lm_head") else inner.embed_tokens.as_linear
    out["head"] = ms_per_call(lambda: head(x), steps)
    cache = make_prompt_cache(model)
    model(mx.zeros((size, context), dtype=mx.int32) + 7, cache=cache)
    mx.eval([c.state for c in cache])
    token = mx.zeros((size, 1), dtype=mx.int32) + 9
    out["model_forward"] = ms_per_call(lambda: model(token, cache=cache), steps)
    out["layer0"] = ms_per_call(lambda: layer(x, mask=None, cache=cache[0]), steps)
    out["layers_x_layer0"] = round(out["layer0"] * len(inner.layers), 2)
    return out


def main() -> None:
    """Time each operation at each batch size."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm

    model = mlx_lm.load(a.model)[0]
    if not hasattr(model.model.layers[0].self_attn.q_proj, "scales"):
        nn.quantize(model, group_size=32, bits=4)  # an unquantized fixture: profile it as a 4-bit model
    inner = model.model
    layer = inner.layers[0]
    dtype = inner.embed_tokens.scales.dtype if hasattr(inner.embed_tokens, "scales") else mx.bfloat16
    dense = {}
    for name, module in _linears(layer).items():
        weight = mx.dequantize(
            module.weight, module.scales, module.biases, group_size=module.group_size, bits=module.bits
        ).astype(dtype)
        dense[name] = weight
    mx.eval(dense)
    print("device", mx.default_device(), "layers", len(inner.layers), flush=True)
    for size in [int(s) for s in a.sizes.split(",") if s]:
        print(json.dumps(_profile_size(model, dense, size, a.context, a.steps, dtype)), flush=True)
        mx.clear_cache()


if __name__ == "__main__":
    main()
