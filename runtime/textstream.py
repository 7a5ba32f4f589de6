"""The streaming text pipeline between a backend's decoded text and a client.

Three stages, each holding back just enough text that no fragment of a marker ever leaks:
1. StopStringMatcher: stop strings (the config's stopwords plus the request's), matched on the
   streamed text. Text that could be the start of a stop string is held back until it is either
   completed (generation stops there; nothing of the stop string is sent) or ruled out.
2. ReasoningSplitter: splits reasoning (between the config's markers) from content. With thinking
   off, a reasoning block the model opens anyway is dropped, markers and all.
3. ToolCallExtractor: when the request offered tools, text between the tool-call markers becomes
   structured calls (parsed by the model library's parser for the format where it has one).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any


def _held_suffix(buffer: str, markers: Sequence[str]) -> int:
    """Length of the longest buffer suffix that is a proper prefix of some marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(buffer)), longest, -1):
            if buffer.endswith(marker[:size]):
                longest = size
                break
    return longest


class StopStringMatcher:
    """Cut the stream at the first stop string, never sending any part of it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._buffer = ""
        self.stopped = False
        self.matched: str | None = None

    def _scan(self, final: bool) -> str:
        buffer = self._buffer
        hits = [(buffer.find(s), s) for s in self.stops]
        complete = min(((pos, s) for pos, s in hits if pos >= 0), default=None)
        # A longer stop string may have started earlier and still complete: wait for it (unless the stream ended).
        pending = None if final else len(buffer) - _held_suffix(buffer, self.stops)
        if pending == len(buffer):
            pending = None
        if complete is not None and (pending is None or complete[0] <= pending):
            self.stopped, self.matched = True, complete[1]
            self._buffer = ""
            return buffer[: complete[0]]
        if final:
            self._buffer = ""
            return buffer
        safe = min(pending if pending is not None else len(buffer), complete[0] if complete else len(buffer))
        self._buffer = buffer[safe:]
        return buffer[:safe]

    def feed(self, text: str) -> str:
        """Add streamed text; return what can be sent now. After a match, `stopped` is True."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self._buffer += text
        return self._scan(final=False)

    def flush(self) -> str:
        """The end of generation: held-back text is resolved (a match, or plain text after all)."""
        if self.stopped or not self._buffer:
            return ""
        return self._scan(final=True)


@dataclasses.dataclass
class Piece:
    """A piece of output: content or reasoning text."""

    kind: str  # "content" | "reasoning"
    text: str


class ReasoningSplitter:
    """Split reasoning from content by the config's markers; drop reasoning when thinking is off."""

    def __init__(
        self, start: str | None, end: str | None, *, thinking: bool, starts_inside: bool = False
    ) -> None:
        self.start, self.end = start, end
        self.thinking = thinking
        self.inside = bool(starts_inside and start and end)
        self._buffer = ""
        self._strip_next_content = False
        self._strip_next_reasoning = self.inside
        self.dropped_reasoning = False

    def _emit(self, kind: str, text: str, out: list[Piece]) -> None:
        if kind == "content" and self._strip_next_content:
            text = text.lstrip()
            if text:
                self._strip_next_content = False
        if kind == "reasoning" and self._strip_next_reasoning:
            text = text.lstrip()
            if text:
                self._strip_next_reasoning = False
        if not text:
            return
        if kind == "reasoning" and not self.thinking:
            self.dropped_reasoning = True
            return
        if out and out[-1].kind == kind:
            out[-1].text += text
        else:
            out.append(Piece(kind, text))

    def feed(self, text: str) -> list[Piece]:
        """Add streamed text; return the pieces that can be sent now."""
        if not self.start or not self.end:
            return [Piece("content", text)] if text else []
        self._buffer += text
        out: list[Piece] = []
        while self._buffer:
            marker = self.end if self.inside else self.start
            pos = self._buffer.find(marker)
            if pos >= 0:
                self._emit("reasoning" if self.inside else "content", self._buffer[:pos], out)
                self._buffer = self._buffer[pos + len(marker) :]
                self.inside = not self.inside
                if self.inside:
                    self._strip_next_reasoning = True
                else:
                    self._strip_next_content = True
                continue
            keep = _held_suffix(self._buffer, [marker])
            ready = self._buffer[: len(self._buffer) - keep]
            self._emit("reasoning" if self.inside else "content", ready, out)
            self._buffer = self._buffer[len(ready) :]
            break
        return out

    def flush(self) -> list[Piece]:
        """End of generation: release held-back text."""
        out: list[Piece] = []
        if self._buffer:
            self._emit("reasoning" if self.inside else "content", self._buffer, out)
            self._buffer = ""
        return out


