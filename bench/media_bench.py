"""Media benchmark (issue #24): the media batch vs one generator per request in turn, and the feature cache.

In-process engines on the tiny Qwen2-VL fixture (`vlm-qwen2vl`), greedy; medians of --runs runs; ratios of the
alternatives measured in the same run.

  batch  8 concurrent image chats (a different image each), `--tokens` tokens each (ignore_eos): aggregate
         tok/s with the media batch vs `media_batching: false` (today's in-turn decoding)
  chat   a 6-turn chat about one image (`--size` px) on a Qwen2-VL whose vision tower is most of a first
         image turn's prefill, as in real VLMs (built by `tower_model` into a temporary folder: the fixture's
         tokenizer and 2-layer language model layout at `--lm-width`, a `--tower-depth` x `--tower-width`
         tower, images up to `--size`² pixels): the sum of the turns' times to first token with the feature
         cache on vs `vision_cache_entries: 0`, on the batch and on the per-request path
         (`media_batching: false`), both with `prefix_cache: false` so every turn prepares its whole prompt;
         then with the prefix cache on (later turns start their batch rows from the kept prefix; their
         embeddings, so the tower, are still computed for the whole prompt), feature cache on vs off. Also the
         tower's share of the TTFTs with the cache off (whole chat, and turn 1).
  text   8 concurrent text-only chats on the same VLM: its mlx-lm text route (what text-only requests take)
         vs the mlx-vlm batch (config `text_route: vlm`), aggregate tok/s — why text keeps the text route

Run: `.venv/bin/python bench/media_bench.py [--runs 3] [--only batch,chat]`.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import json_line, median

QUESTIONS = [
    "What is in this picture?",
    "What colour is it mostly?",
    "Is there anything in the corner?",
    "Describe it in one sentence.",
    "Would it make a good poster?",
    "Thank you; one last detail?",
]


def _image(color: tuple[int, int, int], size: int) -> dict[str, Any]:
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (size, size), color)
    ImageDraw.Draw(picture).rectangle(
        (size // 4, size // 4, size // 2, size // 2), fill=(255 - color[0], 90, 30)
    )
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def _engine(*, folder: Path | None = None, text_route: str | None = None, **settings: Any) -> Any:
    from fixtures.build_models import ensure_models
    from importers import import_model
    from runtime.engine import Engine, EngineSettings

    folder = folder or ensure_models(["vlm-qwen2vl"])["vlm-qwen2vl"]
    config = import_model(str(folder)).config
    if text_route is not None:
        config = config.model_copy(update={"mlx": config.mlx.model_copy(update={"text_route": text_route})})
    return Engine(config, settings=EngineSettings(**settings)).start()


def tower_model(out: Path, *, depth: int, width: int, size: int, lm_width: int) -> Path:
    """The `vlm-qwen2vl` fixture with a realistic share of vision work, written to `out` (not the fixtures).

    The fixture's tower (2 layers, 32 wide, images capped at 112x112 = 16 tokens) is a small share of a
    turn; real Qwen2-VL towers are 32 layers, 1280 wide, over images of hundreds of patches. This keeps the
    fixture's tokenizer, templates and 2-layer language model layout (at `lm_width`, heads of 16 so the
    fixture's mRoPE sections fit), swaps in a `depth` x `width` tower (heads of 64, MLP ratio 4) and a
    processor allowing `size`x`size` images; seeded random weights.
    """
    import json
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl
    from mlx_vlm.utils import update_module_configs

    from fixtures.build_models import (
        QWEN2VL_PREPROCESSOR_CONFIG,
        QWEN2VL_VISION_CONFIG,
        SEED,
        _save_weights,
        _write_json,
        ensure_models,
    )

    base = ensure_models(["vlm-qwen2vl"])["vlm-qwen2vl"]
    shutil.copytree(base, out)
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_size=lm_width, intermediate_size=2 * lm_width, num_attention_heads=lm_width // 16)
    config["vision_config"] = {
        **QWEN2VL_VISION_CONFIG,
        "depth": depth,
        "embed_dim": width,
        "hidden_size": lm_width,
        "num_heads": max(1, width // 64),
        "mlp_ratio": 4,
    }
    raw = json.loads(json.dumps(config))  # from_dict mutates its argument
    model_config = update_module_configs(
        qwen2_vl.ModelConfig.from_dict(raw), qwen2_vl, raw, ["text", "vision"]
    )
    mx.random.seed(SEED)
    weights = dict(tree_flatten(qwen2_vl.Model(model_config).parameters()))
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", {**QWEN2VL_PREPROCESSOR_CONFIG, "max_pixels": size * size})
    _save_weights(out / "model.safetensors", weights)
    return out


def batch(runs: int, count: int = 8, tokens: int = 64, size: int = 112) -> dict[str, Any]:
    """8 concurrent image chats: aggregate tok/s, media batch vs per-request generators in turn."""
    from runtime.request import GenerationRequest

    results: dict[str, Any] = {}
    for label, settings in (
        ("media batch", {"prefix_cache": False}),
        ("in turn", {"prefix_cache": False, "media_batching": False}),
    ):
        engine = _engine(**settings)
        try:
            rates, ttfts = [], []
            for run in range(runs + 1):  # the first run warms up
                requests = [
                    GenerationRequest(
                        messages=[
                            {
                                "role": "user",
                                "content": [
                                    _image((run * 20 + i * 25, 120, 200 - i * 20), size),
                                    {"type": "text", "text": f"({run}.{i}) {QUESTIONS[0]}"},
                                ],
                            }
                        ],
                        max_tokens=tokens,
                        temperature=0.0,
                        ignore_eos=True,
                    )
                    for i in range(count)
                ]
                started = time.perf_counter()
                done = [h.result() for h in [engine.submit(r) for r in requests]]
                elapsed = time.perf_counter() - started
                if run:
                    rates.append(sum(d.usage.completion_tokens for d in done) / elapsed)
                    ttfts.append(median([d.timings.queued_s + d.timings.prompt_s for d in done]))
            results[label] = {"tok_s": median(rates), "ttft_median": median(ttfts)}
        finally:
            engine.shutdown()
    return results


def chat(
    runs: int,
    *,
    turns: int = 6,
    size: int = 448,
    depth: int = 2,
    width: int = 128,
    lm_width: int = 128,
    answer: int = 16,
) -> dict[str, Any]:
    """A 6-turn chat about one image on a tower-heavy Qwen2-VL: the sum of TTFTs, feature cache on vs off."""
    import tempfile

    from runtime.request import GenerationRequest

    configs: dict[str, dict[str, Any]] = {
        "batch, feature cache on": {"prefix_cache": False},
        "batch, feature cache off": {"prefix_cache": False, "vision_cache_entries": 0},
        "per-request, feature cache on": {"prefix_cache": False, "media_batching": False},
        "per-request, feature cache off": {
            "prefix_cache": False,
            "media_batching": False,
            "vision_cache_entries": 0,
        },
        "prefix cache on, feature cache on": {},
        "prefix cache on, feature cache off": {"vision_cache_entries": 0},
    }
    with tempfile.TemporaryDirectory(prefix="media-bench-") as scratch:
        folder = tower_model(
            Path(scratch) / "qwen2vl-tower", depth=depth, width=width, size=size, lm_width=lm_width
        )
        engines = {label: _engine(folder=folder, **settings) for label, settings in configs.items()}
        tower = _TowerClock(
            next(iter(engines.values()))
        )  # one clock: every engine's tower has the same class
        measured: dict[str, dict[str, list[float]]] = {
            label: {"sums": [], "firsts": [], "first_towers": [], "towers": []} for label in configs
        }
        try:
            # Configurations take turns within each run, so a change in the machine's load hits all alike.
            for run in range(runs + 1):  # the first run warms up
                image = _image((run * 30 % 256, 60, 160), size)
                for label, engine in engines.items():
                    history: list[dict[str, Any]] = []
                    total, tower_before = 0.0, tower.seconds
                    for turn in range(turns):
                        content: Any = QUESTIONS[turn % len(QUESTIONS)]
                        if turn == 0:
                            content = [image, {"type": "text", "text": content}]
                        history.append({"role": "user", "content": content})
                        turn_tower = tower.seconds
                        done = engine.generate(
                            GenerationRequest(messages=list(history), max_tokens=answer, temperature=0.0)
                        )
                        ttft = done.timings.queued_s + done.timings.prompt_s
                        total += ttft
                        if run and turn == 0:
                            measured[label]["firsts"].append(ttft)
                            measured[label]["first_towers"].append(tower.seconds - turn_tower)
                        history.append({"role": "assistant", "content": done.content or "ok"})
                    if run:
                        measured[label]["sums"].append(total)
                        measured[label]["towers"].append(tower.seconds - tower_before)
            results: dict[str, Any] = {}
            for label, engine in engines.items():
                status = engine.status()
                features, vlm = status["vision_cache"], status["prefix_cache"].get("vlm") or {}
                values = measured[label]
                results[label] = {
                    "ttft_sum_s": median(values["sums"]),
                    "turn1_ttft_s": median(values["firsts"]),
                    "tower_s_per_chat": median(values["towers"]),
                    "turn1_tower_s": median(values["first_towers"]),
                    "hits": features["hits"],
                    "misses": features["misses"],
                    "batched": vlm.get("batched"),
                    "sent_to_streams": vlm.get("sent_to_streams"),
                    "prefix_hits": vlm.get("hits"),
                }
        finally:
            tower.close()
            for engine in engines.values():
                engine.shutdown()
    return results


def text(runs: int, count: int = 8, tokens: int = 64) -> dict[str, Any]:
    """8 concurrent text-only chats on the VLM: the text route vs the mlx-vlm batch."""
    from runtime.request import GenerationRequest

    results: dict[str, Any] = {}
    for label, route in (("text route", None), ("mlx-vlm batch", "vlm")):
        engine = _engine(text_route=route, prefix_cache=False)
        try:
            rates = []
            for run in range(runs + 1):  # the first run warms up
                requests = [
                    GenerationRequest(
                        messages=[{"role": "user", "content": f"({run}.{i}) {QUESTIONS[i % 6]}"}],
                        max_tokens=tokens,
                        temperature=0.0,
                        ignore_eos=True,
                    )
                    for i in range(count)
                ]
                started = time.perf_counter()
                done = [h.result() for h in [engine.submit(r) for r in requests]]
                if run:
                    rates.append(
                        sum(d.usage.completion_tokens for d in done) / (time.perf_counter() - started)
                    )
            results[label] = {"tok_s": median(rates), "route": done[0].route}
        finally:
            engine.shutdown()
    return results


class _TowerClock:
    """Time the vision tower's real runs (evaluated, so the time is the tower's own): where TTFT goes."""

    def __init__(self, engine: Any) -> None:
        import mlx.core as mx

        tower = engine.loaded.primary.model.vision_tower
        self.cls = type(tower).__mro__[1] if hasattr(type(tower), "_feature_cache_tower") else type(tower)
        self.original = original = self.cls.__call__
        self.seconds = 0.0

        def timed(module: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = original(module, *args, **kwargs)
            mx.eval(out)
            self.seconds += time.perf_counter() - started
            return out

        self.cls.__call__ = timed

    def close(self) -> None:
        """Put the tower's call back."""
        self.cls.__call__ = self.original


