"""Schema and YAML: deterministic round trips, safe loading, errors with lines; source parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gallery.config import ChatTemplate, MlxSection, ModelConfig, Parameters, Source, StopToken
from gallery.configfile import config_to_yaml, parse_config_text
from gallery.errors import BadConfig, OutputExists, UsageError
from gallery.yamlio import atomic_write, dump_yaml
from importers.source import parse_source


def _config(template: str) -> ModelConfig:
    from gallery.chat_template import template_sha256

    return ModelConfig(
        name="demo",
        backend="mlx",
        parameters=Parameters(model="org/demo"),
        stopwords=["<|im_end|>"],
        mlx=MlxSection(
            source=Source(repo="org/demo", revision="a" * 40),
            stop_tokens=[StopToken(id=2, text="<|im_end|>", sources=["generation_config.json:eos_token_id"])],
            chat_template=ChatTemplate(
                status="pinned", source="chat_template.jinja", text=template, sha256=template_sha256(template)
            ),
        ),
    )


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=300))
@example("\t\n")  # libyaml (the reader) refuses a literal block whose line is only a tab; PyYAML accepts it
def test_any_template_text_round_trips_exactly(template: str) -> None:
    config = _config(template)
    text = config_to_yaml(config)
    again = parse_config_text(text, filename="t.yaml")
    assert again.mlx.chat_template.text == template
    assert config_to_yaml(again) == text  # stable: dump(load(dump(x))) == dump(x)


def test_multiline_templates_are_block_literals_with_trailing_spaces() -> None:
    template = "{%- for m in messages %}  \n\t{{ m.content }} \n{% endfor %}"
    text = config_to_yaml(_config(template))
    assert "text: |" in text
    assert parse_config_text(text, filename="t").mlx.chat_template.text == template


def test_key_order_follows_the_schema() -> None:
    keys = list(yaml.safe_load(config_to_yaml(_config("x"))))
    assert keys[:4] == ["schema_version", "name", "backend", "parameters"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: a\nname: b\n", "duplicate key 'name'"),
        ("a: !!python/object/apply:os.system ['echo hi']\n", "invalid YAML|is not allowed"),
        ("a: [1, 2\n", "invalid YAML"),
        ("base: &b {x: 1}\nother:\n  <<: *b\n", "merge keys"),
        ("a: 1\n---\nb: 2\n", "one YAML document"),
        ("base: &b {x: 1}\nother: *b\n", "anchors and aliases"),
    ],
)
def test_unsafe_or_ambiguous_yaml_is_rejected(text: str, message: str) -> None:
    with pytest.raises(BadConfig, match=message):
        parse_config_text(text, filename="t.yaml")


def test_schema_errors_name_file_line_and_field() -> None:
    good = config_to_yaml(_config("x"))
    bad = good.replace("backend: mlx", "backend: llama-cpp")
    with pytest.raises(BadConfig, match=r"t.yaml:\d+: backend"):
        parse_config_text(bad, filename="t.yaml")
    typo = good.replace("stopwords:", "stop_words:")
    with pytest.raises(BadConfig, match="unknown key"):
        parse_config_text(typo, filename="t.yaml")
    short = good.replace("a" * 40, "abc123")
    with pytest.raises(BadConfig, match="40-hex"):
        parse_config_text(short, filename="t.yaml")
    traversal = good.replace("name: demo", "name: ../../etc/passwd")
    with pytest.raises(BadConfig, match="name"):
        parse_config_text(traversal, filename="t.yaml")
    tampered = good.replace("schema_version: 1", "schema_version: 99")
    with pytest.raises(BadConfig, match="schema_version"):
        parse_config_text(tampered, filename="t.yaml")


def test_atomic_write_never_clobbers_without_permission(tmp_path: Path) -> None:
    target = tmp_path / "c.yaml"
    atomic_write(target, "one")
    with pytest.raises(OutputExists):
        atomic_write(target, "two", overwrite=False)
    assert target.read_text() == "one"
    atomic_write(target, "three")
    assert target.read_text() == "three"
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


def test_dump_yaml_has_no_anchors() -> None:
    shared = {"a": 1}
    assert "&" not in dump_yaml({"x": shared, "y": shared})


@pytest.mark.parametrize(
    ("spec", "repo", "revision"),
    [
        ("mlx-community/gemma-4-E4B-it-qat-4bit", "mlx-community/gemma-4-E4B-it-qat-4bit", None),
        ("hf://Qwen/Qwen3-4B", "Qwen/Qwen3-4B", None),
        ("huggingface://Qwen/Qwen3-4B", "Qwen/Qwen3-4B", None),
        ("hf://Qwen/Qwen3-4B@v1", "Qwen/Qwen3-4B", "v1"),
        ("https://huggingface.co/Qwen/Qwen3-4B", "Qwen/Qwen3-4B", None),
        ("https://huggingface.co/Qwen/Qwen3-4B/tree/dev", "Qwen/Qwen3-4B", "dev"),
        ("https://huggingface.co/Qwen/Qwen3-4B/blob/main/config.json", "Qwen/Qwen3-4B", "main"),
    ],
)
def test_source_spellings(spec: str, repo: str, revision: str | None) -> None:
    source = parse_source(spec)
    assert source.repo_id == repo and source.revision == revision
    assert parse_source(spec, "pinned").revision == "pinned"  # --revision wins


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "a/b/c/d",
        "org//name",
        "-org/name",
        "org/na..me",
        "org/na--me",
        "https://huggingface.co/datasets/x/y",
        "https://huggingface.co/onlyorg",
        "./missing-folder",
    ],
)
def test_bad_sources_are_usage_errors(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_source(spec)


def test_local_folder_source(tmp_path: Path) -> None:
    assert parse_source(str(tmp_path)).local_path == tmp_path.resolve()
    file = tmp_path / "f.txt"
    file.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        parse_source(str(file))
