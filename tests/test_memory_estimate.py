"""The memory estimate (mlx.memory) against what MLX really holds, and the fit check against a machine.

Every tiny fixture model is loaded in its own process (tests/memory_probe.py): the MLX active memory the load
adds must match the weights estimate, and the KV cache after N prompt tokens the per-token estimate, within
15%. The recorded-hub repos check the layer arithmetic (sliding windows, shared KV) and the fit verdicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gallery.config import MemoryEstimate
from importers import import_model
from importers.memory import REFERENCE_CONTEXT, check_fit, kv_bytes, total_bytes
from tests.test_importer_loadability import gallery_cli

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
PROBE_TOKENS = 512


@pytest.mark.mlx
def test_estimate_matches_measured_memory_of_every_fixture_model(fixture_models: dict[str, Path]) -> None:
    from tests.plugins.models import fixture_info

    rows = []
    # Drafters are not served alone (a Gemma 4 assistant holds no KV of its own: it reads its target's).
    servable = {n: f for n, f in fixture_models.items() if fixture_info(f)["kind"] != "drafter"}
    for name, folder in sorted(servable.items()):
        estimate = import_model(str(folder)).config.mlx.memory
        assert estimate is not None and estimate.weights_bytes and estimate.kv_bytes_per_token
        kind = fixture_info(folder)["kind"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "tests.memory_probe", str(folder), kind, str(PROBE_TOKENS)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        kv_estimate = kv_bytes(estimate, PROBE_TOKENS)
        assert kv_estimate is not None
        rows.append(
            f"{name:20} weights est {estimate.weights_bytes:>11} measured {measured['weights_active']:>11}"
            f" | KV@{PROBE_TOKENS} est {kv_estimate:>9} measured {measured['kv']:>9}"
        )
        assert measured["weights_active"] == pytest.approx(estimate.weights_bytes, rel=0.15), rows[-1]
        assert measured["kv"] == pytest.approx(kv_estimate, rel=0.15), rows[-1]
        at_n = total_bytes(estimate, PROBE_TOKENS)
        assert at_n == pytest.approx(measured["weights_active"] + measured["kv"], rel=0.15), rows[-1]
    print("\n" + "\n".join(rows))
    assert len(rows) == len(servable) >= 9


def test_sliding_window_and_class_defaults_in_the_kv_estimate(hub_env) -> None:
    memory = import_model("mlx-community/gemma-3-4b-it-text-4bit").config.mlx.memory
    assert memory is not None
    # gemma3_text: 34 layers, every 6th global (5), the rest sliding over 1024 tokens; 4 kv heads × 256 (class
    # defaults), bfloat16
    per_layer = 2 * 4 * 256 * 2
    assert (memory.full_attention_layers, memory.sliding_attention_layers) == (5, 29)
    assert memory.sliding_window == 1024 and memory.kv_bytes_per_token == 34 * per_layer
    assert kv_bytes(memory, 100) == 34 * per_layer * 100
    assert kv_bytes(memory, 8192) == 5 * per_layer * 8192 + 29 * per_layer * 1024
    assert memory.at_8k_bytes == memory.weights_bytes + kv_bytes(memory, REFERENCE_CONTEXT)  # type: ignore[operator]


def test_shared_kv_layers_hold_no_cache(hub_env) -> None:
    memory = import_model("mlx-community/gemma-4-E4B-it-qat-4bit").config.mlx.memory
    assert memory is not None
    assert memory.shared_kv_layers == 18
    assert (memory.full_attention_layers or 0) + (memory.sliding_attention_layers or 0) == 42 - 18


def test_fit_verdicts_against_a_machine(hub_env) -> None:
    molmo = import_model("allenai/Molmo-7B-D-0924").config
    assert molmo.mlx.memory is not None and molmo.mlx.memory.weights_bytes is not None
    assert molmo.mlx.memory.weights_bytes > 29 * GIB  # float32, 7 shards, from the listing alone
    report = check_fit(molmo, machine_bytes=24 * GIB)
    assert report.fits is False and report.warning and "cannot run here" in report.warning
    assert "does NOT fit" in report.summary()
    assert check_fit(molmo, machine_bytes=64 * GIB).fits is True
    qwen = import_model("mlx-community/Qwen3-4B-4bit").config
    assert qwen.context_size == 40960
    report = check_fit(qwen, machine_bytes=5 * GIB)  # 8K fits (3.2 GiB), the full 40960 context does not
    assert report.fits is True and report.fits_context is False
    assert report.warning and "max_kv_size" in report.warning
    assert check_fit(qwen, machine_bytes=4 * GIB).warning is not None  # tight: over 75% of memory
    assert check_fit(qwen, machine_bytes=64 * GIB).warning is None


def test_configs_without_a_memory_section_still_get_a_weights_estimate(hub_env) -> None:
    config = import_model("mlx-community/Qwen3-4B-4bit").config
    old = config.model_copy(update={"mlx": config.mlx.model_copy(update={"memory": None})})
    report = check_fit(old, machine_bytes=1 * GIB)
    assert report.fits is False and report.estimate_8k == config.mlx.memory.weights_bytes  # type: ignore[union-attr]
    assert MemoryEstimate().model_dump(exclude_none=True) == {}


def test_explain_and_show_print_the_fit(hub_env, tmp_path: Path) -> None:
    done = gallery_cli(hub_env.url, tmp_path / "hf", "explain", "allenai/Molmo-7B-D-0924")
    assert done.returncode == 0, done.stderr
    fit = check_fit(import_model("allenai/Molmo-7B-D-0924").config)
    assert f"memory: {fit.summary()}" in done.stdout
    assert (
        "(decisive) mlx-vlm:models" in done.stdout and "(strong) model.safetensors.index.json" in done.stdout
    )
    if fit.fits is False:
        assert "cannot run here" in done.stdout
    shown = gallery_cli(hub_env.url, tmp_path / "hf", "show", "qwen3-4b-4bit")
    assert shown.returncode == 0, shown.stderr
    assert "memory:" in shown.stdout and "at 8K tokens" in shown.stdout
