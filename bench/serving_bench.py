"""Serving benchmark (issue #10): this runtime vs mlx_lm.server vs this runtime with the cache and batching off.

Every server is a real process on loopback, driven by the same streaming `openai` client, greedy, one server at a
time; medians of --runs runs. Reported as ratios against the alternatives measured in the same run.

  single   one stream, 64 tokens: time to first token and decode tok/s (SmolLM2 4-bit), plus raw
           mlx_lm.stream_generate in-process on the same prompt tokens (the no-regression baseline)
  chat     a 6-turn chat whose history grows past 2,000 tokens: TTFT per turn and their sum (SmolLM2 float32:
           the 4-bit CPU kernels prefill at ~7 tok/s, see bench/servers.py)
  streams  4 / 8 / 16 concurrent streams: aggregate tok/s and TTFT p95 (SmolLM2 4-bit)
  tiny     16 streams on the tiny 1,000 tok/s model, in-process: continuous batching vs round-robin
  memory   resident memory after filling a prefix cache bounded at 64 MiB, vs the bound

Run: `.venv/bin/python bench/serving_bench.py [--runs 3] [--only single,chat,streams,tiny,memory]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import (
    MlxLmServer,
    OurServer,
    json_line,
    median,
    p95,
    smollm2_f32,
    stream_chat,
)

WORDS = [
    "river",
    "mountain",
    "ocean",
    "forest",
    "city",
    "garden",
    "winter",
    "summer",
    "silver",
    "golden",
    "quiet",
    "bright",
    "ancient",
    "modern",
    "stone",
    "glass",
    "paper",
    "music",
    "painting",
    "dragon",
    "castle",
    "village",
    "market",
    "bridge",
    "tower",
    "harbor",
    "island",
    "desert",
    "valley",
    "meadow",
    "thunder",
    "lantern",
    "compass",
    "journey",
]
STORY = "Write a long story about a dragon who learns to fly over the mountains."


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def _servers(model: Path) -> list[tuple[str, Any]]:
    return [
        ("this runtime", lambda: OurServer(model)),
        (
            "cache+batching off",
            lambda: OurServer(model, "prefix_cache:false", "batching:false", label="cache+batching off"),
        ),
        ("mlx_lm.server", lambda: MlxLmServer(model)),
    ]


def single(model: Path, runs: int) -> dict[str, Any]:
    """One stream, 64 tokens, distinct prompts per run (cold prefixes)."""
    results: dict[str, Any] = {}
    for label, start in _servers(model):
        server = start()
        try:
            stream_chat(server.base_url, server.model, [{"role": "user", "content": "hello"}], 8)  # warm-up
            samples = [
                stream_chat(
                    server.base_url, server.model, [{"role": "user", "content": f"({i}) {STORY}"}], 64
                )
                for i in range(runs)
            ]
        finally:
            server.close()
        results[label] = {
            "ttft": median([s["ttft"] for s in samples]),
            "decode_tps": median([s["decode_tps"] for s in samples]),
            "tokens": median([s["tokens"] for s in samples]),
        }
    results["raw mlx_lm.stream_generate"] = _raw_decode(model, runs)
    return results


def _raw_decode(model: Path, runs: int) -> dict[str, float]:
    """mlx_lm.stream_generate in this process, on the same chat template, greedy, 64 tokens."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    loaded = mlx_lm.load(str(model))
    raw_model, tokenizer = loaded[0], loaded[1]
    rates, ttfts = [], []
    for i in range(runs):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"({i}) {STORY}"}], add_generation_prompt=True
        )
        started = time.perf_counter()
        first = last = 0.0
        count = 0
        for response in mlx_lm.stream_generate(
            raw_model, tokenizer, prompt, max_tokens=64, sampler=make_sampler(temp=0.0)
        ):
            now = time.perf_counter()
            first = first or now
            last, count = now, response.generation_tokens
        ttfts.append(first - started)
        rates.append((count - 1) / (last - first) if last > first else 0.0)
    return {"ttft": median(ttfts), "decode_tps": median(rates)}


