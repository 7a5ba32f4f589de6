"""Estimate the memory a model needs (weights plus KV cache) and whether it fits this machine.

Weights: the bytes of the weight files the MLX loaders read (`model*.safetensors`, else `*.safetensors`),
taken from the file list, so nothing is downloaded to know it. KV cache: per token and layer, keys and
values of `kv heads × head dim` in the activation dtype, counted the way mlx-lm allocates its caches:
full-attention layers grow with the context, sliding-window layers stop at their window, linear-attention
and SSM layers hold a fixed state whatever the length, layers that share another layer's KV hold nothing,
and MLA layers (DeepSeek-style) cache the compressed latent plus the rope key.

Not counted: activations and vision/audio encoders' working memory (small next to weights and KV at long
contexts), and MLX's buffer cache (freed memory it keeps for reuse).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from gallery.config import Decision, Evidence, MemoryEstimate, ModelConfig, RepoFile
from importers.metadata import RepoMetadata, optional_int

REFERENCE_CONTEXT = 8192
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_LANGUAGE_KEYS = ("text_config", "llm_config", "language_config", "thinker_config")
# Layer-type names (config `layer_types`) by how their cache grows.
_SLIDING = frozenset({"sliding_attention", "sliding", "local", "local_attention", "chunked_attention"})
_LINEAR = frozenset({"linear_attention", "mamba", "mamba2", "ssm", "conv", "recurrent", "gated_delta"})


# Values a config class supplies when config.json leaves them out (transformers' Gemma3TextConfig): the
# released gemma-3 configs declare only what differs from these.
_CLASS_DEFAULTS: dict[str, dict[str, int]] = {
    "gemma3_text": {
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
    },
}


def _language_config(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(where, dict) of the language model's own config: the root, or a nested text/llm config."""
    if any(k in config for k in ("num_hidden_layers", "n_layers", "num_layers")):
        return "config.json", config
    for key in _LANGUAGE_KEYS:
        node = config.get(key)
        if isinstance(node, dict):
            if key == "thinker_config" and isinstance(node.get("text_config"), dict):
                return f"config.json:{key}.text_config", node["text_config"]
            return f"config.json:{key}", node
    return "config.json", config


