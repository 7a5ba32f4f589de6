"""Backends: thin adapters over mlx-lm and mlx-vlm behind one small interface.

Nothing here imports mlx, mlx_lm or mlx_vlm at module import time: each adapter imports its own
library when it loads a model, so a text config never pays for (or depends on) mlx_vlm.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol


@dataclasses.dataclass
class SamplingParams:
    """Sampling settings for one request (None means the library default)."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None


@dataclasses.dataclass
class Step:
    """What one decoding step produced: new text, the token, and running usage and timings."""

    text: str
    token: int | None
    prompt_tokens: int
    completion_tokens: int
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str | None = None  # "stop" (a pinned stop id) | "length" | None


class Backend(Protocol):
    """The interface the runtime drives: load once, then tokenize and stream."""

    name: str

    def tokenize(self, text: str) -> list[int]:
        """Token ids for a rendered prompt (special tokens added the way the library adds them)."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text for token ids."""
        ...

    def generate(
        self, prompt: str, params: SamplingParams, stop_ids: Sequence[int], media: Any | None = None
    ) -> Iterator[Step]:
        """Stream the answer to a rendered prompt, stopping exactly on stop_ids."""
        ...


def make_sampler_and_processors(params: SamplingParams) -> tuple[Any, list[Any]]:
    """mlx-lm's sampler and logits processors for these params (used on every route, so routes agree)."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    sampler = make_sampler(
        temp=max(params.temperature, 0.0),
        top_p=params.top_p or 0.0,
        min_p=params.min_p or 0.0,
        top_k=params.top_k or 0,
    )
    processors = make_logits_processors(
        repetition_penalty=params.repeat_penalty if params.repeat_penalty not in (None, 1.0) else None
    )
    return sampler, processors


def seed_everything(seed: int | None) -> None:
    """Seed MLX's random generator when a request asks for reproducible sampling."""
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)



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
