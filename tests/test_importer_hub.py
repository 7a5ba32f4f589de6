"""The importer against the recorded hub on loopback, through the real huggingface_hub client."""

from __future__ import annotations

import json

import pytest

from gallery.chat_template import render_chat, template_sha256
from gallery.errors import (
    BadMetadata,
    GatedRepo,
    NetworkFailure,
    NoConfig,
    OfflineNotCached,
    RepoNotFound,
    RevisionNotFound,
    UnsupportedModel,
    UsageError,
)
from importers import import_model

GEMMA4 = "mlx-community/gemma-4-E4B-it-qat-4bit"


def _stops(config):  # type: ignore[no-untyped-def]
    return {t.id: t for t in config.mlx.stop_tokens}


def test_gemma4_conversion_is_pinned_vlm_with_full_stop_set(hub_env) -> None:
    result = import_model(GEMMA4)
    config = result.config
    assert config.backend == "mlx-vlm"
    stops = _stops(config)
    assert {1, 50, 106} <= set(stops)
    assert stops[1].text == "<eos>" and stops[106].text == "<turn|>" and stops[50].text == "<|tool_response>"
    # every source that named a token is kept: the eot only config+generation+tokenizer declare; 50 only generation
    assert "generation_config.json:eos_token_id" in stops[50].sources
    assert "tokenizer_config.json:eot_token" in stops[106].sources
    assert "tokenizer_config.json:eos_token" in stops[1].sources
    template = config.mlx.chat_template
    assert template.status == "pinned" and template.source == "chat_template.jinja"
    assert template.sha256 == template_sha256(template.text or "")
    assert template.render_check.text_probe == "ok" and template.render_check.image_probe == "ok"
    assert config.mlx.media.image and config.mlx.media.audio and config.mlx.media.marker == "<|image|>"
    assert config.mlx.source.revision == hub_env.commit_of(GEMMA4)
    assert config.mlx.reasoning.start == "<|channel>thought" and config.mlx.reasoning.default_enabled is False
    assert config.mlx.reasoning.switch == "enable_thinking"
    assert config.mlx.tool_calls.format == "gemma4"
    assert config.mlx.quantization is not None and config.mlx.quantization.bits == 4
    assert config.context_size == 131072
    assert config.mlx.text_route == "shared-weights"
    for key in (
        "backend",
        "stop_tokens",
        "chat_template",
        "reasoning",
        "context_size",
        "quantization",
        "revision",
    ):
        assert config.mlx.decisions[key].evidence, key
    # weights have sizes and LFS hashes; nothing but small files was downloaded
    shards = [f for f in config.mlx.files if f.path.endswith(".safetensors")]
    assert len(shards) == 2 and all(f.sha256 and f.size for f in shards)
    assert not any(r.path.endswith(".safetensors") and r.method == "GET" for r in hub_env.requests)


