"""The KV-cache quantization rules: which `kv_bits` / `kv_quant_scheme` pairs can work, and on which backend.

One check for the config schema (`mlx.kv_cache`) and the load options (`kv_bits`, `kv_quant_scheme`), so both
refuse the same combinations with the same words. Two schemes exist:
- `uniform`: MLX's own group-wise quantization (mlx-lm and mlx-vlm): whole bits 2, 3, 4, 5, 6 or 8;
- `turboquant`: mlx-vlm's TurboQuant KV cache: 1 to 8 bits in steps of 0.5 (3.5 = 3-bit keys, 4-bit values).
  mlx-lm has no TurboQuant cache, so a text (`mlx`) config cannot use it.
"""

from __future__ import annotations

import math

KV_SCHEMES = ("uniform", "turboquant")
UNIFORM_BITS = (2, 3, 4, 5, 6, 8)
TURBOQUANT_RANGE = (1.0, 8.0)


def kv_problem(bits: float | None, scheme: str | None, *, where: str = "") -> str | None:
    """Why this `kv_bits` / `kv_quant_scheme` pair cannot work (one line, naming the field), or None.

    `where` prefixes the field names (e.g. `mlx.kv_cache.` for the config); scheme None means uniform.
    """
    bits_field, scheme_field = f"{where}kv_bits", f"{where}kv_quant_scheme"
    if where:  # the config section spells them bits / scheme
        bits_field, scheme_field = f"{where}bits", f"{where}scheme"
    chosen = scheme or "uniform"
    if chosen not in KV_SCHEMES:
        return f"{scheme_field} {chosen!r} is not one of {', '.join(KV_SCHEMES)}"
    if bits is None:
        if chosen == "turboquant":
            return f"{scheme_field} turboquant needs {bits_field} (e.g. 3.5)"
        return None
    if not math.isfinite(bits):
        return f"{bits_field} must be a number of bits, got {bits}"
    if chosen == "uniform":
        if not float(bits).is_integer():
            return (
                f"{bits_field} {bits:g} is fractional: only {scheme_field} turboquant quantizes to fractional "
                f"bits (uniform takes {', '.join(map(str, UNIFORM_BITS))})"
            )
        if int(bits) not in UNIFORM_BITS:
            return f"{bits_field} {bits:g} is not supported by uniform quantization ({', '.join(map(str, UNIFORM_BITS))})"
        return None
    low, high = TURBOQUANT_RANGE
    if not low <= bits <= high or not float(bits * 2).is_integer():
        return (
            f"{bits_field} {bits:g} is not a TurboQuant width ({low:g} to {high:g} in steps of 0.5, e.g. 3.5)"
        )
    return None


def backend_kv_problem(backend: str, scheme: str | None, *, field: str = "kv_quant_scheme") -> str | None:
    """Why a backend cannot run this scheme (mlx-lm has no TurboQuant KV cache), or None."""
    if scheme == "turboquant" and backend == "mlx":
        return (
            f"{field} turboquant: the mlx backend (mlx-lm) has no TurboQuant KV cache; "
            "only mlx-vlm configs can use it (uniform kv_bits works here)"
        )
    return None
