"""What the interfaces cost: gRPC and stdio against in-process generation, start-up, and concurrency.

    python bench/interfaces_bench.py [--quick] [--no-smollm2]

1. Per-token overhead: the same model, prompt and token count generated in-process (the Engine read by
   nobody until the end, and read per event), over a gRPC stream and over stdio (each a real subprocess
   on loopback / pipes); decode tokens/s (first piece to the end, as the consumer sees it) as a ratio of
   the engine alone, and the implied overhead per token. Two models: the tiny text-qwen3 fixture
   (~1-3 ms/token, where overhead is most visible) and SmolLM2-135M (~100-200 ms/token, a real model).
   Runs alternate between the paths and the median [min-max] is reported, because this VM's speed
   drifts by up to 3x over a minute.
2. Start-up: process start to Health OK, and LoadModel of a text config (a YAML written by the importer).
3. Throughput over gRPC with 1, 4 and 16 concurrent streams on text-qwen3 (aggregate tokens/s, mean
   time to first token), plus mlx-lm's batch_generate on the same model in-process as a reference for
   what batched decoding would give (the engine does not use it).
No result is asserted; numbers are printed as a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a long story about a dragon who learns to bake bread."


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), GALLERY_LOG_LEVEL="WARNING")
    env.pop("LOCALAI_GRPC_AUTH_TOKEN", None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----- the paths -----
# Each run returns (completion tokens, decode seconds): from the first streamed piece to the end, as the
# consumer sees it, so prompt processing (slow and noisy on this CPU) is left out and what remains is the
# per-token cost of generation plus delivery.
class InProcess:
    """The Engine in this process, its events read as they come (what `gallery run` does)."""

    def __init__(self, folder: Path) -> None:
        from catalog.resolve import resolve_spec
        from runtime.engine import Engine

        resolved = resolve_spec(str(folder))
        self.engine = Engine(resolved.config, base=resolved.base).start()

    def submit(self, tokens: int) -> Any:
        from runtime.request import GenerationRequest

        return self.engine.submit(
            GenerationRequest(
                messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens, temperature=0.0
            )
        )

    def run(self, tokens: int) -> tuple[int, float]:
        first = None
        final = None
        for event in self.submit(tokens):
            first = first or time.perf_counter()
            final = event
        assert final is not None and final.usage is not None and not final.error and first is not None, final
        return final.usage.completion_tokens, time.perf_counter() - first

    def close(self) -> None:
        self.engine.shutdown()


class EngineAlone:
    """The same Engine read by nobody until the end: its own first-token-to-end time (the baseline)."""

    def __init__(self, inner: InProcess) -> None:
        self.inner = inner

    def run(self, tokens: int) -> tuple[int, float]:
        handle = self.inner.submit(tokens)
        handle.finished.wait()
        final = list(handle)[-1]
        assert final.usage is not None and final.timings is not None and not final.error, final
        return final.usage.completion_tokens, final.timings.generation_s

    def close(self) -> None:
        """The InProcess path closes the shared engine."""


class GrpcPath:
    """`python -m runtime --addr` with the model loaded; timed at the client."""

    def __init__(self, spec: Path) -> None:
        import grpc

        from runtime.proto import backend_pb2 as pb
        from runtime.proto import backend_pb2_grpc

        self.pb = pb
        self.port = _free_port()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "--addr", f"127.0.0.1:{self.port}"],
            cwd=ROOT,
            env=_env(),
            stderr=subprocess.DEVNULL,
        )
        # Reconnect quickly: the default backoff (1 s and up) would be measured as start-up time.
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}",
            options=[
                ("grpc.initial_reconnect_backoff_ms", 5),
                ("grpc.min_reconnect_backoff_ms", 5),
                ("grpc.max_reconnect_backoff_ms", 20),
            ],
        )
        self.stub = backend_pb2_grpc.BackendStub(self.channel)
        self.health_s = self._wait_health()
        started = time.perf_counter()
        result = self.stub.LoadModel(pb.ModelOptions(Model=str(spec)), timeout=300)
        assert result.success, result.message
        self.load_s = time.perf_counter() - started

    def _wait_health(self) -> float:
        import grpc

        while True:
            try:
                self.stub.Health(self.pb.HealthMessage(), timeout=0.5)
                return time.perf_counter() - self.started
            except grpc.RpcError:
                if self.proc.poll() is not None:
                    raise RuntimeError("the runtime exited before answering Health") from None
                time.sleep(0.005)

    def request(self, tokens: int) -> Any:
        return self.pb.PredictOptions(
            UseTokenizerTemplate=True,
            Messages=[self.pb.Message(role="user", content=PROMPT)],
            Tokens=tokens,
            Temperature=0.0,
        )

    def stream(self, tokens: int) -> tuple[int, float, float]:
        """One stream: (tokens, seconds to the first reply, seconds from the first reply to the end)."""
        started = time.perf_counter()
        first = None
        last = None
        for reply in self.stub.PredictStream(self.request(tokens), timeout=600):
            first = first or time.perf_counter()
            last = reply
        assert last is not None and first is not None
        return last.tokens, first - started, time.perf_counter() - first

    def run(self, tokens: int) -> tuple[int, float]:
        count, _, decode = self.stream(tokens)
        return count, decode

    def close(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class StdioPath:
    """`python -m runtime --stdio MODEL`; timed from the first chat.delta to the result."""

    def __init__(self, folder: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", "--stdio", str(folder)],
            cwd=ROOT,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.ids = 0
        self.call("status")  # answered once the model is loaded (it loads before the loop starts)

    def call(self, method: str, params: Any = None) -> tuple[dict[str, Any], float | None]:
        """Send a request; returns its response and when its first notification arrived."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.ids += 1
        line = {"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params or {}}
        self.proc.stdin.write((json.dumps(line) + "\n").encode())
        self.proc.stdin.flush()
        first = None
        while True:
            message = json.loads(self.proc.stdout.readline())
            if message.get("id") == self.ids:
                return message, first
            first = first or time.perf_counter()

    def run(self, tokens: int) -> tuple[int, float]:
        response, first = self.call(
            "chat",
            {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens, "temperature": 0},
        )
        assert first is not None
        return response["result"]["usage"]["completion_tokens"], time.perf_counter() - first

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


# ----- measurements -----
def per_token(folder: Path, tokens: int, reps: int) -> dict[str, tuple[float, float, float, int]]:
    """Per path: (median, min, max) decode tokens/s over alternating runs after a warm-up, and the token count."""
    inner = InProcess(folder)
    paths = {
        "engine alone": EngineAlone(inner),
        "in-process": inner,
        "gRPC stream": GrpcPath(folder),
        "stdio": StdioPath(folder),
    }
    rates: dict[str, list[float]] = {name: [] for name in paths}
    counts: dict[str, int] = {}
    try:
        for path in paths.values():
            path.run(min(tokens, 8))
        for _ in range(reps):
            for name, path in paths.items():
                count, seconds = path.run(tokens)
                counts[name] = count
                rates[name].append((count - 1) / seconds)  # pieces after the first one
    finally:
        for path in paths.values():
            path.close()
    return {name: (statistics.median(v), min(v), max(v), counts[name]) for name, v in rates.items()}


def startup(config_path: Path, reps: int) -> tuple[float, float]:
    """Median seconds from process start to Health OK, and for LoadModel of a text config."""
    health, load = [], []
    for _ in range(reps):
        path = GrpcPath(config_path)
        health.append(path.health_s)
        load.append(path.load_s)
        path.close()
    return statistics.median(health), statistics.median(load)


def concurrency(folder: Path, levels: list[int], tokens: int) -> list[tuple[int, float, float, int]]:
    """(streams, aggregate tokens/s, mean seconds to first reply, total tokens) per level."""
    path = GrpcPath(folder)
    rows = []
    try:
        path.stream(8)
        for level in levels:
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(max_workers=level) as pool:
                results = list(pool.map(lambda _: path.stream(tokens), range(level)))
            wall = time.perf_counter() - started
            total = sum(r[0] for r in results)
            rows.append(
                (level, total / wall, statistics.mean(r[1] for r in results), total)
            )  # includes prefill
    finally:
        path.close()
    return rows


def batched_reference(folder: Path, streams: int, tokens: int) -> float:
    """Aggregate tokens/s of mlx-lm's BatchGenerator (batch_generate) on the same prompts, in-process."""
    result: dict[str, float] = {}

    def work() -> None:
        import mlx_lm
        from mlx_lm.generate import batch_generate

        model, tokenizer = mlx_lm.load(str(folder))
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True
        )
        batch_generate(model, tokenizer, [list(prompt)] * 2, max_tokens=8)  # warm-up
        started = time.perf_counter()
        out = batch_generate(
            model, tokenizer, [list(prompt)] * streams, max_tokens=tokens, return_token_ids=True
        )
        wall = time.perf_counter() - started
        result["tps"] = sum(len(ids) for ids in out.token_ids or []) / wall

    from backends import run_on_mlx_thread

    # A parked MLX thread (MLX threads must not exit before the interpreter does; see backends).
    run_on_mlx_thread(work, name="mlx-batch-reference").wait()
    return result.get("tps", float("nan"))


