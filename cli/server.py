"""`gallery ps` and `gallery stop`: what a running `gallery serve` holds in memory, and unloading a model from it.

They talk to the server's HTTP API (`GET /health`, `POST /v1/models/unload`) at --url, else $GALLERY_URL, else the
default address `gallery serve` listens on, with --api-key (or $GALLERY_API_KEY) when the server wants one — as
`ollama ps` / `ollama stop` and `lms ps` / `lms unload` do against their servers.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

from cli.output import emit, note, print_table
from gallery.errors import ModelNotFound, RuntimeFailure, UsageError

app = typer.Typer()

URL_ENV = "GALLERY_URL"
API_KEY_ENV = "GALLERY_API_KEY"
DEFAULT_URL = (
    "http://127.0.0.1:8080"  # runtime.serve.DEFAULT_HTTP_ADDR (not imported: the CLI root stays light)
)

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help=f"The server (${URL_ENV}; default {DEFAULT_URL}, `gallery serve`'s)."),
]
KeyOpt = Annotated[str | None, typer.Option("--api-key", help=f"The server's API key (${API_KEY_ENV}).")]


def _request(method: str, path: str, url: str | None, api_key: str | None, body: Any = None) -> Any:
    """One call to the server; every failure is one of the project's errors with a one-line message."""
    import httpx

    base = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UsageError(f"--url {base!r}: give an http(s) URL, e.g. {DEFAULT_URL}")
    key = api_key or os.environ.get(API_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(method, base + path, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise RuntimeFailure(
            f"no server answers at {base} ({type(exc).__name__}): start one with `gallery serve NAME`, or give --url"
        ) from None
    try:
        data = response.json()
    except ValueError:
        data = {}
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if response.status_code == 401:
        raise UsageError(f"{base} wants an API key: --api-key or ${API_KEY_ENV}")
    if response.status_code == 404:
        raise ModelNotFound(message or f"{base}{path}: not found (is it a `gallery serve` server?)")
    if response.status_code >= 400 or not isinstance(data, dict):
        raise RuntimeFailure(
            f"{base}{path}: HTTP {response.status_code}" + (f": {message}" if message else "")
        )
    return data


def _size(count: int | None) -> str:
    from catalog.install import human_size

    return human_size(count) if count else "-"


@app.command("ps")
def ps_command(
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """The models a running server holds in memory: memory (weights + prompt cache), requests, idle time."""
    health = _request("GET", "/health", url, api_key)
    if "loaded" not in health:
        raise UsageError("the server did not say what it holds: it wants an API key (--api-key)")
    rows = health["loaded"]
    if as_json:
        emit(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        note("no model is loaded (one loads on its first request)")
        return
    print_table(
        ("NAME", "BACKEND", "MEMORY", "WEIGHTS", "CACHE", "ACTIVE", "QUEUED", "IDLE", "REVISION"),
        [
            (
                r["name"],
                r["backend"],
                _size(r.get("memory_bytes")),
                _size(r.get("weights_bytes")),
                _size(r.get("prefix_cache_bytes")),
                str(r.get("active", 0)),
                str(r.get("queued", 0)),
                "-" if r.get("idle_seconds") is None else f"{r['idle_seconds']:.0f} s",
                (r.get("revision") or "-")[:12],
            )
            for r in rows
        ],
    )


def stop_command(
    name: Annotated[str, typer.Argument(help="The served model to unload (its name, repo id or spec).")],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Unload a model from a running server, freeing its memory (it loads again on its next request)."""
    done = _request("POST", "/v1/models/unload", url, api_key, {"model": name})
    if done.get("unloaded"):
        note(f"unloaded {done['unloaded']}")
    else:
        note(f"{name} was not loaded")


app.command("stop")(stop_command)
app.command("unload", help="Unload a model from a running server (alias of `stop`).")(stop_command)
