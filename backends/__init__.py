"""Backends: the only code that imports mlx, mlx_lm or mlx_vlm — and only lazily, when it runs.

- mlx_lm_backend / mlx_vlm_backend: loading a model folder, tokenizing as each library does;
- text_route: the zero-copy mlx-lm text model of a VLM;
- decoding: the decoders the engine steps (batched text, per-request text and VLM streams, prefix caches);
- sampling / grammar: per-request samplers, logits processors, structured output;
- this module: the long-lived MLX thread, memory readings, and mlx-lm's tool-call parsers.
A text config never pays for (or depends on) mlx_vlm, and nothing imports MLX at module import time.
"""

from __future__ import annotations

import contextlib
import importlib
import platform
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

_IDLE_INBOXES: list[queue.Queue[tuple[Callable[[], None], threading.Event]]] = []
_IDLE_LOCK = threading.Lock()


def run_on_mlx_thread(fn: Callable[[], None], name: str = "mlx-worker") -> threading.Event:
    """Run fn on a long-lived MLX thread; returns an event set when fn has returned.

    MLX keeps per-thread state (the compile cache, thread-local streams) whose C++ destructors take the
    GIL when the thread exits; if that happens while the interpreter is finalizing, the process aborts
    ("terminate called without an active exception", exit 134 — seen with mlx 0.32.4 on Linux). So MLX
    threads never exit: when fn returns, the thread parks and is reused by the next engine.
    """
    with _IDLE_LOCK:
        inbox = _IDLE_INBOXES.pop() if _IDLE_INBOXES else None
    if inbox is None:
        inbox = queue.Queue()
        threading.Thread(target=_mlx_thread_loop, args=(inbox,), name=name, daemon=True).start()
    done = threading.Event()
    inbox.put((fn, done))
    return done


def _mlx_thread_loop(inbox: queue.Queue[tuple[Callable[[], None], threading.Event]]) -> None:
    while True:
        fn, done = inbox.get()
        try:
            fn()
        except BaseException:  # fn reports its own errors; the thread must survive to park
            pass
        finally:
            with _IDLE_LOCK:
                _IDLE_INBOXES.append(inbox)
            done.set()


def device_info() -> dict[str, str]:
    """The device MLX computes on: kind ("gpu" or "cpu"), backend ("cuda", "metal" or "cpu") and its name."""
    import mlx.core as mx

    device = mx.default_device()
    kind = "gpu" if device.type == mx.DeviceType.gpu else "cpu"
    backend = "cpu"
    name = platform.processor() or platform.machine()
    if kind == "gpu":
        cuda = getattr(mx, "cuda", None)
        backend = "cuda" if cuda is not None and cuda.is_available() else "metal"
        with contextlib.suppress(Exception):
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            name = str(info.get("device_name") or info.get("architecture") or name)
    return {"kind": kind, "backend": backend, "name": name}


def default_prefill_step() -> int:
    """Prompt tokens per prefill step for this device: 2048 on a GPU (what the peers use; a 2,000-token prompt
    is one step), 16 on a CPU. A CPU prefills at the same tokens/s in small steps, and each batch step runs one
    prefill chunk beside every decode, so small chunks keep a long prompt from holding up everyone else."""
    return 2048 if device_info()["kind"] == "gpu" else 16


def default_max_active() -> int:
    """Requests decoded at once for this device: 64 on a GPU, where a batched step of 64 rows costs little more
    than one of 32 once the weights are 16-bit (backends.dense), so 64 streams are not half queued; 32 on a CPU,
    where each row adds its full share of the step."""
    return 64 if device_info()["kind"] == "gpu" else 32


def memory_stats() -> dict[str, int]:
    """MLX's own memory counters (active, peak, cache), without importing MLX when nothing has loaded it."""
    if "mlx.core" not in sys.modules:
        return {}
    import mlx.core as mx

    stats = {}
    for key, getter in (
        ("mlx_active", "get_active_memory"),
        ("mlx_peak", "get_peak_memory"),
        ("mlx_cache", "get_cache_memory"),
    ):
        with contextlib.suppress(AttributeError, RuntimeError):
            stats[key] = int(getattr(mx, getter)())
    return stats


def drop_buffer_cache() -> None:
    """On the MLX thread, between requests: free the buffers MLX keeps for reuse after a request's arrays die.

    Without it an idle server keeps its largest prefill's working memory on top of the weights and the prefix
    cache, so resident memory is not bounded by what the cache options say.
    """
    if "mlx.core" in sys.modules:
        import mlx.core as mx

        mx.clear_cache()


def release_memory(timeout: float = 10.0) -> None:
    """Give freed model memory back to the system (MLX keeps freed buffers in its cache)."""
    if "mlx.core" not in sys.modules:
        return
    run_on_mlx_thread(drop_buffer_cache, name="mlx-free").wait(timeout)


def tool_parser(fmt: str) -> tuple[Callable[[str, Any], Any] | None, str | None, str | None]:
    """mlx-lm's parser for a tool-call format: (parse function, start marker, end marker); Nones if it has none."""
    try:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{fmt}")
    except ImportError:
        return None, None, None
    return (
        getattr(module, "parse_tool_call", None),
        getattr(module, "tool_call_start", None),
        getattr(module, "tool_call_end", None),
    )
