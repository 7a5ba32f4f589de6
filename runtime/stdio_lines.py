"""The stdio protocol's framing: JSON-RPC lines read from stdin with a bound, replies written to stdout in order."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable
from typing import Any


class LineReader:
    """Read lines from a raw descriptor with os.read.

    Not sys.stdin: a daemon thread blocked inside a BufferedReader holds its lock, and the interpreter
    then aborts at exit ("could not acquire lock for <stdin> at interpreter shutdown"). A thread blocked
    in os.read holds no Python lock and may simply be abandoned when the process exits.
    """

    def __init__(self, fd: int, chunk: int = 1 << 16) -> None:
        self._fd = fd
        self._chunk = chunk
        self._buffer = bytearray()
        self._eof = False

    def readline(self, limit: int) -> bytes:
        """The next line (with its newline), at most limit bytes of it; b"" at end of input."""
        while True:
            end = self._buffer.find(b"\n", 0, limit)
            if end >= 0 or len(self._buffer) >= limit or self._eof:
                size = end + 1 if end >= 0 else min(limit, len(self._buffer))
                line = bytes(self._buffer[:size])
                del self._buffer[:size]
                return line
            data = os.read(self._fd, self._chunk)
            if not data:
                self._eof = True
            self._buffer += data


class LineWriter:
    """Serialize protocol lines onto a descriptor from one thread; report a broken pipe once."""

    def __init__(self, fd: int, on_broken: Callable[[], None]) -> None:
        self._fd = fd
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._on_broken = on_broken
        self.broken = False
        self._thread = threading.Thread(target=self._run, name="stdio-writer", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any]) -> None:
        """Queue one JSON object as one line."""
        if self.broken:
            return
        line = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"
        self._queue.put(line.encode("utf-8", "surrogatepass"))

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            if self.broken:
                continue
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError:  # the reader is gone (EPIPE): nothing more can be delivered
                self.broken = True
                self._on_broken()

    def close(self, timeout: float = 10.0) -> None:
        """Write out what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)
