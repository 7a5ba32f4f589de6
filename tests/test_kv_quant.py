"""KV-cache quantization and activation quantization, on real tiny models and the loopback Hub.

- TurboQuant (`kv_quant_scheme: turboquant`, fractional `kv_bits`) from load options and from the config's
  `mlx.kv_cache`, on the mlx-vlm routes (image, text on a VLM, an MTP drafter, a multi-turn prefix hit); refused by name
  where it cannot work (a text config on mlx-lm, 3.5 bits without TurboQuant, Gemma 4's KV-sharing layers), at config validation and load.
- Activation quantization: the importer pins it for mxfp8/nvfp4 checkpoints with evidence; the runtime applies
  it on CUDA only, and on this CPU says in status that it did not.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.models import fixture_info

pytestmark = pytest.mark.mlx

TURBO = {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}
HUB_ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "hub"


def _config(folder: Path, **mlx_changes: Any):  # type: ignore[no-untyped-def]
    from importers import import_model

    config = import_model(str(folder)).config
    if mlx_changes:
        config = config.model_copy(update={"mlx": config.mlx.model_copy(update=mlx_changes)})
    return config


def _engine(config, **settings: Any):  # type: ignore[no-untyped-def]
    from runtime.engine import Engine, EngineSettings

    return Engine(config, settings=EngineSettings(**settings)).start()


def _request(messages: list[dict[str, Any]], **fields: Any):  # type: ignore[no-untyped-def]
    from runtime.request import GenerationRequest

    fields.setdefault("max_tokens", 8)
    fields.setdefault("temperature", 0.0)
    return GenerationRequest(messages=[dict(m) for m in messages], **fields)


def _png() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ------------------------------------------------------------------------------------------ TurboQuant serves
def test_turboquant_answers_on_the_scripted_vlm_text_route(scripted_vlm_model: Path) -> None:
    engine = _engine(_config(scripted_vlm_model), **TURBO)
    try:
        status = engine.status()
        assert status["kv_cache"] == {"bits": 3.5, "scheme": "turboquant", "group_size": None}
        assert status["text_route"] is False  # mlx-lm has no TurboQuant: text goes to mlx-vlm
        answer = engine.generate(_request([{"role": "user", "content": "hello"}], max_tokens=40))
        assert answer.content == fixture_info(scripted_vlm_model)["answer"]
        assert answer.finish_reason == "stop"
    finally:
        engine.shutdown()


def test_turboquant_serves_images_and_reuses_the_prefix(vlm_model: Path) -> None:
    engine = _engine(_config(vlm_model), **TURBO)
    try:
        history: list[dict[str, Any]] = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _png()}},
                    {"type": "text", "text": "what is this"},
                ],
            }
        ]
        first = engine.generate(_request(history))
        assert first.error is None and first.usage.completion_tokens > 0
        history += [{"role": "assistant", "content": first.content}, {"role": "user", "content": "and then"}]
        second = engine.generate(_request(history))
        assert second.error is None and second.usage.completion_tokens > 0
        assert second.usage.cached_tokens > 0  # the TurboQuant cache is trimmed and reused like a plain one
    finally:
        engine.shutdown()


def test_turboquant_from_the_config_serves_the_mtp_vlm(mtp_vlm_model: Path) -> None:
    from gallery.config import KvCache

    engine = _engine(_config(mtp_vlm_model, kv_cache=KvCache(bits=3.5, scheme="turboquant")))
    try:
        assert engine.status()["kv_cache"]["scheme"] == "turboquant"
        answer = engine.generate(_request([{"role": "user", "content": "tell me about the sea"}]))
        assert answer.error is None and answer.usage.completion_tokens > 0
    finally:
        engine.shutdown()


def test_turboquant_is_refused_by_name_where_mlx_vlm_cannot_run_it(audio_vlm_model: Path) -> None:
    from gallery.errors import RuntimeFailure

    # Gemma 4's KV-sharing layers break mlx-vlm 0.7.10's TurboQuant attention: refused at load, not per request.
    with pytest.raises(RuntimeFailure, match=r"turboquant cannot serve gemma4: its 2 KV-sharing layers"):
        _engine(_config(audio_vlm_model), **TURBO)


def test_load_options_override_the_configs_kv_cache(scripted_vlm_model: Path) -> None:
    from gallery.config import KvCache
    from gallery.errors import RuntimeFailure

    config = _config(scripted_vlm_model, kv_cache=KvCache(bits=3.5, scheme="turboquant"))
    engine = _engine(config, kv_bits=2, kv_quant_scheme="turboquant")
    try:
        assert engine.status()["kv_cache"] == {"bits": 2, "scheme": "turboquant", "group_size": None}
        answer = engine.generate(_request([{"role": "user", "content": "hello"}], max_tokens=40))
        assert answer.content == fixture_info(scripted_vlm_model)["answer"]
    finally:
        engine.shutdown()
    # Uniform from the options replaces the config's TurboQuant, and its group size is checked against the heads.
    with pytest.raises(RuntimeFailure, match="kv_group_size 64 does not divide this model's head size 16"):
        _engine(config, kv_bits=8, kv_quant_scheme="uniform")


# ------------------------------------------------------------------------------------------ refused by name
def test_load_options_refuse_bad_pairs_by_name() -> None:
    from runtime.load_options import OptionError, parse_options

    cases = {
        ("kv_bits:3.5",): "kv_bits 3.5 is fractional: only kv_quant_scheme turboquant",
        ("kv_quant_scheme:turboquant",): "kv_quant_scheme turboquant needs kv_bits",
        ("kv_bits:4", "kv_quant_scheme:lloyd"): "kv_quant_scheme 'lloyd' is not one of uniform, turboquant",
        ("kv_bits:9", "kv_quant_scheme:turboquant"): "kv_bits 9 is not a TurboQuant width",
        ("kv_bits:3.25", "kv_quant_scheme:turboquant"): "kv_bits 3.25 is not a TurboQuant width",
        ("kv_bits:7",): "kv_bits 7 is not supported by uniform quantization",
        ("kv_quant_scheme:uniform",): "kv_quant_scheme needs kv_bits",
    }
    for options, message in cases.items():
        with pytest.raises(OptionError, match=message.replace("(", r"\(")):
            parse_options(list(options))
    assert parse_options(["kv_bits:3.5", "kv_quant_scheme:turboquant"]).get("kv_bits") == 3.5


def test_turboquant_on_a_text_config_is_refused_at_load(scripted_text_model: Path, tmp_path: Path) -> None:
    from gallery.errors import GalleryError
    from runtime.host import ModelHost

    host = ModelHost(interface="stdio")
    with pytest.raises(
        GalleryError, match=r"kv_quant_scheme turboquant: the mlx backend \(mlx-lm\) has no TurboQuant"
    ):
        host.load(str(scripted_text_model), ["kv_bits:3.5", "kv_quant_scheme:turboquant"])
    assert host.engine is None


def test_config_validation_refuses_bad_kv_cache_sections(scripted_text_model: Path, vlm_model: Path) -> None:
    from gallery.configfile import parse_config_text
    from gallery.errors import BadConfig
    from gallery.yamlio import dump_yaml
    from importers import import_model

    text = import_model(str(scripted_text_model)).config.to_data()
    vlm = import_model(str(vlm_model)).config.to_data()
    cases = [
        (vlm, {"bits": 3.5}, "mlx.kv_cache.bits 3.5 is fractional: only mlx.kv_cache.scheme turboquant"),
        (vlm, {"scheme": "turboquant"}, "mlx.kv_cache.scheme turboquant needs mlx.kv_cache.bits"),
        (vlm, {"bits": 0.5, "scheme": "turboquant"}, "mlx.kv_cache.bits 0.5 is not a TurboQuant width"),
        (vlm, {"bits": 4, "group_size": 48}, "mlx.kv_cache.group_size 48 is not 32, 64 or 128"),
        (text, {"bits": 3.5, "scheme": "turboquant"}, "mlx.kv_cache.scheme turboquant: the mlx backend"),
    ]
    for data, section, message in cases:
        doc = json.loads(json.dumps(data))
        doc["mlx"]["kv_cache"] = section
        with pytest.raises(BadConfig) as caught:
            parse_config_text(dump_yaml(doc), filename="model.yaml")
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    good = json.loads(json.dumps(vlm))
    good["mlx"]["kv_cache"] = {"bits": 3.5, "scheme": "turboquant"}
    kv = parse_config_text(dump_yaml(good), filename="model.yaml").mlx.kv_cache
    assert kv is not None and kv.bits == 3.5 and kv.scheme == "turboquant"


# ---------------------------------------------------------------------------------- activation quantization
@pytest.fixture
def quantized_hub(hub_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """The loopback Hub with two derived copies of mlx-community/Qwen3-4B-4bit: nvfp4 and mxfp8 weights."""
    repos = {}
    for mode, bits, group in (("nvfp4", 4, 16), ("mxfp8", 8, 32)):
        folder = tmp_path / mode
        shutil.copytree(HUB_ROOT / "mlx-community" / "Qwen3-4B-4bit", folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        # What mlx-lm's convert writes for these modes (mlx_lm.convert --q-mode nvfp4 / mxfp8).
        config["quantization"] = config["quantization_config"] = {
            "group_size": group,
            "bits": bits,
            "mode": mode,
        }
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        repos[f"derived/Qwen3-4B-{mode}"] = folder
    hub = hub_factory(extra_repos=repos)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub


def test_import_pins_activation_quantization_for_nvfp4_and_mxfp8(quantized_hub: Any) -> None:
    from importers import import_model

    for mode in ("nvfp4", "mxfp8"):
        config = import_model(f"derived/Qwen3-4B-{mode}").config
        quant = config.mlx.quantization
        assert quant is not None and quant.mode == mode and quant.activation_quantization is True
        decision = config.mlx.decisions["activation_quantization"]
        assert decision.value == "on (CUDA only)"
        assert [(e.source, e.field, e.value) for e in decision.evidence] == [
            ("config.json", "quantization.mode", mode)
        ]
    plain = import_model("mlx-community/Qwen3-4B-4bit").config
    assert plain.mlx.quantization is not None and plain.mlx.quantization.activation_quantization is False
    assert "activation_quantization" not in plain.mlx.decisions


def test_the_runtime_applies_activation_quantization_only_on_cuda(scripted_text_model: Path) -> None:
    from backends import device_info
    from gallery.config import Quantization

    if device_info()["backend"] == "cuda":
        pytest.skip("this test checks the refusal off CUDA")
    pinned = Quantization(bits=4, group_size=16, mode="nvfp4", activation_quantization=True)
    engine = _engine(_config(scripted_text_model, quantization=pinned))
    try:
        status = engine.status()["activation_quantization"]
        assert status["pinned"] is True and status["applied"] is False
        assert "on CUDA only" in status["detail"] and status["device"] == device_info()["backend"]
        answer = engine.generate(_request([{"role": "user", "content": "hello"}], max_tokens=40))
        assert answer.content == fixture_info(scripted_text_model)["answer"]
    finally:
        engine.shutdown()
    plain = _engine(_config(scripted_text_model))
    try:
        assert plain.status()["activation_quantization"] is None
    finally:
        plain.shutdown()


def test_the_interfaces_status_says_it_too(scripted_text_model: Path, tmp_path: Path) -> None:
    from backends import device_info
    from gallery.config import Quantization
    from gallery.configfile import write_config
    from runtime.host import ModelHost

    if device_info()["backend"] == "cuda":
        pytest.skip("this test checks the refusal off CUDA")
    pinned = Quantization(bits=8, group_size=32, mode="mxfp8", activation_quantization=True)
    path = tmp_path / "pinned.yaml"
    write_config(_config(scripted_text_model, quantization=pinned), path)
    host = ModelHost(interface="stdio")
    host.load(str(path))
    try:
        status = host.status()  # what stdio, gRPC and HTTP report
        assert status["activation_quantization"]["applied"] is False
        assert "mxfp8 layers on CUDA only" in status["activation_quantization"]["detail"]
        assert status["kv_cache"] is None
    finally:
        host.free()
