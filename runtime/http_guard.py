"""The HTTP server's browser boundary and its access log.

A keyless server on loopback is reachable from every web page the user opens: a page can POST to it with a
`text/plain` body (no CORS preflight), and DNS rebinding lets it do so under its own host name. So, without
an API key: the `Host` header must name a loopback host or the address the server is bound to (or one the
user allowed), and an `Origin` header, when a browser sends one, must be loopback or an allowed origin.
JSON endpoints take only JSON bodies, whatever the key (a cross-site form post is never a JSON request).
With an API key, browsers cannot send the key cross-site without a preflight that CORS refuses, so the key
is the boundary. Ollama closed the same hole the same way (Host and Origin checks).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from runtime.jsonvalue import MAX_JSON_DEPTH, load_json

access_log = logging.getLogger("runtime.access")

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def _split_host(value: str) -> str:
    """The host part of a Host header or URL netloc, lower-cased, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address means this machine's loopback interface."""
    host = host.rstrip(".")
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class BrowserGuard:
    """Which Host and Origin values a keyless server accepts."""

    bound_host: str
    keyless: bool
    allowed_hosts: set[str] = field(default_factory=set)
    allowed_origins: set[str] = field(default_factory=set)

    @classmethod
    def make(
        cls, bound_host: str, *, keyless: bool, hosts: Iterable[str] = (), origins: Iterable[str] = ()
    ) -> BrowserGuard:
        """A guard for a server bound to bound_host (hosts: extra Host names; origins: the CORS origins)."""
        return cls(
            _split_host(bound_host),
            keyless,
            {_split_host(host) for host in hosts if host},
            {origin.rstrip("/").lower() for origin in origins if origin},
        )

    @property
    def checks_host(self) -> bool:
        """Host is checked on a keyless server bound to loopback (bound elsewhere, the user chose exposure)."""
        return self.keyless and (is_loopback_host(self.bound_host) or bool(self.allowed_hosts))

    def host_refusal(self, host_header: str | None) -> str | None:
        """Why this Host is refused (None: accepted)."""
        if not self.checks_host:
            return None
        host = _split_host(host_header or "")
        if host and (is_loopback_host(host) or host == self.bound_host or host in self.allowed_hosts):
            return None
        return (
            f"Host {host_header or '(none)'!r} is not this server's: a keyless server answers loopback names only "
            "(set an API key, or allow the name with --allowed-host)"
        )

    def origin_refusal(self, origin: str | None) -> str | None:
        """Why this Origin is refused (None: accepted, or no Origin header)."""
        if not self.keyless or origin is None:
            return None
        normalized = origin.strip().rstrip("/").lower()
        if "*" in self.allowed_origins or normalized in self.allowed_origins:
            return None
        parts = urlsplit(normalized)
        if parts.scheme in ("http", "https") and is_loopback_host(_split_host(parts.netloc)):
            return None
        return (
            f"Origin {origin!r} may not call this keyless server (set an API key, or allow the origin with "
            "--cors-origin)"
        )


def is_json_content_type(value: str | None) -> bool:
    """Whether a Content-Type header says JSON (application/json, or any application/*+json)."""
    if not value:
        return False
    media_type = value.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


@dataclass
class AccessRecord:
    """What the access-log line of one request says; routes fill in the model and the token counts."""

    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def count(self, usage: Any) -> None:
        """Record a finished answer's token counts (a runtime.request.Usage; None leaves them unset)."""
        if usage is not None:
            self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens

    def write(self, status: int) -> None:
        """Log the request's one line: method, path, status, duration, model and tokens."""
        if not access_log.isEnabledFor(logging.INFO):
            return
        duration_ms = (time.perf_counter() - self.started) * 1000
        tokens = (
            f" tokens={self.prompt_tokens}+{self.completion_tokens}" if self.prompt_tokens is not None else ""
        )
        access_log.info(
            '"%s %s" %d %.0fms%s%s',
            self.method,
            self.path,
            status,
            duration_ms,
            f" model={self.model}" if self.model else "",
            tokens,
        )


# ----------------------------------------------------------------------------------------------- bodies
MAX_JSON_ITEMS = 200_000
# A JSON string, unrolled so the regex engine never backtracks (strings can be megabytes of base64).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BodyError(ValueError):
    """A request body refused before or while parsing (one line, says which bound)."""


def parse_json_body(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH, max_items: int = MAX_JSON_ITEMS) -> Any:
    """Parse a JSON body whose nesting and number of values are bounded before Python objects are built.

    Python's json builds every value of `[0, 0, …]` or `[{}, {}, …]` at tens of bytes each, so a body under the
    size limit can still take gigabytes; the structure is measured first (strings blanked out, brackets and
    commas counted with numpy) and json.loads runs only on bodies within the bounds.
    """
    import numpy as np

    structure = _JSON_STRING.sub(b'""', raw)
    codes = np.frombuffer(structure, dtype=np.uint8)
    opens = (codes == ord("[")) | (codes == ord("{"))
    closes = (codes == ord("]")) | (codes == ord("}"))
    items = int(np.count_nonzero(codes == ord(","))) + int(np.count_nonzero(opens))
    if items > max_items:
        raise BodyError(
            f"the request body has over {max_items} JSON values (arrays and objects count their items)"
        )
    if opens.any():
        depth = int(np.cumsum(opens.astype(np.int32) - closes.astype(np.int32)).max())
        if depth > max_depth:
            raise BodyError(f"the request body nests {depth} levels deep, over the limit of {max_depth}")
    try:
        # An integer over Python's digit limit becomes a marker the request check refuses by its field's name.
        data = load_json(raw)
    except json.JSONDecodeError as exc:
        raise BodyError(f"the request body is not valid JSON ({exc.msg})") from None
    except (UnicodeDecodeError, RecursionError):
        raise BodyError("the request body is not valid UTF-8 JSON") from None
    except ValueError as exc:
        raise BodyError(f"the request body has a value this server does not read ({exc})") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BodyError(
                "the request body has a lone UTF-16 surrogate (\\ud800–\\udfff) in a string"
            ) from None
    return data
