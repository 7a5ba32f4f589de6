"""The caller's side of one request: its events, its cancel switch, its result.

The engine's worker is the only writer of a handle's events; callers read them (iterate, poll, or wait for
the result) on their own thread, and cancel by setting a flag the worker checks between steps.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator

from gallery.errors import RuntimeFailure
from runtime.errors import ClusterLost
from runtime.prepare import Prepared
from runtime.request import Answer, Completion, Event


class RequestHandle:
    """The caller's side of one request: iterate its events, or cancel it."""

    _ids = itertools.count(1)

    def __init__(self, prepared: Prepared) -> None:
        self.id = next(self._ids)
        self.prepared = prepared
        self._events: queue.Queue[Event] = queue.Queue()
        self._cancelled = threading.Event()
        self.finished = threading.Event()
        self._notify: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Stop this request; the worker drops it before its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was called."""
        return self._cancelled.is_set()

    def _put(self, event: Event) -> None:
        self._events.put(event)
        if event.done:
            self.finished.set()
        notify = self._notify
        if notify is not None:
            notify()

    def on_event(self, callback: Callable[[], None]) -> None:
        """Call `callback()` after each new event (from the producing thread; it must not block).

        Lets an event loop wait for events without a thread per request: the callback wakes the loop,
        which then drains them with poll(). Fires once at once if events are already waiting.
        """
        self._notify = callback
        if not self._events.empty():
            callback()

    def poll(self) -> Event | None:
        """The next event if one is ready, else None (never blocks)."""
        try:
            return self._events.get_nowait()
        except queue.Empty:
            return None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until (and including) the final one."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.done:
                return

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def result(self) -> Completion:
        """Wait for the whole answer. Raises RuntimeFailure when generation failed."""
        answer = Answer()
        for event in self.events():
            answer.add(event)
        completion = answer.completion()
        if completion.error:
            raise (
                ClusterLost(completion.error)
                if completion.fault == "cluster_lost"
                else RuntimeFailure(completion.error)
            )
        return completion
