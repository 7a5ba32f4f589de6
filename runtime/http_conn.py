"""Connection limits for the HTTP server: a header timeout and a cap on open connections.

uvicorn closes a keep-alive connection after its idle timeout, but a connection that never completes a request
(a client that connects and says nothing, or sends its headers a byte at a time) is held forever: thousands of
them lock everyone else out. uvicorn has no option for either, so its h11 protocol is extended here: a
connection must finish its request headers within `header_timeout` seconds of opening (or of its last
response), and past `max_connections` the oldest idle connection is closed to make room (the new one, if none
is idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 512


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-header deadline and a connection cap (set by `protocol_class`)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._opened = 0.0

    @property
    def idle(self) -> bool:
        """No request is being read or answered on this connection."""
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Starlette writes a response's head and body separately; with Nagle on, the body waits for the
            # client's delayed ACK (~40 ms per keep-alive request).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._opened = self.loop.time()
        self._arm()
        if len(self.connections) > self.max_connections:
            self._shed()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._deadline_passed)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _deadline_passed(self) -> None:
        self._header_deadline = None
        if self.idle and not self.transport.is_closing():
            self.transport.close()

    def _shed(self) -> None:
        """Over the cap: close the oldest idle connection (this one, if every other is busy)."""
        idle = [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol) and c is not self and c.idle and not c.transport.is_closing()
        ]
        victim = min(idle, key=lambda c: c._opened) if idle else self
        victim.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if not self.idle:
            self._disarm()  # the request's headers are in: the deadline is met

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on a kept-alive connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_class(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A protocol class for uvicorn.Config(http=…) with these limits."""
    return type(
        "LimitedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": max(header_timeout, 0.1), "max_connections": max(max_connections, 1)},
    )
