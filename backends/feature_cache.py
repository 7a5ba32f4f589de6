"""The media feature cache: a model's tower outputs (vision, audio) kept by the media's content hash.

A chat about one image sends the same image on every turn; its tower output is the same every time. The cache
sits on the towers themselves (each tower instance gets a subclass whose call looks the output up first), so
every route that runs the towers — the mlx-vlm batch and the per-request streams, on every interface — shares
it. A decoder opens a `scope` with the request's media key (the sha256 of each input's bytes, in order) around
the code that may call a tower; a call outside a scope is never cached. The key is the media key, the tower,
the call's position within the scope and the shapes (and small integer values, such as Qwen's patch grids) of
its arguments, so a different image — of the same size or not — can never be served another's features.
Bounded by entries and bytes, least recently used first out.

Why not mlx-vlm's `VisionFeatureCache`: it caches only the vision path, keys by image path or PIL bytes
(not the content hash every route here already has), has no byte bound, and is wired into mlx-vlm's own
server rather than its generators; this one also covers the audio tower and bounds memory.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from backends.decoder import CacheInfo

TOWERS = ("vision_tower", "audio_tower")

_SMALL = 64  # integer arrays up to this many values (patch grids, lengths) are part of the key by value


class FeatureCache:
    """Tower outputs by (media key, tower, call, argument signature); LRU within entry and byte bounds."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[object, ...], tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._scope: tuple[str, ...] = ()
        self._calls = 0

    @property
    def enabled(self) -> bool:
        """Whether anything may be kept."""
        return self.max_entries > 0 and self.max_bytes > 0

    def attach(self, model: Any) -> None:
        """Route the model's towers through this cache (once per model; other attributes are untouched)."""
        for name in TOWERS:
            tower = getattr(model, name, None)
            if tower is None or getattr(type(tower), "_feature_cache_tower", None) is not None:
                continue
            tower.__class__ = _cached_class(type(tower), self, name)

    @contextlib.contextmanager
    def scope(self, media_key: tuple[str, ...]) -> Iterator[None]:
        """Tower calls inside are cached under this request's media key (none: not cached)."""
        saved = self._scope, self._calls
        self._scope, self._calls = tuple(media_key), 0
        try:
            yield
        finally:
            self._scope, self._calls = saved

    def call(
        self, name: str, run: Callable[..., Any], module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """One tower call: the cached output for the same media and arguments, else the tower's (kept)."""
        if not self._scope or not self.enabled:
            return run(module, *args, **kwargs)
        key = (name, self._scope, self._calls, _signature(args), _signature(tuple(sorted(kwargs.items()))))
        self._calls += 1
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return found[0]
        import mlx.core as mx
        from mlx.utils import tree_flatten

        output = run(module, *args, **kwargs)
        leaves: list[Any] = [item[1] for item in tree_flatten(output)]
        arrays = [leaf for leaf in leaves if isinstance(leaf, mx.array)]
        mx.eval(arrays)  # kept evaluated, so a hit never re-runs the tower's graph
        size = sum(int(a.nbytes) for a in arrays)
        self.misses += 1
        if size <= self.max_bytes:
            self.entries[key] = (output, size)
            self.bytes += size
            while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.bytes -= dropped
        return output

    def clear(self) -> None:
        """Drop every entry (counters stay)."""
        self.entries.clear()
        self.bytes = 0

    def describe(self) -> CacheInfo:
        """Entries, bytes, bounds and counters, for Status and metrics."""
        return {
            "enabled": self.enabled,
            "entries": len(self.entries),
            "bytes": self.bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }


def _cached_class(cls: type, cache: FeatureCache, name: str) -> type:
    """A subclass of a tower's class whose call goes through the cache (the weights tree is unchanged)."""

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        # The original class's call is looked up at call time, so a spy on it sees exactly the tower runs.
        return cache.call(name, lambda module, *a, **k: cls.__call__(module, *a, **k), self, args, kwargs)

    return type(
        cls.__name__,
        (cls,),
        {"__call__": __call__, "__module__": cls.__module__, "_feature_cache_tower": name},
    )


def _signature(values: tuple[Any, ...]) -> tuple[object, ...]:
    """What distinguishes two calls with the same media: shapes, dtypes, small integer arrays by value."""
    out: list[object] = []
    for value in values:
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            out.append((value[0], _signature((value[1],))))
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            shape = tuple(int(n) for n in value.shape)
            small = "int" in str(value.dtype) and int(getattr(value, "size", _SMALL + 1)) <= _SMALL
            out.append((shape, str(value.dtype), tuple(value.reshape(-1).tolist()) if small else None))
        elif isinstance(value, (list, tuple)):
            out.append(_signature(tuple(value)))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out.append(value)
        else:
            out.append(type(value).__name__)
    return tuple(out)