def chat(model: Path, runs: int, turns: int = 6, words: int = 300, answer: int = 24) -> dict[str, Any]:
    """A multi-turn chat growing past 2,000 tokens: TTFT per turn."""
    results: dict[str, Any] = {}
    for label, start in _servers(model):
        server = start()
        sums, per_turn, final_prompt = [], [], 0.0
        try:
            for run in range(runs):
                rng = random.Random(1000 + run)  # the same conversations on every server
                history: list[dict[str, Any]] = [
                    {"role": "system", "content": "You are a concise assistant."}
                ]
                ttfts = []
                for turn in range(turns):
                    history.append(
                        {"role": "user", "content": f"Part {turn + 1}: {_words(rng, words)}. Summarise."}
                    )
                    sample = stream_chat(server.base_url, server.model, history, answer)
                    ttfts.append(sample["ttft"])
                    history.append({"role": "assistant", "content": sample["text"]})  # type: ignore[dict-item]
                    final_prompt = sample["prompt_tokens"]
                sums.append(sum(ttfts))
                per_turn.append(ttfts)
        finally:
            server.close()
        results[label] = {
            "sum_ttft": median(sums),
            "turn3": median([t[2] for t in per_turn]),
            "turn6": median([t[-1] for t in per_turn]),
            "final_prompt_tokens": final_prompt,
        }
    return results


