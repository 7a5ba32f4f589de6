"""The prefix cache of the text routes: mlx-lm's LRUPromptCache with a switch, counters and the exact-hit rule.

A request starts from the longest cached prefix of its token ids; finished (and cancelled) requests are
stored back. Also: whether a quantized KV cache can work for a model (checked at load).
"""

from __future__ import annotations

from typing import Any

from backends.decoder import CacheInfo, CacheStats


def _cache_length(cache: list[Any]) -> int | None:
    """Tokens held by a prompt cache (None when the cache kind does not say)."""
    offset = getattr(cache[0], "offset", None) if cache else None
    return int(offset) if isinstance(offset, int) else None


def check_kv_quantization(model: Any, bits: int | None, group_size: int) -> str | None:
    """Why a quantized KV cache cannot work for this model (MLX quantizes each head's vectors in groups), or None."""
    if bits is None:
        return None
    if bits not in (2, 3, 4, 5, 6, 8):
        return f"kv_bits {bits} is not supported (2, 3, 4, 5, 6 or 8)"
    if group_size not in (32, 64, 128):
        return f"kv_group_size {group_size} is not supported (32, 64 or 128)"
    args = getattr(model, "args", None) or getattr(getattr(model, "language_model", model), "args", None)
    if args is None:
        return None
    head_dim = getattr(args, "head_dim", None)
    if not head_dim and getattr(args, "hidden_size", None) and getattr(args, "num_attention_heads", None):
        head_dim = args.hidden_size // args.num_attention_heads
    if head_dim and head_dim % group_size:
        return f"kv_group_size {group_size} does not divide this model's head size {head_dim}"
    return None


def check_turboquant(model: Any) -> str | None:
    """Why mlx-vlm's TurboQuant KV cache cannot serve this model, or None.

    Layers that reuse an earlier layer's keys and values (Gemma 4's `num_kv_shared_layers`) receive TurboQuant's
    packed state without the cache object that reads it, and mlx-vlm 0.7 fails in attention on the first token.
    """
    language = getattr(model, "language_model", model)
    config = getattr(language, "config", None) or getattr(getattr(model, "config", None), "text_config", None)
    shared = getattr(config, "num_kv_shared_layers", 0) or 0
    if isinstance(shared, int) and shared > 0:
        kind = getattr(getattr(model, "config", None), "model_type", None) or "this model"
        return (
            f"kv_quant_scheme turboquant cannot serve {kind}: its {shared} KV-sharing layers "
            "(num_kv_shared_layers) get TurboQuant's packed keys without the cache that reads them in mlx-vlm"
        )
    return None


class PrefixCache:
    """mlx-lm's LRUPromptCache, with a switch, counters, and the exact-hit rule the batch generator needs."""

    def __init__(self, *, entries: int, max_bytes: int, deferred_eviction: bool = False) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self.enabled = entries > 0 and max_bytes > 0
        self.max_bytes = max(max_bytes, 1)
        # Deferred (distributed): ranks hold different parts of each cache, so their byte counts differ and
        # evicting by bytes on every rank would make their caches (and then their batches) diverge. Instead
        # only rank 0 measures bytes, between steps, and every rank evicts the same number of LRU entries.
        self.deferred = deferred_eviction
        self.lru = LRUPromptCache(
            max_size=max(entries, 1), max_bytes=(1 << 62) if deferred_eviction else self.max_bytes
        )
        self.stats = CacheStats()

    def evict_over_budget(self) -> int:
        """Deferred mode, rank 0: drop least-recently-used entries until under the byte budget; how many it dropped."""
        dropped = 0
        while len(self.lru) and self.lru.nbytes > self.max_bytes:
            self.lru.trim_to(n_sequences=len(self.lru) - 1)
            dropped += 1
        return dropped

    def evict(self, count: int) -> None:
        """Deferred mode, other ranks: drop the `count` least-recently-used entries, as rank 0 did."""
        for _ in range(count):
            if not len(self.lru):
                return
            self.lru.trim_to(n_sequences=len(self.lru) - 1)

    def fetch(self, key: Any, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A copy of the nearest cached prefix of `tokens` and how many tokens it covers (never all of them)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if not self.enabled:
            return None, 0
        self.stats.lookups += 1
        cache, rest = self.lru.fetch_nearest_cache(key, tokens)
        if cache is None:
            return None, 0
        covered = len(tokens) - len(rest)
        if covered >= len(tokens):
            # At least one token must still run through the model to give the first logits.
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, covered - len(tokens) + 1)
            covered = len(tokens) - 1
        if covered <= 0:
            return None, 0
        self.stats.hits += 1
        self.stats.reused_tokens += covered
        return cache, covered

    def store(self, key: Any, tokens: list[int], cache: list[Any], kind: str = "assistant") -> None:
        """Keep a prompt cache for the tokens it holds (a no-op when the cache is off or they disagree)."""
        if not self.enabled or not tokens:
            return
        length = _cache_length(cache)
        if length is not None and length != len(tokens):
            return  # never store a cache under tokens it does not hold
        self.lru.insert_cache(key, list(tokens), cache, cache_type=kind)
        self.stats.stored += 1

    def describe(self) -> CacheInfo:
        """Entries, bytes and counters."""
        return {
            "enabled": self.enabled,
            "entries": len(self.lru),
            "bytes": int(self.lru.nbytes),
            **vars(self.stats),
        }
