"""Issue 22: the importer judges a repo by config.json, not by its tags — non-chat models are refused by config
alone (exit 10, naming what they are); a tokenizer that is the repo's own code names `trust_remote_code`; a
model card's `<think>` markers are weak evidence for a template that switches reasoning but names none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.hubserver import HUB_ROOT
from gallery.errors import UnsupportedModel
from importers import import_model

ROOT = Path(__file__).resolve().parent.parent


def _gallery(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


@pytest.fixture
def cli_env(hub_env, tmp_path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub_env.url, HF_HOME=str(tmp_path / "hf-home"), GALLERY_HTTP_BACKOFF="0.01")
    return env


@pytest.mark.parametrize(
    ("repo", "words"),
    [("broken/segmentation", "image segmentation"), ("broken/retrieval", "document retrieval")],
)
def test_non_chat_models_are_refused_by_config_alone(cli_env, repo: str, words: str) -> None:
    info = json.loads((HUB_ROOT / repo / "_info.json").read_text())
    assert not info["tags"] and info["pipeline_tag"] is None  # premise: no tag says what it is
    done = _gallery(["import", repo], cli_env)
    assert done.returncode == 10, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("gallery: error:")]
    assert len(errors) == 1 and words in errors[0] and "architectures" in errors[0]
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize(
    ("architecture", "model_type", "words"),
    [
        ("Qwen2_5_VLForSegmentation", "qwen2_5_vl", "image segmentation"),
        ("ColQwen3_5", "qwen3_5", "document retrieval"),
        ("Qwen3ForEmbedding", "qwen3", "embeddings"),
        ("LlamaForRewardModel", "llama", "reward model"),
        ("Qwen2ForSequenceClassification", "qwen2", "classification"),
        ("SamModel", "sam", "image segmentation"),
    ],
)
def test_a_local_folder_is_judged_by_its_config(
    tmp_path, architecture: str, model_type: str, words: str
) -> None:
    config = json.loads((HUB_ROOT / "Qwen/Qwen2.5-VL-3B-Instruct/config.json").read_text())
    config.update(architectures=[architecture], model_type=model_type)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match=words):
        import_model(str(tmp_path))


def test_chat_models_are_still_imported(hub_env) -> None:
    for repo in ("Qwen/Qwen3-4B", "Qwen/Qwen2.5-VL-3B-Instruct"):
        assert import_model(repo).config.backend in ("mlx", "mlx-vlm")


def test_custom_tokenizer_code_names_trust_remote_code(hub_env, cli_env) -> None:
    result = import_model("derived/Qwen3-4B-customtokenizer")
    assert result.config.mlx.trust_remote_code is False
    said = [w for w in result.warnings if "trust_remote_code" in w and "tokenizer" in w]
    assert said and "off" in said[0] and "--trust-remote-code" in said[0]
    decision = result.config.mlx.decisions["trust_remote_code"]
    assert decision.value.startswith("needed, but off") and "Qwen3CustomTokenizer" in decision.value
    done = _gallery(["import", "derived/Qwen3-4B-customtokenizer", "--trust-remote-code", "-o", "-"], cli_env)
    assert done.returncode == 0, done.stderr
    assert "trust_remote_code: true" in done.stdout
    assert "pinned on" in done.stderr
    plain = import_model("Qwen/Qwen3-4B")
    assert "trust_remote_code" not in plain.config.mlx.decisions
    assert not [w for w in plain.warnings if "trust_remote_code" in w]


def test_card_markers_are_weak_evidence(hub_env) -> None:
    config = import_model("derived/Llama-3.2-3B-cardthink").config
    reasoning = config.mlx.reasoning
    assert reasoning.supported and (reasoning.start, reasoning.end) == ("<think>", "</think>")
    assert reasoning.switch == "enable_thinking"
    card = [e for e in config.mlx.decisions["reasoning"].evidence if e.source == "README.md"]
    assert card and card[0].strength == "weak"
    assert any("model card only" in w for w in config.mlx.warnings)
    # The template's own marker wins: the card is not read at all.
    textthink = import_model("derived/Llama-3.2-3B-textthink").config
    assert textthink.mlx.reasoning.start == "<think>"
    assert not [e for e in textthink.mlx.decisions["reasoning"].evidence if e.source == "README.md"]


def test_an_oversized_cached_file_is_named_offline(hub_env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The offline (cache) path skips a metadata file over the size limit with a warning, as the Hub path does."""
    import importers.fetch

    import_model("Qwen/Qwen3-4B")  # caches the metadata files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(importers.fetch, "MAX_METADATA_BYTES", 2048)
    result = import_model("Qwen/Qwen3-4B")
    assert any("tokenizer_config.json" in w and "limit" in w for w in result.warnings)
    assert "tokenizer_config.json" in result.missing and result.origin == "cache"
