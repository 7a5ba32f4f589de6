"""The zero-copy text route on other families: tiny random gemma3 and gemma4 VLMs built from the recorded
hub's real configs (shrunk), checked for shared arrays and identical logits against mlx-vlm's model."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.mlx
HUB = Path(__file__).resolve().parent.parent / "fixtures" / "hub"
CONFIGS = {
    "gemma3": HUB / "google" / "gemma-3-4b-it" / "config.json",
    "gemma4": HUB / "google" / "gemma-4-E2B-it" / "config.json",
}


def _tiny(config: dict) -> dict:
    """Shrink a real multimodal config to a few kilobytes of weights, keeping its structure."""
    config = json.loads(json.dumps(config))
    config.pop("audio_config", None)
    config["vocab_size"] = 512
    text = config["text_config"]
    text.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=512,
        sliding_window_pattern=2,
    )
    for key, value in {
        "global_head_dim": 32,
        "hidden_size_per_layer_input": 16,
        "vocab_size_per_layer_input": 512,
        "num_kv_shared_layers": 0,
    }.items():
        if key in text:
            text[key] = value
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"][:2]
    vision = config["vision_config"]
    vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    if "head_dim" in vision:
        vision.update(head_dim=16, global_head_dim=16, num_key_value_heads=2)
    return config


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_text_route_shares_weights_and_logits(family: str, scripted_text_model: Path, tmp_path: Path) -> None:
    def check() -> tuple[bool, float]:
        import mlx.core as mx
        from mlx_vlm.utils import update_module_configs

        from backends.text_route import build_shared_text_backend, shares_weights

        config = _tiny(json.loads(CONFIGS[family].read_text()))
        module = importlib.import_module(f"mlx_vlm.models.{family}")
        raw = json.loads(json.dumps(config))
        model_config = update_module_configs(
            module.ModelConfig.from_dict(raw), module, raw, ["text", "vision"]
        )
        mx.random.seed(0)
        vlm = module.Model(model_config)
        mx.eval(vlm.parameters())
        for name in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer will do for logits
            shutil.copy(scripted_text_model / name, tmp_path / name)
        text = build_shared_text_backend(vlm, config, tmp_path)
        ids = mx.array([[1, 5, 9, 33, 7, 2]])
        expected = vlm.language_model(ids)
        expected = getattr(expected, "logits", expected)
        return shares_weights(text, vlm), float(mx.abs(expected - text.model(ids)).max())

    from backends import run_on_mlx_thread

    result: list[tuple[bool, float]] = []
    run_on_mlx_thread(lambda: result.append(check())).wait(120)
    assert result, "the check raised on the MLX thread"
    shared, difference = result[0]
    assert shared and difference < 1e-5
