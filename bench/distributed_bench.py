"""One process vs 2 ranks (mlx.launch, ring backend on 127.0.0.1): memory per rank and tokens/s, same run.

A random-weight qwen2 (float32, 16 layers, ~400M parameters, ~1.6 GB: layers dominate, as in the large models
people split) is built once; each setup serves it over HTTP (`python -m runtime --http … [--hosts …]`) and is
measured the same way:

- memory: each process's resident set (/proc) and MLX's own active memory (the weights and caches, from the
  runtime's "loaded … MLX memory" log lines); per-rank figures are reported as a fraction of the one-process
  figure (goal for a 2-rank pipeline: ≤ 0.55 — each rank holds half the layers plus the embeddings);
- speed: greedy decode tokens/s of one stream, and the aggregate of 4 concurrent streams.

On one CPU host the two ranks share the same cores and memory bandwidth, and every step adds a loopback
round trip, so throughput is not the point here (splitting a model across machines buys memory, not speed);
memory per rank is.

    python bench/distributed_bench.py [--tokens 32] [--skip-tensor]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import ROOT, _Server, env, json_line, median, stream_chat

MODEL = ROOT / "fixtures" / ".models" / "bench-qwen2-400m"
_MEMORY = re.compile(r"(?:rank (\d): )?loaded \S+ .*MLX memory (\d+) MiB")
_RANK = re.compile(r"rank (\d) of (\d) \(pid (\d+)\)")


def build_model() -> Path:
    """The benchmark model: text-qwen2's tokenizer and template, bigger random layers (built once)."""
    if (MODEL / "model.safetensors").is_file():
        return MODEL
    import subprocess

    from fixtures.build_models import ensure_models

    source = ensure_models(["text-qwen2"])["text-qwen2"]
    code = f"""
import json, shutil
from pathlib import Path
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
src, dst = Path({str(source)!r}), Path({str(MODEL)!r})
config = json.loads((src / "config.json").read_text())
config.update(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, max_window_layers=16,
              num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True)
mx.random.seed(7)
model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
weights = {{k: (v * 0.5).astype(mx.float32) for k, v in tree_flatten(model.parameters())}}
dst.mkdir(parents=True, exist_ok=True)
mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={{"format": "mlx"}})
(dst / "config.json").write_text(json.dumps(config, indent=2))
for name in src.iterdir():
    if name.is_file() and name.name not in ("config.json", "model.safetensors", "fixture.json"):
        shutil.copy(name, dst / name.name)
print(sum(v.size for v in weights.values()))
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env())
    return MODEL


class Served(_Server):
    """`python -m runtime --http 127.0.0.1:0 MODEL [extra …]`, ready when /health says so."""

    def __init__(self, model: Path, *extra: str, label: str) -> None:
        self.name = label
        self.model = model.name
        super().__init__(["-m", "runtime", "--http", "127.0.0.1:0", str(model), *extra], None)
        self.wait_ready("/health", timeout=1800)

    def ranks(self) -> dict[int, int]:
        """rank -> pid (a one-process server is rank 0)."""
        found = {int(m.group(1)): int(m.group(3)) for line in self.lines if (m := _RANK.search(line))}
        return found or {0: self.proc.pid}

    def mlx_memory(self) -> dict[int, int]:
        """rank -> MLX active memory after loading, in MiB (from the log)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = {
                int(m.group(1) or 0): int(m.group(2)) for line in self.lines if (m := _MEMORY.search(line))
            }
            if len(found) >= len(self.ranks()):
                return found
            time.sleep(0.2)
        return {}


def rss_of(pid: int) -> int:
    """Resident memory of a process, in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def measure(server: Served, tokens: int) -> dict[str, Any]:
    """Memory per rank, one-stream and 4-stream decode rates, and the greedy answer (to compare setups)."""
    prompt = [{"role": "user", "content": "Tell me a long story about the sea."}]
    stream_chat(server.base_url, server.model, prompt, 4)  # warm-up
    singles = [stream_chat(server.base_url, server.model, prompt, tokens) for _ in range(3)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batch = list(
            pool.map(
                lambda i: stream_chat(
                    server.base_url, server.model, [{"role": "user", "content": f"Story number {i}."}], tokens
                ),
                range(4),
            )
        )
    elapsed = time.perf_counter() - started
    ranks = server.ranks()
    return {
        "rss_mib": {rank: rss_of(pid) for rank, pid in sorted(ranks.items())},
        "mlx_mib": server.mlx_memory(),
        "decode_tps": median([s["decode_tps"] for s in singles]),
        "batch4_tps": sum(b["tokens"] for b in batch) / elapsed,
        "answer": singles[0]["text"],
    }


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--skip-tensor", action="store_true")
    args = parser.parse_args()
    model = build_model()
    setups = [
        ("1 process", ()),
        ("2 ranks, pipeline", ("--hosts", "127.0.0.1,127.0.0.1", "--strategy", "pipeline")),
    ]
    if not args.skip_tensor:
        setups.append(("2 ranks, tensor", ("--hosts", "127.0.0.1,127.0.0.1", "--strategy", "tensor")))
    results: dict[str, dict[str, Any]] = {}
    for label, extra in setups:
        server = Served(model, *extra, label=label)
        try:
            results[label] = measure(server, args.tokens)
        finally:
            server.close()
        json_line(label, {k: v for k, v in results[label].items() if k != "answer"})
    base = results["1 process"]
    base_rss, base_mlx = base["rss_mib"][0], base["mlx_mib"].get(0, 0)
    print(
        "\n| setup | rank | RSS MiB | RSS vs 1 process | MLX MiB | MLX vs 1 process | decode tok/s | ×1 process "
        "| 4 streams tok/s | ×1 process | same greedy answer |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, result in results.items():
        for rank, rss in result["rss_mib"].items():
            mlx = result["mlx_mib"].get(rank, 0)
            print(
                f"| {label} | {rank} | {rss} | {rss / base_rss:.2f} | {mlx} | {mlx / base_mlx if base_mlx else 0:.2f} "
                f"| {result['decode_tps']:.2f} | {result['decode_tps'] / base['decode_tps']:.2f} "
                f"| {result['batch4_tps']:.2f} | {result['batch4_tps'] / base['batch4_tps']:.2f} "
                f"| {'yes' if result['answer'] == base['answer'] else 'NO'} |"
            )
    print(json.dumps({"model": str(model), "tokens": args.tokens}))


if __name__ == "__main__":
    main()