@dataclasses.dataclass
class ToolCall:
    """A structured tool call (OpenAI shape: arguments as a JSON string)."""

    id: str
    name: str
    arguments: str
    index: int = 0


def _parse_json_calls(text: str, _: Any = None) -> Any:
    """Fallback parser: one JSON object or a list of them ({name, arguments|parameters})."""
    text = text.strip()
    if text.startswith("<|python_tag|>"):
        text = text[len("<|python_tag|>") :]
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    while pos < len(text):
        while pos < len(text) and text[pos] in " \n\t;,":
            pos += 1
        if pos >= len(text):
            break
        value, pos = decoder.raw_decode(text, pos)
        calls.extend(value if isinstance(value, list) else [value])
    return calls


class ToolCallExtractor:
    """Turn tool-call syntax in the content stream into structured calls."""

    def __init__(
        self,
        fmt: str | None,
        start: str | None,
        end: str | None,
        tools: Any = None,
        *,
        library: tuple[Callable[[str, Any], Any] | None, str | None, str | None] = (None, None, None),
        max_calls: int | None = None,
    ) -> None:
        """`library` is the model library's parser for `fmt` and its markers (backends.tool_parser);
        `max_calls`: the answer ends once this many calls are complete (parallel_tool_calls false)."""
        self.tools = tools
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self.failed: list[str] = []
        parser, lib_start, lib_end = library if fmt else (None, None, None)
        self.parse = parser or _parse_json_calls
        self.start = start or lib_start
        self.end = end if end is not None else lib_end
        self.active = fmt is not None
        self._buffer = ""
        self._in_call = False
        self._whole_output = self.active and (not self.start or fmt in ("mistral", "llama3_json", "harmony"))

    @property
    def complete(self) -> bool:
        """The answer has made all the calls it may: generation should end here."""
        return self.max_calls is not None and len(self.calls) >= self.max_calls

    def _finish_call(self, body: str) -> None:
        try:
            parsed = self.parse(body, self.tools)
        except Exception:  # a malformed call is shown as text, never silently dropped
            self.failed.append(body)
            return
        for item in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                self.failed.append(body)
                continue
            arguments = item.get("arguments", item.get("parameters", {}))
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            self.calls.append(
                ToolCall(
                    id=f"call_{uuid.uuid4().hex[:24]}",
                    name=item["name"],
                    arguments=arguments,
                    index=len(self.calls),
                )
            )

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Add content text; return (content to send, calls completed now)."""
        if not self.active:
            return text, []
        before = len(self.calls)
        if self._whole_output:
            self._buffer += text
            # Formats without an end marker: everything from the start marker on is the call.
            if self.start and self.start in self._buffer and not self._in_call:
                pos = self._buffer.find(self.start)
                out, self._buffer, self._in_call = (
                    self._buffer[:pos],
                    self._buffer[pos + len(self.start) :],
                    True,
                )
                return out, []
            if self._in_call or (
                not self.start and self._buffer.lstrip().startswith(("{", "[", "<|python_tag|>"))
            ):
                self._in_call = True
                return "", []
            if not self.start and not self._buffer.strip():
                return "", []
            keep = _held_suffix(self._buffer, [self.start]) if self.start else 0
            out = self._buffer[: len(self._buffer) - keep]
            self._buffer = self._buffer[len(out) :]
            return out, []
        out_parts: list[str] = []
        self._buffer += text
        while self._buffer:
            if self._in_call:
                pos = self._buffer.find(self.end or "")
                if not self.end or pos < 0:
                    break
                self._finish_call(self._buffer[:pos])
                if self.failed and self.failed[-1] == self._buffer[:pos]:
                    out_parts.append(f"{self.start}{self._buffer[:pos]}{self.end}")
                self._buffer = self._buffer[pos + len(self.end) :]
                self._in_call = False
                continue
            assert self.start is not None
            pos = self._buffer.find(self.start)
            if pos >= 0:
                out_parts.append(self._buffer[:pos])
                self._buffer = self._buffer[pos + len(self.start) :]
                self._in_call = True
                continue
            keep = _held_suffix(self._buffer, [self.start])
            out_parts.append(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
            break
        return "".join(out_parts), self.calls[before:]

    def flush(self) -> tuple[str, list[ToolCall]]:
        """End of generation: parse a call that ran to the end, or give back unparsed text."""
        if not self.active:
            return "", []
        before = len(self.calls)
        buffer, self._buffer = self._buffer, ""
        if self._in_call or (self._whole_output and buffer.strip().startswith(("{", "[", "<|python_tag|>"))):
            self._finish_call(buffer)
            if self.failed and self.failed[-1] == buffer:
                return (f"{self.start or ''}{buffer}", [])
            return "", self.calls[before:]
        return buffer, []