@pytest.mark.parametrize(
    ("repo", "backend", "must_stop", "template_source"),
    [
        ("Qwen/Qwen3-4B", "mlx", {151643, 151645}, "tokenizer_config.json:chat_template"),
        ("mlx-community/Qwen3-4B-4bit", "mlx", {151643, 151645}, "tokenizer_config.json:chat_template"),
        ("HuggingFaceTB/SmolLM3-3B", "mlx", {128012}, "chat_template.jinja"),
        ("Qwen/Qwen2.5-VL-3B-Instruct", "mlx-vlm", {151643, 151645}, "chat_template.json:chat_template"),
        ("llava-hf/llava-1.5-7b-hf", "mlx-vlm", {2}, "chat_template.jinja"),
        ("google/gemma-4-E2B-it", "mlx-vlm", {1, 50, 106}, "chat_template.jinja"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mlx", {2}, "tokenizer_config.json:chat_template"),
        # a text-only conversion of a vision architecture: architecture name and stale pipeline tag say vision,
        # the config has no tower and the weights none either -> text
        ("mlx-community/gemma-3-4b-it-text-4bit", "mlx", {1, 106}, "tokenizer_config.json:chat_template"),
    ],
)
def test_fixture_repos_get_backend_stops_and_template(
    hub_env, repo, backend, must_stop, template_source
) -> None:
    config = import_model(repo).config
    assert config.backend == backend
    assert must_stop <= set(_stops(config)), _stops(config)
    assert config.mlx.chat_template.source == template_source
    assert config.mlx.chat_template.render_check.text_probe == "ok"


def test_vlm_pins_processor_template_when_tokenizer_and_processor_differ(hub_env) -> None:
    config = import_model("Qwen/Qwen2.5-VL-3B-Instruct").config
    assert config.mlx.chat_template.source.startswith("chat_template.json")
    prompt = render_chat(
        config.mlx.chat_template.text or "",
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt
    assert config.mlx.decisions[
        "chat_template"
    ].conflicts  # the tokenizer's text-only template lost, and says so
    text_config = import_model("Qwen/Qwen2.5-VL-3B-Instruct", backend="mlx").config
    assert text_config.mlx.chat_template.source == "tokenizer_config.json:chat_template"


def test_text_only_conversion_records_the_disagreement(hub_env) -> None:
    config = import_model("mlx-community/gemma-3-4b-it-text-4bit").config
    assert config.backend == "mlx"
    assert any("pipeline_tag" in c for c in config.mlx.decisions["backend"].conflicts)
    assert not config.mlx.media.image


def test_text_only_conversion_gets_its_context_from_the_config_class_default(hub_env) -> None:
    config = import_model("mlx-community/gemma-3-4b-it-text-4bit").config
    assert config.context_size == 131072
    evidence = config.mlx.decisions["context_size"].evidence
    assert [(e.field, "Gemma3TextConfig" in e.detail) for e in evidence] == [("text_config.model_type", True)]


@pytest.mark.parametrize(("model_type", "expected"), [("gemma3_text", 131072), ("llama", None)])
def test_undeclared_context_uses_only_defaults_that_are_real(
    tmp_path, model_type: str, expected: int | None
) -> None:
    """A family whose class default is a placeholder (llama's 2048) stays unknown rather than guessed."""
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": model_type, "architectures": ["X"], "eos_token_id": 1})
    )
    config = import_model(str(tmp_path)).config
    assert config.context_size == expected


def test_explicit_backend_wins_with_a_warning(hub_env) -> None:
    result = import_model("mlx-community/gemma-3-4b-it-text-4bit", backend="mlx-vlm")
    assert result.config.backend == "mlx-vlm"
    assert any("overrides the evidence" in w for w in result.warnings)
    with pytest.raises(UsageError):
        import_model("Qwen/Qwen3-4B", backend="llama.cpp")


def test_missing_template_is_loud_and_recorded(hub_env) -> None:
    result = import_model("google/gemma-4-E4B-it")
    assert result.config.mlx.chat_template.status == "missing"
    assert any("no chat template" in w for w in result.warnings)


def test_gated_repo_needs_a_token(hub_env, hub_token, monkeypatch) -> None:
    with pytest.raises(GatedRepo, match="HF_TOKEN"):
        import_model("meta-llama/Llama-3.2-3B-Instruct")
    monkeypatch.setenv("HF_TOKEN", hub_token)
    config = import_model("meta-llama/Llama-3.2-3B-Instruct").config
    assert {128001, 128008, 128009} <= set(_stops(config))
    assert _stops(config)[128009].text == "<|eot_id|>"


@pytest.mark.parametrize(
    ("repo", "error"),
    [
        ("nobody/nothing", RepoNotFound),
        ("broken/malformed-json", BadMetadata),
        ("broken/wrong-types", BadMetadata),
        ("broken/not-json-object", BadMetadata),
        ("broken/no-config", NoConfig),
        ("broken/gated", GatedRepo),
        ("broken/gguf-only", UnsupportedModel),
        ("broken/embeddings", UnsupportedModel),
        ("broken/speech", UnsupportedModel),
        ("broken/image-gen", UnsupportedModel),
    ],
)
def test_broken_repos_fail_cleanly(hub_env, repo, error) -> None:
    with pytest.raises(error) as info:
        import_model(repo)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600


def test_oversized_and_malicious_templates_are_contained(hub_env) -> None:
    huge = import_model("broken/huge-template").config
    assert huge.mlx.chat_template.status == "rejected"
    assert "limit" in huge.mlx.chat_template.render_check.errors[0]
    evil = import_model("broken/malicious-template")
    template = evil.config.mlx.chat_template
    assert template.render_check.text_probe == "error"
    assert any("sandbox" in e for e in template.render_check.errors)
    assert template.named == {}  # the looping and oversized named templates were not pinned
    assert sum("not pinned" in w for w in evil.warnings) >= 2


def test_revision_is_resolved_and_pinned(hub_env) -> None:
    commit = hub_env.commit_of("Qwen/Qwen3-4B")
    config = import_model("Qwen/Qwen3-4B", revision=commit).config
    assert config.mlx.source.revision == commit and config.mlx.source.requested_revision is None
    url_config = import_model(f"https://huggingface.co/Qwen/Qwen3-4B/tree/{commit}").config
    assert url_config.mlx.source.revision == commit
    with pytest.raises(RevisionNotFound):
        import_model("Qwen/Qwen3-4B", revision="no-such-branch")
    old = commit
    new = hub_env.write_file(
        "Qwen/Qwen3-4B", "generation_config.json", b'{"eos_token_id": [151645, 151643, 7]}'
    )
    assert import_model("Qwen/Qwen3-4B").config.mlx.source.revision == new
    pinned_old = import_model("Qwen/Qwen3-4B", revision=old).config
    assert 7 not in _stops(pinned_old)


def test_retries_transient_errors_and_stops_on_4xx(hub_env) -> None:
    hub_env.inject(r"/api/models/Qwen/Qwen3-4B", status=503, count=2)
    hub_env.inject(r"/resolve/.*/config.json", status=429, count=1, headers={"Retry-After": "0"})
    config = import_model("Qwen/Qwen3-4B").config
    assert config.backend == "mlx"
    # a repo not in the cache: nothing to fall back to, so the failure surfaces after the retries
    hub_env.inject(r"/api/models/mlx-community/Qwen3-4B-4bit", status=500, count=10)
    with pytest.raises(NetworkFailure, match="after 4 attempts"):
        import_model("mlx-community/Qwen3-4B-4bit")
    # a 404 is not retried
    hub_env.reset_stats()
    with pytest.raises(RepoNotFound):
        import_model("nobody/nothing")
    assert len([r for r in hub_env.requests if "nobody" in r.path]) == 1


def test_offline_import_uses_the_cache(hub_env, monkeypatch) -> None:
    online = import_model(GEMMA4).config
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_env.reset_stats()
    result = import_model(GEMMA4)
    assert hub_env.requests == []
    offline = result.config
    assert result.origin == "cache"
    assert offline.mlx.source.revision == online.mlx.source.revision
    assert offline.mlx.stop_tokens == online.mlx.stop_tokens
    assert offline.mlx.chat_template == online.mlx.chat_template
    assert offline.backend == online.backend
    with pytest.raises(OfflineNotCached, match="HF_HUB_OFFLINE"):
        import_model("Qwen/Qwen3-4B")


def test_network_failure_falls_back_to_cache_or_fails_cleanly(hub_env, monkeypatch) -> None:
    import_model("Qwen/Qwen3-4B")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("GALLERY_HTTP_ATTEMPTS", "2")
    result = import_model("Qwen/Qwen3-4B")
    assert result.origin == "cache" and any("network failure" in w for w in result.warnings)
    with pytest.raises(NetworkFailure):
        import_model("mlx-community/Qwen3-4B-4bit")


def test_round_trips_and_bytes_are_small(hub_env) -> None:
    hub_env.reset_stats()
    result = import_model(GEMMA4)
    assert result.stats.round_trips <= 3
    # model info + the small files + one Range read of tokenizer.json's head, never its whole body
    tokenizer_reads = [r for r in hub_env.requests if r.path.endswith("/tokenizer.json")]
    assert tokenizer_reads and all(r.range for r in tokenizer_reads)


def test_local_folder_import(tmp_path) -> None:
    from pathlib import Path

    source = Path(__file__).resolve().parent.parent / "fixtures" / "hub" / "Qwen" / "Qwen3-4B"
    folder = tmp_path / "qwen3"
    folder.mkdir()
    for file in source.iterdir():
        if not file.name.startswith("_"):
            (folder / file.name).write_bytes(file.read_bytes())
    config = import_model(str(folder)).config
    assert config.mlx.source.local_path == str(folder)
    assert config.backend == "mlx" and 151645 in _stops(config)


def test_template_that_drops_string_content_is_pinned_with_list_content(hub_env) -> None:
    from runtime.prompt import render_request_prompt

    config = import_model("llava-hf/llava-1.5-7b-hf").config
    template = config.mlx.chat_template
    assert template.content_format == "parts" and template.render_check.text_probe == "ok"
    prompt = render_request_prompt(config, [{"role": "user", "content": "Hello there"}]).text
    assert "Hello there" in prompt  # a plain-string client message still reaches the prompt