def streams(
    model: Path,
    runs: int,
    levels: tuple[int, ...] = (4, 8, 16),
    tokens: int = 64,
    only: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """N concurrent streams: aggregate completion tokens per second and TTFT p95."""
    results: dict[str, Any] = {}
    for label, start in _servers(model):
        if only is not None and label not in only:
            continue
        server = start()
        try:
            stream_chat(server.base_url, server.model, [{"role": "user", "content": "hello"}], 8)
            for level in levels:
                aggregates, p95s, completed = [], [], []
                for run in range(runs):
                    prompts = [f"({run}.{i}) {STORY}" for i in range(level)]
                    started = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(level) as pool:
                        samples = list(pool.map(functools.partial(_safe, server, tokens=tokens), prompts))
                    wall = time.perf_counter() - started
                    done = [s for s in samples if s is not None]
                    aggregates.append(sum(s["tokens"] for s in done) / wall)
                    p95s.append(p95([s["ttft"] for s in done]))
                    completed.append(len(done))
                results[f"{label} x{level}"] = {
                    "tok_s": median(aggregates),
                    "ttft_p95": median(p95s),
                    "completed": min(completed),
                    "of": level,
                }
        finally:
            server.close()
    return results


def _safe(server: Any, prompt: str, *, tokens: int) -> dict[str, float] | None:
    try:
        return stream_chat(server.base_url, server.model, [{"role": "user", "content": prompt}], tokens)
    except Exception as exc:  # a lost stream is a result, not a crash
        print(f"  {server.name}: stream failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def tiny(runs: int, count: int = 16, tokens: int = 128) -> dict[str, Any]:
    """In-process: 16 streams on the tiny model, continuous batching vs round-robin (batching off)."""
    from fixtures.build_models import ensure_models
    from importers import import_model
    from runtime.engine import Engine, EngineSettings
    from runtime.request import GenerationRequest

    folder = ensure_models(["text-qwen3"])["text-qwen3"]
    config = import_model(str(folder)).config
    results: dict[str, Any] = {}
    for label, settings in (
        ("batched", EngineSettings(prefix_cache=False)),
        ("round-robin", EngineSettings(prefix_cache=False, batching=False)),
    ):
        engine = Engine(config, settings=settings).start()
        try:
            rates = []
            for run in range(runs):
                requests = [
                    GenerationRequest(
                        messages=[{"role": "user", "content": f"({run}.{i}) tell me"}],
                        max_tokens=tokens,
                        temperature=0.0,
                        ignore_eos=True,
                    )
                    for i in range(count)
                ]
                started = time.perf_counter()
                done = [h.result() for h in [engine.submit(r) for r in requests]]
                rates.append(sum(d.usage.completion_tokens for d in done) / (time.perf_counter() - started))
            results[label] = {"tok_s": median(rates)}
        finally:
            engine.shutdown()
    return results


def memory(model: Path, bound_mb: int = 64, prompts: int = 40) -> dict[str, Any]:
    """Fill a prefix cache bounded at `bound_mb` with distinct long prompts; compare the growth of resident memory."""
    server = OurServer(model, f"prefix_cache_mb:{bound_mb}", "prefix_cache_entries:1000")
    try:
        stream_chat(server.base_url, server.model, [{"role": "user", "content": "hello"}], 4)
        baseline = server.rss()
        rng = random.Random(7)
        for i in range(prompts):
            stream_chat(
                server.base_url, server.model, [{"role": "user", "content": f"{i} {_words(rng, 300)}"}], 4
            )
        import httpx

        held = 0.0
        for line in httpx.get(server.base_url.replace("/v1", "/metrics"), timeout=30).text.splitlines():
            if line.startswith("gallery_prefix_cache_bytes{"):
                held = float(line.rsplit(" ", 1)[1])
        growth = server.rss() - baseline
    finally:
        server.close()
    bound = bound_mb * 1024 * 1024
    return {
        "bound_mb": bound_mb,
        "cache_held_mb": held / 2**20,
        "rss_growth_mb": growth / 2**20,
        "growth_over_bound": growth / bound,
    }


def main() -> int:
    """Run the chosen scenarios and print one JSON line each, then the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="single,chat,streams,tiny,memory")
    parser.add_argument("--memory-mb", type=int, default=64, help="memory: the prefix cache's byte bound")
    parser.add_argument("--memory-prompts", type=int, default=40, help="memory: distinct prompts sent")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    from fixtures.build_models import ensure_models

    quantized = ensure_models(["smollm2"])["smollm2"]
    if "single" in chosen:
        result = single(quantized, args.runs)
        json_line("single", result)
        ours, raw, peer = (
            result["this runtime"],
            result["raw mlx_lm.stream_generate"],
            result["mlx_lm.server"],
        )
        json_line(
            "single ratios",
            {
                "decode vs raw": ours["decode_tps"] / raw["decode_tps"],
                "decode vs mlx_lm.server": ours["decode_tps"] / peer["decode_tps"],
            },
        )
    if "chat" in chosen:
        result = chat(smollm2_f32(), args.runs)
        json_line("chat", result)
        ours = result["this runtime"]["sum_ttft"]
        json_line(
            "chat ratios",
            {
                "sum TTFT vs mlx_lm.server": ours / result["mlx_lm.server"]["sum_ttft"],
                "sum TTFT vs cache off": ours / result["cache+batching off"]["sum_ttft"],
            },
        )
    if "streams" in chosen:
        result = streams(quantized, args.runs)
        json_line("streams", result)
        json_line(
            "streams ratios",
            {
                f"x{n} tok/s vs mlx_lm.server": result[f"this runtime x{n}"]["tok_s"]
                / result[f"mlx_lm.server x{n}"]["tok_s"]
                for n in (4, 8, 16)
            }
            | {
                "x16 TTFT p95 vs mlx_lm.server": result["this runtime x16"]["ttft_p95"]
                / result["mlx_lm.server x16"]["ttft_p95"]
            },
        )
    if "tiny" in chosen:
        result = tiny(args.runs)
        json_line("tiny", result)
        json_line(
            "tiny ratios",
            {"batched vs round-robin": result["batched"]["tok_s"] / result["round-robin"]["tok_s"]},
        )
    if "memory" in chosen:
        json_line("memory", memory(quantized, args.memory_mb, args.memory_prompts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
