"""Process lifecycle shared by the gRPC server and the stdio loop: how and when the runtime stops.

- SIGTERM (or stdio `shutdown` / end of input) drains: refuse new work, let in-flight requests finish
  within a grace period, cancel what is left, exit 0. A second SIGTERM or a SIGINT during a drain cancels
  at once.
- SIGINT cancels every in-flight request at once and exits 130.
- When the parent process dies the runtime cancels everything and exits 0: nobody is left to answer.
  The parent is watched by polling getppid() (and, with --parent-pid, that pid), not with
  prctl(PR_SET_PDEATHSIG): the death signal fires when the *thread* that spawned the child exits, and
  orchestrators written in Go (LocalAI) spawn from OS threads that come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("runtime")

EXIT_OK = 0
EXIT_INTERRUPTED = 130


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"runtime: {record.levelname}: {message}"
        return f"runtime: {message}"


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr only (stdout belongs to the stdio protocol), one line per record."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger = logging.getLogger("runtime")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


class StopSignal:
    """The one decision of how to stop, taken by the first signal, input end or parent death."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.escalated = asyncio.Event()
        self.mode: str | None = None
        self.exit_code = EXIT_OK
        self.reason = ""

    def request(self, mode: str, reason: str, exit_code: int = EXIT_OK) -> None:
        """Ask to stop: mode "drain" (finish in-flight work) or "cancel" (stop it now)."""
        if self.mode is None:
            self.mode, self.reason, self.exit_code = mode, reason, exit_code
            log.info(
                "%s: %s",
                reason,
                "draining in-flight requests" if mode == "drain" else "cancelling in-flight requests",
            )
            self.requested.set()
            if mode == "cancel":
                self.escalated.set()
        elif not self.escalated.is_set():
            log.info("%s during drain: cancelling in-flight requests now", reason)
            if exit_code != EXIT_OK:
                self.exit_code = exit_code
            self.escalated.set()


def install_signal_handlers(stop: StopSignal) -> None:
    """SIGTERM drains, SIGINT cancels (handled on the running event loop)."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.request, "drain", "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, stop.request, "cancel", "SIGINT", EXIT_INTERRUPTED)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


async def watch_parent(
    on_death: Callable[[], None], *, parent_pid: int | None = None, interval: float = 0.5
) -> None:
    """Call on_death once the parent (or parent_pid) is gone. Returns immediately when orphaned at start."""
    original = os.getppid()
    if parent_pid is None and original == 1:
        return  # started by init or detached on purpose: there is no parent to outlive
    while True:
        await asyncio.sleep(interval)
        gone = os.getppid() != original
        if parent_pid is not None and not _alive(parent_pid):
            gone = True
        if gone:
            on_death()
            return


def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a helper task if it is still running."""
    if task is not None and not task.done():
        task.cancel()


async def settle(task: asyncio.Task[Any] | None) -> None:
    """Await a cancelled helper task, ignoring its cancellation."""
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
