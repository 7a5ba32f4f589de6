"""Drafting benchmark: a drafted text route against the same route plain, greedy, in one run, as ratios.

Two drafters on the tiny qwen3_5 target (`vlm-qwen35-mtp`): its bundled MTP layer (`mlx.speculative.mtp`) and the
separate DFlash drafter `drafter-qwen35-dflash` (`mlx.drafter`); and the separate Gemma 4 MTP assistant
`drafter-gemma4-assistant` on the tiny gemma4 (`vlm-gemma4-audio`; random weights, so its drafts are almost never
accepted). Each baseline is the same config with no drafter and `text_route: vlm`, so every engine runs mlx-vlm's
code and only the drafting differs. For each prompt the
tokens must be equal (greedy); the script prints acceptance (accepted / proposed drafts, and the share of answer
tokens that were accepted drafts) and the tok/s ratio drafted / plain (engine-side generation rate, medians of
REPEATS interleaved runs). The tiny fixture's drafters are random-ish by design (some drafts right, most wrong),
so the ratio says what verification costs on this CPU, not what a trained drafter gains on a GPU.

Run: `.venv/bin/python bench/draft_bench.py` (builds the fixture models if needed).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = [
    "tell me about the sea",
    "why",
    "seven cats and dogs quickly",
    "hello hello",
    "the sky is blue or red or not",
    "42",
]
MAX_TOKENS = 64
REPEATS = 3


def _configs() -> dict[str, Any]:
    from fixtures.build_models import ensure_models
    from gallery.config import Drafter
    from importers import import_model

    models = ensure_models(
        ["vlm-qwen35-mtp", "drafter-qwen35-dflash", "vlm-gemma4-audio", "drafter-gemma4-assistant"]
    )
    mtp = import_model(str(models["vlm-qwen35-mtp"])).config
    off = mtp.mlx.speculative.model_copy(update={"mtp": False, "draft_kind": None})
    plain = mtp.model_copy(
        update={"mlx": mtp.mlx.model_copy(update={"speculative": off, "text_route": "vlm"})}
    )
    mtp = mtp.model_copy(update={"mlx": mtp.mlx.model_copy(update={"text_route": "vlm"})})
    pin = Drafter(local_path=str(models["drafter-qwen35-dflash"]), kind="dflash", model_type="qwen3_dflash")
    dflash = plain.model_copy(update={"mlx": plain.mlx.model_copy(update={"drafter": pin})})
    gemma = import_model(str(models["vlm-gemma4-audio"])).config
    gemma = gemma.model_copy(update={"mlx": gemma.mlx.model_copy(update={"text_route": "vlm"})})
    assistant = Drafter(
        local_path=str(models["drafter-gemma4-assistant"]), kind="mtp", model_type="gemma4_assistant"
    )
    gemma_mtp = gemma.model_copy(update={"mlx": gemma.mlx.model_copy(update={"drafter": assistant})})
    return {
        "plain": plain,
        "mtp (bundled)": mtp,
        "dflash (separate)": dflash,
        "gemma4 plain": gemma,
        "gemma4 assistant": gemma_mtp,
    }


BASELINE = {"gemma4 plain": "gemma4 plain", "gemma4 assistant": "gemma4 plain"}  # the rest: "plain"


def main() -> int:
    """Run every engine on every prompt, check equality, print acceptance and speed ratios."""
    from runtime.engine import Engine, EngineSettings
    from runtime.request import GenerationRequest

    configs = _configs()
    engines = {
        name: Engine(c, settings=EngineSettings(prefix_cache=False)).start() for name, c in configs.items()
    }
    try:
        rates: dict[str, list[float]] = {name: [] for name in engines}
        answers: dict[str, list[list[str]]] = {name: [] for name in engines}
        usage: dict[str, list[Any]] = {name: [] for name in engines}
        for _ in range(REPEATS):
            for name, engine in engines.items():  # interleaved, so drift hits every engine alike
                texts, per_run = [], []
                for prompt in PROMPTS:
                    request = GenerationRequest(
                        messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0.0
                    )
                    answer = engine.generate(request)
                    texts.append(answer.content)
                    per_run.append(answer.usage)
                    if answer.timings.generation_tps:
                        rates[name].append(answer.timings.generation_tps)
                answers[name].append(texts)
                usage[name] = per_run
        print(
            f"{len(PROMPTS)} prompts x {REPEATS} runs, max_tokens {MAX_TOKENS}, greedy; engine-side decode tok/s"
        )
        print(
            f"{'engine':<20} {'tokens equal':<13} {'accepted/proposed':<18} {'answer from drafts':<19} "
            f"{'tok/s (median)':<15} ratio vs plain"
        )
        for name in engines:
            reference = BASELINE.get(name, "plain")
            base = statistics.median(rates[reference])
            equal = all(run == answers[reference][0] for run in answers[name])
            accepted = sum(u.draft_tokens_accepted for u in usage[name])
            proposed = sum(u.draft_tokens_proposed for u in usage[name])
            generated = sum(u.completion_tokens for u in usage[name])
            rate = statistics.median(rates[name])
            share = f"{accepted}/{generated} ({accepted / generated:.0%})" if generated else "-"
            acceptance = f"{accepted}/{proposed} ({accepted / proposed:.0%})" if proposed else "-"
            print(f"{name:<20} {equal!s:<13} {acceptance:<18} {share:<19} {rate:<15.1f} {rate / base:.2f}")
            if not equal:
                print(f"  MISMATCH in {name}", file=sys.stderr)
                return 1
        status = engines["dflash (separate)"].status()["speculative"]
        print(f"status (dflash engine): {status}")
    finally:
        for engine in engines.values():
            engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