def main() -> int:
    """Run the chosen scenarios and print one JSON line each, then the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="batch,chat,text")
    parser.add_argument("--tokens", type=int, default=64, help="batch: tokens per chat")
    parser.add_argument("--size", type=int, default=448, help="chat: image side in pixels")
    parser.add_argument("--tower-depth", type=int, default=2, help="chat: vision tower layers")
    parser.add_argument("--tower-width", type=int, default=128, help="chat: vision tower width")
    parser.add_argument("--lm-width", type=int, default=128, help="chat: language model width")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    if "batch" in chosen:
        result = batch(args.runs, tokens=args.tokens)
        json_line("batch", result)
        ratio = result["media batch"]["tok_s"] / max(result["in turn"]["tok_s"], 1e-9)
        json_line("batch ratio", {"media batch / in turn, aggregate tok/s": ratio, "goal": ">= 3"})
    if "chat" in chosen:
        result = chat(
            args.runs,
            size=args.size,
            depth=args.tower_depth,
            width=args.tower_width,
            lm_width=args.lm_width,
        )
        json_line("chat", result)
        ratios: dict[str, Any] = {}
        for path in ("batch", "per-request", "prefix cache on"):
            on, off = result[f"{path}, feature cache on"], result[f"{path}, feature cache off"]
            ratios[f"{path}: feature cache on / off, sum of TTFTs"] = on["ttft_sum_s"] / max(
                off["ttft_sum_s"], 1e-9
            )
            ratios[f"{path}: tower share of the TTFTs (cache off), of turn 1"] = (
                off["tower_s_per_chat"] / max(off["ttft_sum_s"], 1e-9),
                off["turn1_tower_s"] / max(off["turn1_ttft_s"], 1e-9),
            )
        both = result["prefix cache on, feature cache on"]["ttft_sum_s"]
        ratios["prefix and feature cache on / both off (batch), sum of TTFTs"] = both / max(
            result["batch, feature cache off"]["ttft_sum_s"], 1e-9
        )
        ratios["goal"] = "<= 0.3"
        json_line("chat ratio", ratios)
    if "text" in chosen:
        result = text(args.runs)
        json_line("text", result)
        ratio = result["text route"]["tok_s"] / max(result["mlx-vlm batch"]["tok_s"], 1e-9)
        json_line("text ratio", {"text route / mlx-vlm batch, aggregate tok/s": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
