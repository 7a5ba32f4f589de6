"""Shared by the serving and HTTP benchmarks: servers as real processes, one streaming OpenAI client, and models.

- `OurServer`: `python -m runtime --http 127.0.0.1:0 MODEL [-o key:value …]` (this project).
- `MlxLmServer`: `python -m mlx_lm.server --model MODEL` (mlx-lm's own server: continuous batching, prompt cache).
Both are driven by the same `openai` client, streaming, greedy, and measured the same way (time to first
content token, decode rate from first to last token, tokens from the server's usage).
- `smollm2_f32`: SmolLM2-135M-Instruct dequantized to float32, built once from the 4-bit fixture. On this CPU the
  4-bit kernels prefill at ~7 tok/s, so a 2,000-token chat would take hours; float32 with OpenBLAS (preloaded
  when installed, for every process alike) is fast enough to run the scenarios as the issues specify them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
_LISTENING = re.compile(r"listening on \S+:(\d+)")


def env() -> dict[str, str]:
    """The environment every server process gets: offline, this checkout, OpenBLAS when it is installed."""
    values = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    if OPENBLAS.exists():
        values["LD_PRELOAD"] = str(OPENBLAS)
    return values


def median(values: list[float]) -> float:
    """The median (0 for no values)."""
    return statistics.median(values) if values else 0.0


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    name = "server"

    def __init__(self, argv: list[str], port: int | None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._port = port
        self._found = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            match = _LISTENING.search(line)
            if match and self._port is None:
                self._port = int(match.group(1))
                self._found.set()

    def wait_ready(self, path: str, timeout: float = 600.0) -> None:
        """Wait until the server answers `path` with 200."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n" + "\n".join(self.lines[-30:]))
            if self._port is not None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{self._port}{path}", timeout=5).status_code == 200:
                        return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready:\n" + "\n".join(self.lines[-30:]))

    @property
    def base_url(self) -> str:
        """The OpenAI base URL."""
        return f"http://127.0.0.1:{self._port}/v1"

    def rss(self) -> int:
        """The server process's resident memory, in bytes."""
        with open(f"/proc/{self.proc.pid}/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def close(self) -> None:
        """Stop the server."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class OurServer(_Server):
    """This project's HTTP server."""

    def __init__(self, model: Path, *options: str, label: str = "this runtime") -> None:
        argv = ["-m", "runtime", "--http", "127.0.0.1:0", str(model)]
        for option in options:
            argv += ["-o", option]
        self.name = label
        self.model = model.name
        super().__init__(argv, None)  # the port it picked is read from its "listening on" log line
        self.wait_ready("/health")


class MlxLmServer(_Server):
    """mlx-lm's own server."""

    def __init__(self, model: Path, *extra: str) -> None:
        port = free_port()
        self.name = "mlx_lm.server"
        self.model = str(model)
        super().__init__(
            [
                "-m",
                "mlx_lm.server",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "WARNING",
                *extra,
            ],
            port,
        )
        self.wait_ready("/v1/models")


def stream_chat(
    base_url: str, model: str, messages: list[dict[str, Any]], max_tokens: int, client: Any = None
) -> dict[str, float]:
    """One streamed greedy chat: ttft (s), decode tok/s, completion tokens, total seconds, the answer text."""
    import openai

    own = client is None
    client = client or openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=3600)
    started = time.perf_counter()
    first = last = 0.0
    pieces: list[str] = []
    usage = None
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text = choice.delta.content or ""
                if text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    pieces.append(text)
    finally:
        if own:
            client.close()
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else len(pieces)
    cached = 0
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    if details is not None and getattr(details, "cached_tokens", None):
        cached = int(details.cached_tokens)
    return {
        "ttft": (first or end) - started,
        "decode_tps": (tokens - 1) / (last - first) if last > first else 0.0,
        "tokens": float(tokens),
        "total": end - started,
        "prompt_tokens": float(usage.prompt_tokens if usage else 0),
        "cached": float(cached),
        "text": "".join(pieces),
    }  # type: ignore[dict-item]


def smollm2_f32() -> Path:
    """SmolLM2-135M-Instruct as float32 (dequantized from the 4-bit fixture), built once."""
    target = ROOT / "fixtures" / ".models" / "smollm2-f32"
    if (target / "model.safetensors").is_file():
        return target
    from fixtures.build_models import ensure_models

    source = ensure_models(["smollm2"])["smollm2"]
    code = (
        "import json, shutil, sys\nfrom pathlib import Path\nimport mlx.core as mx\nimport mlx_lm\n"
        "from mlx.utils import tree_flatten\nfrom mlx_lm.utils import dequantize_model\n"
        f"src, dst = Path({str(source)!r}), Path({str(target)!r})\n"
        "model, tok = mlx_lm.load(str(src))\nmodel = dequantize_model(model)\n"
        "weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}\n"
        "dst.mkdir(parents=True, exist_ok=True)\n"
        "mx.save_safetensors(str(dst / 'model.safetensors'), weights, metadata={'format': 'mlx'})\n"
        "config = json.loads((src / 'config.json').read_text())\n"
        "config.pop('quantization', None); config.pop('quantization_config', None)\n"
        "config['torch_dtype'] = 'float32'\n"
        "(dst / 'config.json').write_text(json.dumps(config, indent=2))\n"
        "for name in src.iterdir():\n"
        "    if name.name not in ('config.json', 'model.safetensors') and name.is_file():\n"
        "        shutil.copy(name, dst / name.name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env())
    return target


def json_line(label: str, data: Any) -> None:
    """Print one result line (machine-readable after the label)."""
    print(
        f"{label}: {json.dumps(data, default=lambda v: round(v, 3) if isinstance(v, float) else str(v))}",
        flush=True,
    )
