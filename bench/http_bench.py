"""HTTP benchmark (issue #12): what the OpenAI-compatible HTTP layer costs, and how it compares to mlx_lm.server.

  overhead  the tiny 1,000 tok/s model, one stream of 512 tokens: decode tok/s seen by a streaming `openai`
            client over HTTP vs the engine alone in-process (its own first-to-last-token time)
  peers     SmolLM2 4-bit, 1 and 16 concurrent streams: aggregate tok/s and TTFT p95, this runtime vs
            mlx_lm.server (both real processes, the same client)

Run: `.venv/bin/python bench/http_bench.py [--runs 3]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import OurServer, json_line, median
from serving_bench import streams

TOKENS = 512


def overhead(runs: int) -> dict[str, Any]:
    """Decode tok/s: engine alone vs the same engine behind HTTP streaming."""
    from fixtures.build_models import ensure_models
    from importers import import_model
    from runtime.engine import Engine, EngineSettings
    from runtime.request import GenerationRequest

    folder = ensure_models(["text-qwen3"])["text-qwen3"]
    messages = [{"role": "user", "content": "tell me a story"}]
    engine = Engine(import_model(str(folder)).config, settings=EngineSettings()).start()
    alone = []
    try:
        for _ in range(runs + 1):
            first = last = 0.0
            count = 0
            for event in engine.submit(
                GenerationRequest(messages=messages, max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
            ):
                now = time.perf_counter()
                if event.content or event.reasoning:
                    first = first or now
                    last = now
                if event.done and event.usage is not None:
                    count = event.usage.completion_tokens
            alone.append((count - 1) / (last - first))
    finally:
        engine.shutdown()
    server = OurServer(folder)
    over_http = []
    try:
        import openai

        client = openai.OpenAI(base_url=server.base_url, api_key="bench", max_retries=0, timeout=600)
        for _ in range(runs + 1):
            sample = _ignore_eos_stream(client, server.model, messages)
            over_http.append(sample)
        client.close()
    finally:
        server.close()
    # The first run of each warms caches and compiles kernels: it is left out.
    return {
        "engine alone tok/s": median(alone[1:]),
        "HTTP stream tok/s": median(over_http[1:]),
        "ratio": median(over_http[1:]) / median(alone[1:]),
    }


def _ignore_eos_stream(client: Any, model: str, messages: list[dict[str, Any]]) -> float:
    first = last = 0.0
    tokens = 0
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=TOKENS,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content or getattr(choice.delta, "reasoning_content", None):
                now = time.perf_counter()
                first = first or now
                last = now
    return (tokens - 1) / (last - first)


def main() -> int:
    """Run both scenarios and print one JSON line each, then the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="overhead,peers", help="which scenarios, comma-separated")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    if "overhead" in chosen:
        json_line("overhead", overhead(args.runs))
    if "peers" not in chosen:
        return 0
    from fixtures.build_models import ensure_models

    result = streams(
        ensure_models(["smollm2"])["smollm2"],
        args.runs,
        levels=(1, 16),
        only=("this runtime", "mlx_lm.server"),
    )
    json_line("peers", result)
    json_line(
        "peers ratios",
        {
            f"x{n} tok/s vs mlx_lm.server": result[f"this runtime x{n}"]["tok_s"]
            / result[f"mlx_lm.server x{n}"]["tok_s"]
            for n in (1, 16)
        }
        | {
            "x16 TTFT p95 vs mlx_lm.server": result["this runtime x16"]["ttft_p95"]
            / result["mlx_lm.server x16"]["ttft_p95"]
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
