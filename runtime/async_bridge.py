"""Bridge the engine's worker thread to an asyncio event loop, without a thread per request.

The worker wakes the loop (call_soon_threadsafe) after each event; the loop drains the handle with
poll(). Any number of concurrent streams then costs one loop thread, so Health and Status keep
answering however many generations are in flight. Submitting runs in a small executor, because
preparing a request (rendering the template, decoding images) is blocking work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from runtime.engine import RequestHandle
from runtime.request import Event

T = TypeVar("T")


async def handle_events(handle: RequestHandle) -> AsyncIterator[Event]:
    """The handle's events as they come, up to and including the final one."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(wake.set)

    handle.on_event(notify)
    while True:
        wake.clear()
        pending: list[Event] = []
        while (event := handle.poll()) is not None:
            pending.append(event)
            if event.done:
                break
        for event in coalesce(pending):
            yield event
            if event.done:
                return
        await wake.wait()


def _plain_kind(event: Event) -> str | None:
    """'content' or 'reasoning' for an event that only carries that text (and its logprobs); None otherwise."""
    if event.done or event.error or event.tool_calls or bool(event.content) == bool(event.reasoning):
        return None
    return "content" if event.content else "reasoning"


def coalesce(events: list[Event]) -> list[Event]:
    """Merge runs of text pieces that were waiting together into one piece each, keeping their order.

    A consumer that falls behind the worker (a slow client, a busy loop) then sends one message for what
    piled up instead of one per token, so the interface's cost per token shrinks exactly when it matters.
    Pieces with tool calls, the final event and mixed pieces are never merged.
    """
    merged: list[Event] = []
    for event in events:
        kind = _plain_kind(event)
        if merged and kind is not None and _plain_kind(merged[-1]) == kind:
            last = merged[-1]
            merged[-1] = dataclasses.replace(
                last,
                content=last.content + event.content,
                reasoning=last.reasoning + event.reasoning,
                logprobs=[*last.logprobs, *event.logprobs],
            )
        else:
            merged.append(event)
    return merged


async def run_blocking(executor: concurrent.futures.Executor, fn: Callable[..., T], *args: Any) -> T:
    """Run fn in the executor; if the awaiting task is cancelled meanwhile, cancel a handle fn returns.

    Without that, a client that disconnects while its request is being prepared would leave an
    orphaned generation running to max_tokens.
    """
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def orphan(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None and isinstance(done.result(), RequestHandle):
                done.result().cancel()

        future.add_done_callback(orphan)
        raise
