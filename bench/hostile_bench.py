"""Hostile traffic against the HTTP server, measured (issue 25): time, status and the server's peak memory per case.

    python bench/hostile_bench.py [--src DIR] [--only NAME,…]

Starts `python -m runtime --http` from --src (default: this checkout; point it at an older checkout to compare)
with the tiny fixture models, runs each case against it, and prints one row per case: what came back, how long
it took, how long /health took meanwhile, and the growth of the server's peak resident memory (VmHWM). Every
request goes to 127.0.0.1 only, and every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "fixtures" / ".models"
HI = [{"role": "user", "content": "hi"}]


class Server:
    """One runtime process serving the fixtures over HTTP on a free loopback port."""

    def __init__(self, src: Path, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "runtime", "--http", "127.0.0.1:0", *args]
        self.proc = subprocess.Popen(command, cwd=src, env=env, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            found = re.search(r"listening on \S+:(\d+)", line)
            port = int(found.group(1)) if found else None
        if port is None:
            raise RuntimeError("the server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr or []], daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server never became healthy")

    def peak_rss_mb(self) -> float:
        """The server's peak resident memory so far (VmHWM), in MiB."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]

    def close(self) -> None:
        """Stop the server."""
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def post(url: str, body: bytes | str, timeout: float = 120, **headers: str) -> httpx.Response:
    """POST a chat body."""
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=timeout,
    )


