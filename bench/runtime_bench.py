"""Runtime benchmark: the runtime against the obvious alternative, in one run, as ratios.

A. Throughput and time to first token: the runtime's streaming path (Engine on its worker thread,
   pinned template, stop matching, reasoning split, a queue hop per token) vs raw
   `mlx_lm.stream_generate` on the same SmolLM2-135M-Instruct folder and the same prompt tokens,
   greedy, interleaved repeats, medians. Target: >= 0.97 of raw throughput.
B. Process start to first token for a text config (`gallery run` in a fresh process) vs a minimal
   raw mlx_lm script, and proof that a text config never imports mlx_vlm.
C. The VLM text route: a medium random qwen2_vl (hidden 1024, 8 layers, ~100M parameters, fp32, built
   here) loaded with the zero-copy mlx-lm text route vs with text requests on the mlx-vlm path: RSS
   after load and text-only tokens/s, each in a fresh process. Target: the text route adds <= 5% memory.

Run: `.venv/bin/python bench/runtime_bench.py` (builds the fixture models if needed).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT = "Write a long story about a dragon who learns to fly over the mountains."
MAX_TOKENS = 64
REPEATS = 3


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def bench_throughput(model: Path) -> dict[str, float]:
    """A: runtime streaming vs raw mlx_lm.stream_generate, same prompt tokens, interleaved."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from importers import import_model
    from runtime.engine import Engine
    from runtime.prompt import render_request_prompt
    from runtime.request import GenerationRequest

    config = import_model(str(model)).config
    engine = Engine(config).start()
    raw_model, raw_tokenizer = mlx_lm.load(str(model))
    prompt_text = render_request_prompt(config, [{"role": "user", "content": PROMPT}]).text
    ids = engine.tokenize(prompt_text)
    raw_tokenizer.eos_token_ids = set(config.mlx.stop_token_ids)

    def raw_run() -> tuple[float, float, int]:
        started = time.perf_counter()
        first = last = 0.0
        count = 0
        for response in mlx_lm.stream_generate(
            raw_model, raw_tokenizer, mx.array(ids), max_tokens=MAX_TOKENS, sampler=make_sampler(temp=0.0)
        ):
            now = time.perf_counter()
            if count == 0:
                first = now
            last, count = now, response.generation_tokens
        return first - started, (count - 1) / (last - first) if last > first else 0.0, count

    def runtime_run() -> tuple[float, float, int]:
        started = time.perf_counter()
        first = last = 0.0
        final = None
        for event in engine.submit(
            GenerationRequest(prompt=prompt_text, max_tokens=MAX_TOKENS, temperature=0.0)
        ):
            now = time.perf_counter()
            if not first and (event.content or event.reasoning):
                first = now
            last, final = now, event
        count = final.usage.completion_tokens if final and final.usage else 0
        return first - started, (count - 1) / (last - first) if last > first else 0.0, count

    raw_run()
    runtime_run()  # warm both paths (compilation, caches)
    raw, ours = [], []
    for _ in range(REPEATS):
        raw.append(raw_run())
        ours.append(runtime_run())
    engine.shutdown()
    result = {
        "raw_ttft_s": _median([r[0] for r in raw]),
        "runtime_ttft_s": _median([r[0] for r in ours]),
        "raw_tps": _median([r[1] for r in raw]),
        "runtime_tps": _median([r[1] for r in ours]),
        "tokens": ours[-1][2],
        "raw_tokens": raw[-1][2],
    }
    result["tps_ratio"] = result["runtime_tps"] / result["raw_tps"] if result["raw_tps"] else 0.0
    return result