def _int(node: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = (
            optional_int(node.get(key), "config.json", key) if not isinstance(node.get(key), list) else None
        )
        if value is not None and value > 0:
            return value
    return None


def _dtype(config: dict[str, Any], text: dict[str, Any]) -> tuple[str, int, bool]:
    """(dtype name, bytes, declared?) of the activations, which is what the KV cache is stored in."""
    for node in (text, config):
        for key in ("torch_dtype", "dtype"):
            value = node.get(key)
            if isinstance(value, str) and value in _DTYPE_BYTES:
                return value, _DTYPE_BYTES[value], True
    return "float16", 2, False


def weight_files(files: Sequence[RepoFile]) -> list[RepoFile]:
    """The weight files mlx-lm / mlx-vlm load: `model*.safetensors` (so a Mistral repo's duplicate
    `consolidated.safetensors` is not counted twice), else every `*.safetensors`."""
    safetensors = [f for f in files if f.path.endswith(".safetensors") and "/" not in f.path]
    preferred = [f for f in safetensors if f.path.startswith("model")]
    return preferred or safetensors


@dataclasses.dataclass
class _Layers:
    full: int = 0
    sliding: int = 0
    linear: int = 0
    shared: int = 0


def _layer_kinds(text: dict[str, Any], layers: int) -> tuple[_Layers, int | None]:
    """How many layers of each cache kind, and the sliding window."""
    window = _int(text, "sliding_window", "attention_window_size", "attention_chunk_size")
    if text.get("use_sliding_window") is False:
        window = None
    counts = _Layers()
    types = text.get("layer_types")
    pattern = text.get("hybrid_override_pattern")
    # The last `num_kv_shared_layers` layers reuse earlier layers' KV (Gemma 3n / 4): no cache of their own.
    counts.shared = min(_int(text, "num_kv_shared_layers") or 0, layers)
    own = layers - counts.shared
    if isinstance(types, list) and len(types) == layers and all(isinstance(t, str) for t in types):
        for kind in types[:own]:
            if kind in _LINEAR:
                counts.linear += 1
            elif kind in _SLIDING and window:
                counts.sliding += 1
            else:
                counts.full += 1
    elif isinstance(pattern, str) and len(pattern) == layers:
        # Nemotron-H style: `*` attention, `M` mamba, `-` MLP only (no cache).
        counts.full = pattern.count("*")
        counts.linear = pattern.count("M")
    elif _int(text, "full_attention_interval"):
        interval = _int(text, "full_attention_interval") or 1
        counts.full = own // interval
        counts.linear = own - counts.full
    elif window and _int(text, "sliding_window_pattern"):
        # mlx-lm's gemma3_text: layer i is global when i % pattern == pattern - 1.
        pattern_n = _int(text, "sliding_window_pattern") or 1
        counts.full = sum(1 for i in range(own) if i % pattern_n == pattern_n - 1)
        counts.sliding = own - counts.full
    else:
        counts.full = own
    return counts, window


def _linear_state(text: dict[str, Any], dtype_bytes: int) -> int:
    """Bytes of one linear-attention / SSM layer's fixed state (recurrent state in float32, conv state in
    the activation dtype), from the Qwen3-Next or Mamba-2 config keys; 0 when the keys are absent."""
    v_heads = _int(text, "linear_num_value_heads")
    if v_heads:
        k_heads = _int(text, "linear_num_key_heads") or v_heads
        k_dim = _int(text, "linear_key_head_dim") or 128
        v_dim = _int(text, "linear_value_head_dim") or 128
        kernel = _int(text, "linear_conv_kernel_dim") or 4
        conv = (kernel - 1) * (2 * k_heads * k_dim + v_heads * v_dim) * dtype_bytes
        return v_heads * k_dim * v_dim * 4 + conv
    m_heads = _int(text, "mamba_num_heads")
    if m_heads:
        head_dim = _int(text, "mamba_head_dim") or 64
        state = _int(text, "ssm_state_size") or 128
        groups = _int(text, "n_groups") or 1
        kernel = _int(text, "conv_kernel") or 4
        conv = (kernel - 1) * (m_heads * head_dim + 2 * groups * state) * dtype_bytes
        return m_heads * head_dim * state * 4 + conv
    return 0


def decide_memory(
    meta: RepoMetadata, files: Sequence[RepoFile], context_size: int | None
) -> tuple[MemoryEstimate, Decision]:
    """The memory estimate of a checkpoint and the decision record behind it."""
    evidence: list[Evidence] = []
    weights = weight_files(files)
    sized = [f for f in weights if f.size is not None]
    weights_bytes = sum(f.size or 0 for f in sized) if sized else None
    if weights:
        evidence.append(
            Evidence(
                source="files",
                field=", ".join(f.path for f in weights[:3]) + (" …" if len(weights) > 3 else ""),
                detail=f"weights: {len(weights)} safetensors file(s), {_gib(weights_bytes)}"
                + ("" if len(sized) == len(weights) else f" ({len(weights) - len(sized)} without a size)"),
            )
        )
    else:
        evidence.append(
            Evidence(source="files", detail="no safetensors weights listed: weights size unknown")
        )

    where, text = _language_config(meta.config)
    defaults = _CLASS_DEFAULTS.get(str(text.get("model_type")), {})
    if defaults and not all(key in text for key in defaults):
        text = {**defaults, **text}
        evidence.append(
            Evidence(
                source="transformers",
                field=f"{text.get('model_type')} config class",
                detail="undeclared heads / head dim / window taken from the config class defaults",
            )
        )
    layers = _int(text, "num_hidden_layers", "n_layers", "num_layers")
    heads = _int(text, "num_attention_heads", "n_heads", "num_heads")
    hidden = _int(text, "hidden_size", "d_model", "n_embd")
    kv_heads = (
        _int(text, "num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num") or heads
    )
    head_dim = _int(text, "head_dim") or (hidden // heads if hidden and heads else None)
    dtype, dtype_bytes, declared = _dtype(meta.config, text)
    estimate = MemoryEstimate(weights_bytes=weights_bytes, kv_dtype=dtype, context_tokens=context_size)
    if not (layers and kv_heads and head_dim):
        evidence.append(
            Evidence(source=where, detail="layers, kv heads or head dim not declared: KV cache not estimated")
        )
    else:
        counts, window = _layer_kinds(text, layers)
        lora = _int(text, "kv_lora_rank")
        if lora:
            # MLA: mlx-lm caches the compressed latent and the rope key, one "head" per layer.
            per_layer = (lora + (_int(text, "qk_rope_head_dim") or 0)) * dtype_bytes
            shape = f"MLA latent {lora} + rope {_int(text, 'qk_rope_head_dim') or 0}"
        else:
            per_layer = 2 * kv_heads * head_dim * dtype_bytes
            shape = f"2 × {kv_heads} kv heads × {head_dim} head dim"
        full_per_layer = per_layer
        global_heads = _int(text, "num_global_key_value_heads")
        global_dim = _int(text, "global_head_dim")
        if global_heads or global_dim:
            # Gemma 4: full-attention layers have their own kv heads and head dim.
            full_per_layer = 2 * (global_heads or kv_heads) * (global_dim or head_dim) * dtype_bytes
            shape += f" (full-attention layers: {global_heads or kv_heads} × {global_dim or head_dim})"
        estimate.kv_bytes_per_token = counts.full * full_per_layer + counts.sliding * per_layer
        estimate.sliding_kv_bytes_per_token = counts.sliding * per_layer or None
        estimate.sliding_window = window if counts.sliding else None
        estimate.full_attention_layers = counts.full
        estimate.sliding_attention_layers = counts.sliding or None
        estimate.linear_attention_layers = counts.linear or None
        estimate.shared_kv_layers = counts.shared or None
        state = counts.linear * _linear_state(text, dtype_bytes)
        estimate.state_bytes = state or None
        parts = [f"{counts.full} full-attention"]
        if counts.sliding:
            parts.append(f"{counts.sliding} sliding-window ({window} tokens)")
        if counts.linear:
            parts.append(f"{counts.linear} linear-attention/SSM (fixed state {_gib(state)})")
        if counts.shared:
            parts.append(f"{counts.shared} sharing another layer's KV")
        evidence.append(
            Evidence(
                source=where,
                detail=f"{layers} layers: {', '.join(parts)}; per layer and token {shape} × {dtype_bytes} B",
            )
        )
        evidence.append(
            Evidence(
                source=where,
                field="torch_dtype" if declared else None,
                detail=f"KV cache dtype {dtype}" + ("" if declared else " (not declared: assumed)"),
            )
        )
    if context_size:
        estimate.at_context_bytes = total_bytes(estimate, context_size)
    estimate.at_8k_bytes = total_bytes(estimate, REFERENCE_CONTEXT)
    value = (
        f"weights {_gib(weights_bytes)}, KV {_kib(estimate.kv_bytes_per_token)}/token; "
        f"{_gib(estimate.at_8k_bytes)} at 8K"
        + (f", {_gib(estimate.at_context_bytes)} at {context_size}" if context_size else "")
    )
    return estimate, Decision(value=value, evidence=evidence)


def kv_bytes(estimate: MemoryEstimate, tokens: int) -> int | None:
    """KV-cache bytes after `tokens` tokens: full layers grow, sliding layers stop at their window."""
    if estimate.kv_bytes_per_token is None:
        return None
    sliding = estimate.sliding_kv_bytes_per_token or 0
    full = estimate.kv_bytes_per_token - sliding
    window = estimate.sliding_window or tokens
    return full * tokens + sliding * min(tokens, window) + (estimate.state_bytes or 0)


def total_bytes(estimate: MemoryEstimate, tokens: int) -> int | None:
    """Weights plus KV cache at `tokens` tokens; None when either is unknown."""
    kv = kv_bytes(estimate, tokens)
    if estimate.weights_bytes is None or kv is None:
        return None
    return estimate.weights_bytes + kv


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


@dataclasses.dataclass
class FitReport:
    """An estimate compared with a machine's memory. `fits` is None when either side is unknown."""

    estimate_8k: int | None
    estimate_context: int | None
    context_tokens: int | None
    machine_bytes: int | None
    fits: bool | None
    fits_context: bool | None
    warning: str | None

    def summary(self) -> str:
        """One line for explain / show / pull."""
        machine = (
            f"this machine has {_gib(self.machine_bytes)}" if self.machine_bytes else "machine memory unknown"
        )
        parts = [f"needs about {_gib(self.estimate_8k)} at 8K tokens"]
        if self.context_tokens and self.estimate_context is not None:
            parts.append(f"{_gib(self.estimate_context)} at the full context ({self.context_tokens} tokens)")
        verdict = {True: "fits", False: "does NOT fit", None: "fit unknown"}[self.fits]
        return f"{verdict}: {', '.join(parts)}; {machine}"


# Above this share of physical memory the OS, other programs and MLX's own buffers leave too little room.
TIGHT_SHARE = 0.75


def check_fit(config: ModelConfig, machine_bytes: int | None = None) -> FitReport:
    """Compare a config's memory estimate with a machine's memory (this machine's by default).

    For `gallery pull` (and anything else about to download): call it before downloading; when `fits` is
    False, print `warning` and stop unless the user passed --force. A config without `mlx.memory` (an
    older import) gets an estimate of its weights from the pinned file list.
    """
    machine = machine_memory() if machine_bytes is None else machine_bytes
    estimate = config.mlx.memory
    if estimate is None:
        sized = [f.size for f in weight_files(config.mlx.files) if f.size is not None]
        estimate = MemoryEstimate(weights_bytes=sum(sized) if sized else None)
    at_8k = (
        estimate.at_8k_bytes if estimate.at_8k_bytes is not None else total_bytes(estimate, REFERENCE_CONTEXT)
    )
    if at_8k is None:
        at_8k = estimate.weights_bytes  # KV unknown: the weights alone are a lower bound
    context = config.context_size
    at_context = total_bytes(estimate, context) if context else None
    fits = None if at_8k is None or not machine else at_8k <= machine
    fits_context = None if at_context is None or not machine else at_context <= machine
    warning = None
    if fits is False:
        warning = (
            f"{config.name} needs about {_gib(at_8k)} (weights {_gib(estimate.weights_bytes)} + KV cache at 8K "
            f"tokens) but this machine has {_gib(machine)} of memory: it cannot run here"
        )
    elif fits_context is False:
        warning = (
            f"{config.name} fits at 8K tokens ({_gib(at_8k)}) but not at its full context of {context} tokens "
            f"({_gib(at_context)} > {_gib(machine)}): set the load option max_kv_size or context_size"
        )
    elif fits and machine and at_8k is not None and at_8k > TIGHT_SHARE * machine:
        warning = (
            f"{config.name} needs about {_gib(at_8k)} of this machine's {_gib(machine)}: expect swapping "
            "if other programs are running"
        )
    return FitReport(
        estimate_8k=at_8k,
        estimate_context=at_context,
        context_tokens=context,
        machine_bytes=machine,
        fits=fits,
        fits_context=fits_context,
        warning=warning,
    )


def _gib(value: int | None) -> str:
    if value is None:
        return "unknown"
    if value >= 1024**3:
        return f"{value / 1024**3:.2f} GiB"
    if value >= 1024**2:
        return f"{value / 1024**2:.1f} MiB"
    return f"{value / 1024:.1f} KiB"


def _kib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 1024:.1f} KiB"