def health_during(server: Server, action: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run action on a thread; meanwhile time one /health. Returns (result, action seconds, /health seconds)."""
    box: dict[str, Any] = {}

    def run() -> None:
        started = time.perf_counter()
        try:
            box["result"] = action()
        except Exception as exc:
            box["result"] = f"{type(exc).__name__}"
        box["seconds"] = time.perf_counter() - started

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.3)
    started = time.perf_counter()
    with contextlib.suppress(httpx.HTTPError):
        httpx.get(f"{server.url}/health", timeout=60)
    health = time.perf_counter() - started
    worker.join(300)
    return box.get("result"), box.get("seconds", float("nan")), health


def status(response: Any) -> str:
    """A response's status and the start of its error message."""
    if not isinstance(response, httpx.Response):
        return str(response)
    try:
        message = response.json().get("error", {}).get("message", "")
    except (ValueError, AttributeError):
        message = ""
    return f"{response.status_code} {message[:50]}".strip()


CASES: dict[str, Callable[[Server], tuple[str, float, float]]] = {}


def case(name: str) -> Callable[[Callable[[Server], tuple[str, float, float]]], Any]:
    """Register a case: it returns (what came back, seconds, /health seconds meanwhile or nan)."""

    def register(fn: Callable[[Server], tuple[str, float, float]]) -> Any:
        CASES[name] = fn
        return fn

    return register


@case("1 cross-site POST (Host rebind, text/plain)")
def cross_site(server: Server) -> tuple[str, float, float]:
    body = json.dumps({"model": "scripted-text", "messages": HI, "max_tokens": 3})
    started = time.perf_counter()
    response = post(server.url, body, host="rebind.attacker.example", **{"content-type": "text/plain"})
    return status(response), time.perf_counter() - started, float("nan")


@case("2 normal request behind 2,100 idle connections")
def idle_connections(server: Server) -> tuple[str, float, float]:
    sockets = []
    try:
        for _ in range(2100):
            sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        started = time.perf_counter()
        body = json.dumps({"model": "scripted-text", "messages": HI, "max_tokens": 3})
        response = post(server.url, body, timeout=60)
        return status(response), time.perf_counter() - started, float("nan")
    except (httpx.HTTPError, OSError) as exc:
        return type(exc).__name__, float("nan"), float("nan")
    finally:
        for sock in sockets:
            sock.close()


@case("2 /metrics size after 3,000 distinct unknown paths")
def metrics_cardinality(server: Server) -> tuple[str, float, float]:
    before = len(httpx.get(f"{server.url}/metrics").content)
    started = time.perf_counter()
    with httpx.Client() as client:
        for index in range(3000):
            client.get(f"{server.url}/v1/x{index}")
    after = len(httpx.get(f"{server.url}/metrics").content)
    return f"{before / 1000:.0f} KB -> {after / 1000:.0f} KB", time.perf_counter() - started, float("nan")


@case("3 1.1 MB Lark grammar (100k alternatives)")
def huge_grammar(server: Server) -> tuple[str, float, float]:
    grammar = "start: " + " | ".join(f'"w{i}"' for i in range(100_000))
    body = json.dumps(
        {
            "model": "scripted-text",
            "messages": HI,
            "max_tokens": 5,
            "response_format": {"type": "lark", "lark": grammar},
        }
    )
    result, seconds, health = health_during(server, lambda: post(server.url, body))
    return status(result), seconds, health


@case("6 2 MB body with stop: [0]*1e6")
def million_stops(server: Server) -> tuple[str, float, float]:
    body = (
        '{"model": "scripted-text", "messages": [{"role": "user", "content": "hi"}], "stop": ['
        + "0," * 999_999
        + "0]}"
    )
    result, seconds, health = health_during(server, lambda: post(server.url, body))
    return status(result), seconds, health


@case("6 30 MB of {} messages")
def empty_messages(server: Server) -> tuple[str, float, float]:
    body = '{"model": "scripted-text", "messages": [' + "{}," * 10_000_000 + "{}]}"
    result, seconds, health = health_during(server, lambda: post(server.url, body))
    return status(result), seconds, health


@case("6 3.5 MB prompt over the context")
def long_prompt(server: Server) -> tuple[str, float, float]:
    body = json.dumps(
        {"model": "scripted-text", "messages": [{"role": "user", "content": "word " * 700_000}]}
    )
    result, seconds, health = health_during(server, lambda: post(server.url, body))
    return status(result), seconds, health


@case("8 vanished non-streaming client: generation cancelled")
def vanished_client(server: Server) -> tuple[str, float, float]:
    body = json.dumps({"model": "text-qwen3", "messages": HI, "max_tokens": 3000, "ignore_eos": True})
    started = time.perf_counter()
    with contextlib.suppress(httpx.TimeoutException):
        post(server.url, body, timeout=1.0)
    while time.perf_counter() - started < 60:
        metrics = httpx.get(f"{server.url}/metrics").text
        if re.search(r'gallery_requests_total\{[^}]*finish_reason="cancelled"[^}]*\} [1-9]', metrics):
            return "cancelled", time.perf_counter() - started, float("nan")
        time.sleep(0.1)
    return "still running after 60 s", float("nan"), float("nan")


@case("10 --max-models 1, two models at once: most resident")
def max_models(server: Server) -> tuple[str, float, float]:
    texts = [str(MODELS / "scripted-text"), str(MODELS / "scripted-think")]
    most = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal most
        while not stop.is_set():
            try:
                models = httpx.get(f"{server.url}/health", timeout=5).json().get("models", {})
                most = max(most, sum(state == "loaded" for state in models.values()))
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    codes: list[int] = []

    def ask(model: str) -> int:
        body = json.dumps({"model": model, "messages": HI, "max_tokens": 2})
        return post(server.url, body, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(ask, texts * 60))
    stop.set()
    watcher.join()
    counts = {code: codes.count(code) for code in sorted(set(codes))}
    return f"most resident {most}; statuses {counts}", time.perf_counter() - started, float("nan")


def run(src: Path, only: list[str]) -> None:
    """Run the cases (each server fresh where the case needs its own settings)."""
    print(f"| case ({src.name}) | answer | seconds | /health meanwhile, s | peak RSS growth, MiB |")
    print("|---|---|---|---|---|")
    for name, fn in CASES.items():
        if only and not any(o in name for o in only):
            continue
        args = [str(MODELS / "scripted-text"), str(MODELS / "text-qwen3"), "--max-models", "2"]
        if name.startswith("10"):
            args = ["--any-model", "--max-models", "1", str(MODELS / "scripted-text")]
        server = Server(src, *args)
        try:
            base = server.peak_rss_mb()
            answer, seconds, health = fn(server)
            growth = server.peak_rss_mb() - base
        finally:
            server.close()
        print(f"| {name} | {answer} | {seconds:.2f} | {health:.2f} | {growth:+.0f} |", flush=True)


def main() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT, help="the checkout whose runtime to start")
    parser.add_argument("--only", default="", help="comma-separated substrings of case names")
    args = parser.parse_args()
    run(args.src.resolve(), [o for o in args.only.split(",") if o])


if __name__ == "__main__":
    main()
