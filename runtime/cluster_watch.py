"""Bounds on how long a rank waits for the others: MLX collectives have no timeout.

A rank that stops answering without dying (stopped, swapping, cut off by the network) leaves every other rank
blocked inside a collective, in C code no Python thread can interrupt. So every wait on the other ranks runs
inside `Watchdog.timed(what, bound)`, and a watchdog thread checks the open waits a few times a second. Past a
bound it calls the expiry handler once, from its own thread:

- rank 0 (`RankZeroWatch`): declares the cluster lost (so `/health` and Status report it and new requests are
  refused with `cluster_lost`), finishes every in-flight and queued request with that error (the worker
  thread that owns them is the one blocked), lets the interface answer for `LINGER_S`, then leaves its exit
  code for the launcher and exits with `os._exit` — the blocked thread can never be joined. The launcher
  (runtime.launch) then stops the ranks that are left;
- a follower: logs why and exits at once (mlx.launch then stops the others).

The bounds (`gallery serve --rank-timeout`, README "Several machines"): a batch step or a message, which carries
a forward pass, gets `rank_timeout`; rank 0's idle heartbeat, which moves 2 KiB and no model work, gets
`min(rank_timeout, IDLE_BOUND_S)`; the load handshake gets the load timeout, since the other ranks may read their
weights from slower disks.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("runtime")

DEFAULT_RANK_TIMEOUT_S = 300.0  # one step or message; README "Several machines" gives the measurements
IDLE_BOUND_S = 10.0  # rank 0's idle heartbeat: no model work, only a round trip
LINGER_S = 3.0  # rank 0 keeps answering (503 cluster_lost, /health 503) this long before it exits
LOST_EXIT = 17  # the exit code of a run whose cluster was lost (gallery.errors: runtime)
_TICK_S = 0.1


class Watchdog:
    """Times the waits on other ranks; calls `on_expired(what, bound)` once when one runs past its bound."""

    def __init__(self, on_expired: Callable[[str, float], None]) -> None:
        self._on_expired = on_expired
        self._open: dict[int, tuple[str, float, float]] = {}  # token -> (what, started, bound)
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.fired = threading.Event()
        self.longest: dict[str, float] = {}  # what -> the longest wait so far, in seconds (Status)

    @contextlib.contextmanager
    def timed(self, what: str, bound: float) -> Iterator[None]:
        """Run the body as one wait on the other ranks, bounded by `bound` seconds."""
        token = next(self._tokens)
        started = time.monotonic()
        with self._lock:
            self._open[token] = (what, started, bound)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="rank-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            took = time.monotonic() - started
            with self._lock:
                del self._open[token]
                self.longest[what] = max(self.longest.get(what, 0.0), round(took, 3))
            if took > bound / 2 and not self.fired.is_set():
                # Near the bound: an operator raising --rank-timeout before it trips wants to know.
                log.warning(
                    "a %s took %.1f s, over half of the %g s bound (--rank-timeout)", what, took, bound
                )

    def _watch(self) -> None:
        while not self.fired.is_set():
            time.sleep(_TICK_S)
            now = time.monotonic()
            with self._lock:
                late = [
                    (what, bound) for what, started, bound in self._open.values() if now - started > bound
                ]
            if late:
                self.fired.set()
                self._on_expired(*late[0])
                return


def exit_now(code: int) -> None:
    """End this process at once (a thread is blocked in a collective, so the interpreter cannot shut down)."""
    for handler in logging.getLogger("runtime").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(code)


class RankZeroWatch:
    """Rank 0's side: what to do when a wait on the other ranks runs past its bound."""

    def __init__(self, describe: Callable[[str], str]) -> None:
        self._describe = describe  # records the failure (Cluster.lost) and returns its one-line text
        self._abandon: list[Callable[[str], None]] = []
        self._closing = threading.Event()
        self._exiting = threading.Lock()
        self.watchdog = Watchdog(self._expired)

    def on_lost(self, abandon: Callable[[str], None]) -> None:
        """Register a callback that finishes every request it holds with the failure (an engine)."""
        self._abandon.append(abandon)

    def forget(self, abandon: Callable[[str], None]) -> None:
        """Unregister a callback (its engine has stopped)."""
        with contextlib.suppress(ValueError):
            self._abandon.remove(abandon)

    def _expired(self, what: str, bound: float) -> None:
        failure = self._describe(f"a {what} got no answer within {bound:g} s: a rank is hung or unreachable")
        for abandon in list(self._abandon):
            with contextlib.suppress(Exception):  # one engine's failure must not keep the others' requests
                abandon(failure)
        # Let the interface deliver those errors, and health checks read why, before the process goes.
        self._closing.wait(LINGER_S)
        self.exit(LOST_EXIT)

    def closing(self, code: int) -> None:
        """The interface has stopped: if a thread is blocked in a collective, exit now with `code`."""
        self._closing.set()
        if self.watchdog.fired.is_set():
            self.exit(code or LOST_EXIT)

    def exit(self, code: int) -> None:
        """Leave the exit code for the launcher, then end the process (once, whichever thread gets here)."""
        from runtime.launch import rank_finished

        with self._exiting:
            log.error("exiting with code %d: a rank stopped answering (the launcher stops the others)", code)
            rank_finished(code)
            exit_now(code)
