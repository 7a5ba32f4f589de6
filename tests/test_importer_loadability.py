"""What the libraries can load decides; towers are found wherever they hide; text reasoning markers are found.

Through the recorded hub on loopback (real huggingface_hub) for the four repos that used to get a config that
could not work, plus local folders for the tower places no recorded repo has. The library checks read the
installed mlx-lm / mlx-vlm files, so those assertions need the runtime extras (skipped without them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gallery.config import Evidence
from gallery.errors import UsageError
from gallery.families import library_support, library_version
from importers import import_model
from importers.backend import NoLoader

ROOT = Path(__file__).resolve().parent.parent
MOLMO = "allenai/Molmo-7B-D-0924"
AUDIO = "Qwen/Qwen2-Audio-7B-Instruct"
TEXT_VL = "derived/Qwen2.5-VL-3B-Instruct-text-bf16"
TEXT_THINK = "derived/Llama-3.2-3B-textthink"
libraries = pytest.mark.skipif(
    importlib.util.find_spec("mlx_lm") is None or importlib.util.find_spec("mlx_vlm") is None,
    reason="needs mlx-lm and mlx-vlm installed (the runtime extras)",
)


def gallery_cli(hub_url: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m cli ARGS` against the loopback hub with its own Hugging Face home and wide output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(home), GALLERY_HTTP_BACKOFF="0.01", COLUMNS="400")
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def _find(evidence: list[Evidence], source: str, text: str) -> Evidence:
    hits = [e for e in evidence if e.source == source and text in e.detail]
    assert hits, f"no {source} evidence mentioning {text!r} in {[e.detail for e in evidence]}"
    return hits[0]


@libraries
def test_tower_only_in_custom_code_goes_to_the_library_that_has_the_class(hub_env) -> None:
    result = import_model(MOLMO)
    config = result.config
    assert config.backend == "mlx-vlm"
    assert config.mlx.media.image and not config.mlx.media.audio
    assert not config.mlx.trust_remote_code
    backend = config.mlx.decisions["backend"]
    # the tower hides in the weight index and the processor files, not in config.json
    assert not any(e.source == "config.json" and "tower sub-config" in e.detail for e in backend.evidence)
    weights = _find(backend.evidence, "model.safetensors.index.json", "model.vision_backbone.* 385")
    assert weights.strength == "strong"
    processor = _find(backend.evidence, "preprocessor_config.json", "MolmoImageProcessor")
    assert processor.strength == "medium" and processor.field == "image_processor_type"
    lm = _find(backend.evidence, "mlx-lm", "has no class for 'molmo'")
    vlm = _find(backend.evidence, "mlx-vlm", "mlx_vlm.models.molmo")
    assert lm.strength == vlm.strength == "decisive"
    assert library_support("mlx-vlm", {"model_type": "molmo"}).path.endswith(  # type: ignore[union-attr]
        os.path.join("mlx_vlm", "models", "molmo", "__init__.py")
    )
    assert any("auto_map" in w and "trust_remote_code stays off" in w for w in result.warnings)
    assert not any("loading will fail" in w for w in result.warnings)


@libraries
def test_forcing_a_backend_without_a_class_is_refused(hub_env) -> None:
    with pytest.raises(
        UsageError, match=r"--backend mlx: mlx-lm .* has no class for 'molmo'.*--backend mlx-vlm"
    ):
        import_model(MOLMO, backend="mlx")


@libraries
def test_audio_only_model_no_library_can_load_fails_with_both_versions(hub_env) -> None:
    with pytest.raises(NoLoader) as caught:
        import_model(AUDIO)
    error = caught.value
    assert error.exit_code == 10 and error.model_type == "qwen2_audio"
    assert error.versions == {"mlx-lm": library_version("mlx-lm"), "mlx-vlm": library_version("mlx-vlm")}
    assert error.support["mlx"].module is None and error.support["mlx-vlm"].module is None
    message = str(error)
    assert (
        f"mlx-lm {library_version('mlx-lm')}" in message
        and f"mlx-vlm {library_version('mlx-vlm')}" in message
    )
    # what was found: audio only (its multi_modal_projector is not a vision tower)
    assert error.modalities == ["audio"] and "the evidence found audio input" in message


@libraries
def test_audio_only_model_exit_code_from_the_cli(hub_env, tmp_path) -> None:
    done = gallery_cli(hub_env.url, tmp_path / "hf", "import", AUDIO, "--backend", "mlx-vlm")
    assert done.returncode == 10, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "qwen2_audio" in lines[0] and "Traceback" not in done.stderr


@libraries
def test_text_only_conversion_that_kept_processor_files_is_text(hub_env) -> None:
    config = import_model(TEXT_VL).config
    assert config.backend == "mlx" and not config.mlx.media.image
    backend = config.mlx.decisions["backend"]
    assert _find(backend.evidence, "model.safetensors.index.json", "no tower tensors").strength == "strong"
    assert _find(backend.evidence, "preprocessor_config.json", "Qwen2VLImageProcessor").strength == "medium"
    assert _find(backend.evidence, "config.json", "vision tower sub-config").field == "vision_config"
    lm = _find(backend.evidence, "mlx-lm", "resolved as 'qwen2_vl'")
    assert "mlx_lm.models.qwen2_vl" in lm.detail
    conflicts = " | ".join(backend.conflicts)
    assert (
        "Qwen2VLImageProcessor" in conflicts
        and "vision_config" in conflicts
        and "image-text-to-text" in conflicts
    )


def test_reasoning_markers_as_plain_text_are_found(hub_env) -> None:
    config = import_model(TEXT_THINK).config
    reasoning = config.mlx.reasoning
    assert reasoning.supported and (reasoning.start, reasoning.end) == ("<think>", "</think>")
    assert reasoning.switch == "enable_thinking" and reasoning.default_enabled is True
    evidence = config.mlx.decisions["reasoning"].evidence
    assert _find(evidence, "chat template", "end marker '</think>'")
    assert _find(evidence, "tokenizer", "plain text, matched as text at runtime")
    assert _find(evidence, "chat template", "enable_thinking=True and enable_thinking=False gives different")


def test_switch_without_markers_is_a_warning_not_a_guess(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    template = "{{ 'think hard' if enable_thinking else 'be brief' }}{% for m in messages %}{{ m.content }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "</s>"})
    )
    result = import_model(str(folder))
    assert not result.config.mlx.reasoning.supported
    assert any(
        "reasoning switch (enable_thinking" in w and "no reasoning markers" in w for w in result.warnings
    )


def _folder(tmp_path: Path, config: dict, **files: dict) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for name, data in files.items():
        (folder / f"{name}.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    ("config", "path", "kind"),
    [
        (
            {"thinker_config": {"vision_config": {"depth": 2}, "audio_config": {"d_model": 8}}},
            "thinker_config",
            None,
        ),
        ({"image_encoder_config": {"hidden_size": 8}}, "image_encoder_config", "vision"),
        ({"speech_encoder": {"layers": 2}}, "speech_encoder", "audio"),
        ({"llm_config": {"model_type": "qwen2"}, "vision_tower_cfg": {}}, None, None),
    ],
)
def test_towers_in_any_config_key(tmp_path: Path, config: dict, path: str | None, kind: str | None) -> None:
    folder = _folder(tmp_path, {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **config})
    backend = import_model(str(folder), backend="mlx-vlm" if path else None).config.mlx.decisions["backend"]
    towers = [e for e in backend.evidence if e.source == "config.json" and "tower sub-config" in e.detail]
    if path is None:
        assert towers == []  # an empty tower dict and a language config are not towers
    elif path == "thinker_config":
        assert {e.field for e in towers} == {"thinker_config.vision_config", "thinker_config.audio_config"}
    else:
        assert [(e.field, e.detail.split()[0]) for e in towers] == [(path, kind)]


def test_processor_class_alone_is_medium_evidence_for_a_tower(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path,
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
        preprocessor_config={
            "feature_extractor_type": "WhisperFeatureExtractor",
            "processor_class": "FooProcessor",
        },
    )
    config = import_model(str(folder), backend="mlx-vlm").config
    backend = config.mlx.decisions["backend"]
    assert "the processor files prepare audio input" in backend.value
    assert config.mlx.media.audio and not config.mlx.media.image
    extractor = _find(backend.evidence, "preprocessor_config.json", "WhisperFeatureExtractor")
    assert extractor.strength == "medium"
    assert _find(backend.evidence, "preprocessor_config.json", "FooProcessor").strength == "weak"


@libraries
def test_model_type_resolution_follows_each_library() -> None:
    llava = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}
    assert library_support("mlx", llava).resolved_type == "mistral3"  # mlx-lm's MODEL_REMAPPING
    assert library_support("mlx-vlm", llava).resolved_type == "llava"
    granite = {"model_type": "granite-vision"}
    assert library_support("mlx-vlm", granite).resolved_type == "granite_vision"  # mlx-vlm's own remapping
    assert library_support("mlx", granite).loadable is False
    assert library_support("mlx", {}).loadable is False  # no model_type: mlx-lm cannot pick a class
    assert library_support("mlx-vlm", {"model_type": "Qwen2_VL"}).resolved_type == "qwen2_vl"  # lower-cased