def _time_to_first_stdout(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    first = process.stdout.read(1)
    elapsed = time.perf_counter() - started
    rest, errors = process.communicate(timeout=300)
    if process.returncode != 0:
        raise RuntimeError(errors.decode()[-500:])
    return elapsed, (first + rest).decode()


def bench_process_start(model: Path) -> dict[str, Any]:
    """B: fresh process to first token, `gallery run` vs a minimal raw mlx_lm script."""
    raw_script = (
        "import mlx_lm\n"
        f"m, t = mlx_lm.load({str(model)!r})\n"
        "p = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, tokenize=False)\n"
        "for r in mlx_lm.stream_generate(m, t, p, max_tokens=8):\n"
        "    print(r.text, end='', flush=True)\n"
    )
    ours, raw = [], []
    for _ in range(REPEATS):
        ours.append(
            _time_to_first_stdout(
                [sys.executable, "-m", "cli", "run", str(model), "-p", "hi", "--max-tokens", "8"]
            )[0]
        )
        raw.append(_time_to_first_stdout([sys.executable, "-c", raw_script])[0])
    check = (
        "import sys\nfrom importers import import_model\nfrom runtime.engine import Engine\nfrom runtime.request import GenerationRequest\n"
        f"e = Engine(import_model({str(model)!r}).config).start()\n"
        "e.generate(GenerationRequest(messages=[{'role': 'user', 'content': 'hi'}], max_tokens=2))\n"
        "print('mlx_vlm' in sys.modules, 'mlx_lm' in sys.modules)\n"
    )
    modules = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    imported_vlm = modules.stdout.split()[0] if modules.stdout else "?"
    return {"runtime_start_s": _median(ours), "raw_start_s": _median(raw), "mlx_vlm_imported": imported_vlm}


def build_medium_vlm(out: Path, small: Path) -> float:
    """A random qwen2_vl big enough that weights dominate memory; returns its size in MB."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl
    from mlx_vlm.utils import update_module_configs

    shutil.copytree(small, out)
    config = json.loads((out / "config.json").read_text())
    config.update(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_window_layers=8,
    )
    config["rope_scaling"] = {"type": "mrope", "mrope_section": [8, 12, 12]}
    config["vision_config"] = {**config["vision_config"], "hidden_size": 1024}
    raw = json.loads(json.dumps(config))
    model_config = update_module_configs(
        qwen2_vl.ModelConfig.from_dict(raw), qwen2_vl, raw, ["text", "vision"]
    )
    mx.random.seed(0)
    model = qwen2_vl.Model(model_config)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return (out / "model.safetensors").stat().st_size / 1e6


_ROUTE_SCRIPT = """
import json, sys, time
from importers import import_model
from runtime.engine import Engine, rss_bytes as _rss_bytes
from runtime.request import GenerationRequest
folder, route = sys.argv[1], sys.argv[2]
config = import_model(folder).config
config = config.model_copy(update={"mlx": config.mlx.model_copy(update={"text_route": route})})
engine = Engine(config).start()
import mlx.core as mx
loaded_rss = _rss_bytes()
engine.generate(GenerationRequest(prompt="Once upon a time", max_tokens=4, temperature=0.0))
speeds = []
for _ in range(3):
    result = engine.generate(GenerationRequest(prompt="Once upon a time", max_tokens=48, temperature=0.0))
    speeds.append(result.timings.generation_tps)
print(json.dumps({"rss_after_load": loaded_rss, "rss_after_generate": _rss_bytes(), "route": result.route,
                  "tps": sorted(speeds)[1], "text_route_loaded": engine.loaded.text_route is not None,
                  "mlx_active": int(mx.get_active_memory())}))
engine.shutdown()
"""


def bench_text_route(folder: Path) -> dict[str, Any]:
    """C: the shared-weight text route vs the mlx-vlm path, each in a fresh process."""
    results = {}
    for route in ("shared-weights", "vlm"):
        done = subprocess.run(
            [sys.executable, "-c", _ROUTE_SCRIPT, str(folder), route],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-800:])
        results[route] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def main() -> int:
    """Run all three parts and print a table of ratios."""
    from fixtures.build_models import ensure_models

    models = ensure_models(["smollm2", "scripted-text", "vlm-qwen2vl"])
    print(
        f"A. runtime vs raw mlx_lm.stream_generate on SmolLM2-135M, {MAX_TOKENS} tokens, greedy, "
        f"median of {REPEATS} interleaved runs ...",
        flush=True,
    )
    a = bench_throughput(models["smollm2"])
    print("B. process start to first token ...", flush=True)
    b = bench_process_start(models["scripted-text"])
    print("C. VLM text route vs mlx-vlm path ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="runtime-bench-") as tmp:
        size = build_medium_vlm(Path(tmp) / "medium-vlm", models["vlm-qwen2vl"])
        c = bench_text_route(Path(tmp) / "medium-vlm")
    shared, vlm = c["shared-weights"], c["vlm"]
    mem_ratio = shared["rss_after_load"] / vlm["rss_after_load"]
    print("\n| measurement | runtime | alternative | ratio |")
    print("|---|---|---|---|")
    print(
        f"| SmolLM2 tokens/s (stream, {a['tokens']} tokens) | {a['runtime_tps']:.2f} | {a['raw_tps']:.2f} (raw mlx_lm) "
        f"| {a['tps_ratio']:.3f} |"
    )
    print(
        f"| SmolLM2 time to first token (s) | {a['runtime_ttft_s']:.2f} | {a['raw_ttft_s']:.2f} (raw mlx_lm) "
        f"| {a['runtime_ttft_s'] / a['raw_ttft_s']:.3f} |"
    )
    print(
        f"| process start to first token, text config (s) | {b['runtime_start_s']:.2f} (gallery run) | "
        f"{b['raw_start_s']:.2f} (raw mlx_lm script) | {b['runtime_start_s'] / b['raw_start_s']:.3f} |"
    )
    print(f"| mlx_vlm imported by a text config | {b['mlx_vlm_imported']} | - | - |")
    print(
        f"| medium VLM ({size:.0f} MB weights): RSS after load (MB) | {shared['rss_after_load'] / 1e6:.0f} "
        f"(with text route) | {vlm['rss_after_load'] / 1e6:.0f} (mlx-vlm path only) | {mem_ratio:.3f} |"
    )
    print(
        f"| medium VLM text-only tokens/s | {shared['tps']:.1f} ({shared['route']}) | {vlm['tps']:.1f} "
        f"({vlm['route']}) | {shared['tps'] / vlm['tps']:.3f} |"
    )
    print(
        f"\ntargets: tokens/s ratio >= 0.97 (got {a['tps_ratio']:.3f}); no mlx_vlm import for text configs "
        f"(imported: {b['mlx_vlm_imported']}); text route adds <= 5% memory (got {100 * (mem_ratio - 1):+.1f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
