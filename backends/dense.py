"""Serve a quantized text model on 16-bit weights where the quantized matmul is what limits batched decoding.

Measured on an H100 through MLX CUDA 0.32.4 (Qwen3-4B shape, 4-bit, `bench/op_profile.py`): the seven
quantized linears of one layer take 0.40 ms at 1 row and 3.30 ms at 64 rows, while the same products over the
weights dequantized to bf16 take 0.37 ms and 0.50 ms. Over 36 layers that is the whole of the batched step's
growth (a forward of 7 ms at 1 row, 109 ms at 64), the ceiling every BatchGenerator-based server shares. So on
CUDA, when the 16-bit weights fit, the model runs on them for every request (alone and batched alike, so a
request's answer never depends on the batch it lands in). mlx-lm's `dequantize_model` does the conversion.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

# The 16-bit weights may use at most this share of the GPU's memory (the rest: KV caches, prefix cache).
MAX_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class DenseReport:
    """What happened to the weights (Status: `weights`)."""

    applied: bool
    reason: str
    dense_bytes: int = 0  # the 16-bit weights' size

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data."""
        return dataclasses.asdict(self)


def _quantized_modules(model: Any) -> list[Any]:
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    return [m for _name, m in model.named_modules() if isinstance(m, kinds)]


def _dense_bytes(modules: list[Any]) -> int:
    total = 0
    for module in modules:
        rows, packed = module.weight.shape[-2], module.weight.shape[-1]
        columns = packed * 32 // module.bits
        total += rows * columns * module.scales.dtype.size * (module.weight.size // (rows * packed))
    return total


def _gpu_memory() -> int | None:
    import mlx.core as mx

    with contextlib.suppress(Exception):
        info = mx.device_info()
        for key in ("memory_size", "total_memory", "memory"):
            value = info.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def dequantize_for_batching(model: Any, setting: bool | None, backend: str) -> DenseReport:
    """Dequantize `model` in place when `setting` is True, or when it is None (auto) on CUDA and fits.

    `backend` is backends.device_info()["backend"]. A model with no quantized layers, or with layers in a
    mode other than affine (mxfp8/nvfp4 run on their own kernels), is left as it is.
    """
    modules = _quantized_modules(model)
    if setting is False:
        return DenseReport(False, "load option dequantize is off")
    if not modules:
        return DenseReport(False, "the weights are not quantized")
    if any(getattr(m, "mode", "affine") != "affine" for m in modules):
        return DenseReport(False, "the weights use a quantization mode other than affine")
    dense = _dense_bytes(modules)
    if setting is None:
        if backend != "cuda":
            return DenseReport(False, f"auto: only with MLX CUDA (this is {backend})", dense)
        memory = _gpu_memory()
        if memory is None:
            return DenseReport(False, "auto: the GPU's memory size is unknown", dense)
        if dense > memory * MAX_SHARE:
            return DenseReport(
                False,
                f"auto: the 16-bit weights ({dense / 2**30:.1f} GiB) exceed half the GPU's memory",
                dense,
            )
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    mx.eval(model.parameters())
    return DenseReport(
        True, "16-bit weights: the quantized matmul grows with the batch on this device", dense
    )