def main() -> int:
    """Run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the real-weights model")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    from fixtures.build_models import ensure_models

    names = ["text-qwen3"] + ([] if args.no_smollm2 else ["smollm2"])
    models = ensure_models(names)
    reps = 1 if args.quick else args.reps
    plan = [("text-qwen3 (tiny, 2 layers)", models["text-qwen3"], 300 if args.quick else 1000, reps * 3)]
    if not args.no_smollm2:
        plan.append(("SmolLM2-135M Q4 (real)", models["smollm2"], 16 if args.quick else 40, reps))

    print(
        "\n1. Per-token cost of each interface: decode tokens/s from the first streamed piece to the end, as the "
        "consumer sees it (same model, prompt and max tokens; median [min-max] of alternating runs; ratios against "
        "the engine alone)\n"
    )
    print(
        "| model | tokens x runs | engine alone tok/s | in-process stream tok/s (ratio) | gRPC stream tok/s (ratio) | "
        "stdio tok/s (ratio) | gRPC overhead/token | stdio overhead/token |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, folder, tokens, runs in plan:
        result = per_token(folder, tokens, runs)
        base, low, high, count = result["engine alone"]
        cells = [f"{base:.1f} [{low:.0f}-{high:.0f}]"]
        for name in ("in-process", "gRPC stream", "stdio"):
            rate, low, high, _ = result[name]
            cells.append(f"{rate:.1f} [{low:.0f}-{high:.0f}] ({rate / base:.3f})")
        over = [(1 / result[name][0] - 1 / base) * 1000 for name in ("gRPC stream", "stdio")]
        print(f"| {label} | {count} x {runs} | {' | '.join(cells)} | {over[0]:+.3f} ms | {over[1]:+.3f} ms |")

    with tempfile.TemporaryDirectory() as tmp:
        from gallery.configfile import write_config
        from importers import import_model

        config_path = Path(tmp) / "text-qwen3.yaml"
        write_config(import_model(str(models["text-qwen3"])).config, config_path)
        health, load = startup(config_path, reps)
    print(
        f"\n2. Start-up (median of {reps}): process start -> Health OK {health:.2f} s; "
        f"LoadModel of a text config (YAML, text-qwen3) {load:.2f} s\n"
    )

    tokens = 100 if args.quick else 200
    print(
        f"3. Concurrent gRPC streams on text-qwen3 ({tokens} tokens each; the engine's continuous batching), and "
        "mlx-lm's batch_generate on the same model and prompts in-process, with no server around it, as the "
        "reference\n"
    )
    print("| streams | aggregate tok/s | vs 1 stream | mean time to first token |")
    print("|---|---|---|---|")
    rows = concurrency(models["text-qwen3"], [1, 4, 16], tokens)
    for level, rate, first, _total in rows:
        print(f"| {level} | {rate:.1f} | {rate / rows[0][1]:.2f}x | {first * 1000:.0f} ms |")
    batched = batched_reference(models["text-qwen3"], 16, tokens)
    print(f"| 16, batch_generate (reference) | {batched:.1f} | {batched / rows[0][1]:.2f}x | — |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
