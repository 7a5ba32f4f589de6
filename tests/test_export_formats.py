"""Interchange, checked against each format's own documented fields: catalog index entries carry what LocalAI's
gallery reads (core/gallery: `name`, `url`/`config_file`, `files` of `filename`/`sha256`/`uri`, …) so LocalAI can
install from the index; `export --format localai` carries the parser options LocalAI's MLX importer sets;
`export --format lmstudio` is LM Studio's model.yaml (model, base, metadataOverrides, config, customFields)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.catalog_support import BUNDLED, run_cli

# LocalAI's gallery model (core/gallery/models_types.go GalleryModel + Metadata): the keys it reads.
LOCALAI_GALLERY_KEYS = {
    "url",
    "name",
    "description",
    "license",
    "urls",
    "icon",
    "tags",
    "config_file",
    "overrides",
    "files",
    "size",
}
LOCALAI_FILE_KEYS = {"filename", "sha256", "uri"}
# LocalAI's model config keys this export may use (core/config/model_config.go, documented in its model
# configuration reference).
LOCALAI_MODEL_KEYS = {
    "name",
    "backend",
    "description",
    "license",
    "context_size",
    "parameters",
    "stopwords",
    "template",
    "known_usecases",
    "options",
}
LOCALAI_PARAMETERS = {
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "repeat_penalty",
    "seed",
}
# LocalAI's parser names (core/config/parser_defaults.json): the vocabulary tool_parser/reasoning_parser use.
LOCALAI_TOOL_PARSERS = {
    "qwen3_xml",
    "hermes",
    "llama4_pythonic",
    "llama3_json",
    "mistral",
    "deepseek_v3",
    "glm47",
    "glm45",
    "gemma4",
    "granite4",
    "minimax_m2",
    "kimi_k2",
    "olmo3",
    "ernie45",
    "phi4_mini_json",
    "openai",
    "pythonic",
}
LOCALAI_REASONING_PARSERS = {
    "qwen3",
    "deepseek_r1",
    "mistral",
    "deepseek_v3",
    "glm45",
    "gemma4",
    "granite",
    "minimax_m2",
    "kimi_k2",
    "nemotron_v3",
    "olmo3",
    "ernie45",
    "openai_gptoss",
}
# LM Studio's model.yaml (its "Introduction to model.yaml" page): core fields and their documented parts.
LMSTUDIO_KEYS = {"model", "base", "metadataOverrides", "config", "customFields", "suggestions"}
LMSTUDIO_METADATA = {
    "domain",
    "architectures",
    "compatibilityTypes",
    "paramsStrings",
    "minMemoryUsageBytes",
    "contextLengths",
    "vision",
    "reasoning",
    "trainedForToolUse",
}
LMSTUDIO_FIELD_KEYS = {
    "llm.prediction.temperature",
    "llm.prediction.topKSampling",
    "llm.prediction.topPSampling",
    "llm.prediction.minPSampling",
    "llm.load.contextLength",
}


def _index() -> list[dict]:
    return yaml.safe_load((BUNDLED / "index.yaml").read_text())


def test_index_entries_carry_what_localai_reads() -> None:
    for item in _index():
        assert set(item) - {"config"} <= LOCALAI_GALLERY_KEYS, set(item) - LOCALAI_GALLERY_KEYS
        assert item.get("url") or item.get("config_file"), item["name"]  # LocalAI needs one of the two
        for file in item["files"]:
            assert set(file) == LOCALAI_FILE_KEYS
            assert re.fullmatch(r"[0-9a-f]{64}", file["sha256"]) and file["uri"].startswith("https://")
        config_file = item["config_file"]
        assert set(config_file) <= LOCALAI_MODEL_KEYS and config_file["name"] == item["name"]
        assert set(config_file["parameters"]) <= LOCALAI_PARAMETERS
        assert all(":" in option for option in config_file.get("options", []))


@pytest.mark.parametrize(
    ("name", "tool_parser", "reasoning_parser"),
    [
        ("gemma-4-e4b-it-qat-4bit", "gemma4", "gemma4"),
        ("qwen3-4b-4bit", "hermes", "qwen3"),
        ("llama-3.2-3b-instruct", "llama3_json", None),
        ("gemma-3-4b-it-text-4bit", None, None),
    ],
)
def test_localai_export_sets_the_parsers(
    name: str, tool_parser: str | None, reasoning_parser: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "export", name, "--format", "localai")
    assert result.code == 0, result.err
    data = yaml.safe_load(result.out)
    assert set(data) <= LOCALAI_MODEL_KEYS
    options = dict(option.split(":", 1) for option in data["options"])
    assert options.get("tool_parser") == tool_parser and options.get("reasoning_parser") == reasoning_parser
    assert set(p for p in (tool_parser,) if p) <= LOCALAI_TOOL_PARSERS
    assert set(p for p in (reasoning_parser,) if p) <= LOCALAI_REASONING_PARSERS
    assert len(options["revision"]) == 40


def test_lmstudio_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.yaml"
    result = run_cli(capsys, "export", "gemma-4-e4b-it-qat-4bit", "--format", "lmstudio", "-o", out)
    assert result.code == 0, result.err
    data = yaml.safe_load(out.read_text())
    assert set(data) <= LMSTUDIO_KEYS
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", data["model"])
    assert data["base"] == [
        {
            "key": "mlx-community/gemma-4-e4b-it-qat-4bit",
            "sources": [{"type": "huggingface", "user": "mlx-community", "repo": "gemma-4-E4B-it-qat-4bit"}],
        }
    ]
    meta = data["metadataOverrides"]
    assert set(meta) <= LMSTUDIO_METADATA
    assert meta["vision"] is True and meta["reasoning"] is True and meta["trainedForToolUse"] is True
    assert meta["contextLengths"] == [131072] and meta["domain"] == "llm"
    fields = [f for section in data["config"].values() for f in section["fields"]]
    assert {f["key"] for f in fields} <= LMSTUDIO_FIELD_KEYS
    assert {"key": "llm.load.contextLength", "value": 131072} in fields
    thinking = data["customFields"][0]
    assert thinking["type"] == "boolean" and thinking["effects"] == [
        {"type": "setJinjaVariable", "variable": "enable_thinking"}
    ]
    text_only = yaml.safe_load(
        run_cli(capsys, "export", "gemma-3-4b-it-text-4bit", "--format", "lmstudio").out
    )
    assert text_only["metadataOverrides"]["vision"] is False and "customFields" not in text_only
