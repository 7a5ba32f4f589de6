"""Browsing and exporting the catalog (list, show, search, export), a broken entry not hiding the others, and
the commands run through a real `gallery` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catalog.index import load_catalog
from tests.catalog_support import BUNDLED, copy_catalog, replace_in, run_cli

GALLERY = Path(sys.executable).parent / "gallery"


def test_list_shows_every_entry(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "catalog")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["NAME", "BACKEND", "SIZE", "STATUS", "LICENSE", "DESCRIPTION"]
    assert len(lines) == 7
    assert "no weights" in next(line for line in lines if line.startswith("smollm3-3b"))
    rows = run_cli(capsys, "catalog", "--json").json()
    assert [r["name"] for r in rows] == load_catalog(BUNDLED / "index.yaml").names()
    gemma = next(r for r in rows if r["name"] == "gemma-4-e4b-it-qat-4bit")
    assert gemma["backend"] == "mlx-vlm" and gemma["repo"] == "mlx-community/gemma-4-E4B-it-qat-4bit"
    assert len(gemma["revision"]) == 40 and gemma["size"] == "5.15 GB"
    assert gemma["weights"] and not next(r for r in rows if r["name"] == "smollm3-3b")["weights"]


def test_search_matches_every_word(capsys: pytest.CaptureFixture[str]) -> None:
    found = run_cli(capsys, "search", "qwen", "--json").json()
    assert {r["name"] for r in found} == {"qwen3-4b-4bit", "qwen2.5-vl-3b-instruct"}
    vision = run_cli(capsys, "search", "mlx-vlm", "vision", "--json").json()
    assert {r["name"] for r in vision} == {"gemma-4-e4b-it-qat-4bit", "qwen2.5-vl-3b-instruct"}
    none = run_cli(capsys, "search", "no-such-model")
    assert none.code == 0 and none.out == "(no entries)\n"


def test_show_human_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    human = run_cli(capsys, "show", "llama-3.2-3b-instruct")
    assert human.code == 0
    assert "repo:         meta-llama/Llama-3.2-3B-Instruct@" in human.out
    assert "128009 '<|eot_id|>'" in human.out
    data = run_cli(capsys, "show", "llama-3.2-3b-instruct", "--json").json()
    assert data["config_file"] == "entries/llama-3.2-3b-instruct.yaml"
    assert data["config"]["name"] == "llama-3.2-3b-instruct"
    assert all(len(f["sha256"]) == 64 for f in data["index"]["files"])
    missing = run_cli(capsys, "show", "llama")
    assert missing.code == 2 and "did you mean llama-3.2-3b-instruct" in missing.err


def test_a_broken_entry_does_not_hide_the_others(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = copy_catalog(tmp_path / "catalog")
    replace_in(index, "- name: smollm3-3b\n", "- name: smollm3-3b\n  name: smollm3-3b\n")
    result = run_cli(capsys, "catalog", "--catalog", index, "--json")
    assert result.code == 0
    assert len(result.json()) == 6  # the duplicate key is reported, the entry (last value wins) still loads
    replace_in(index, "config: entries/smollm3-3b.yaml", "config: entries/nope.yaml")
    result = run_cli(capsys, "catalog", "--catalog", index, "--json")
    assert result.code == 0 and len(result.json()) == 5
    assert "1 invalid entry skipped (smollm3-3b)" in result.err
    shown = run_cli(capsys, "show", "smollm3-3b", "--catalog", index)
    assert shown.code == 13 and "entries/nope.yaml does not exist" in shown.err


def test_unparseable_catalog_is_one_line_exit_13(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "index.yaml"
    index.write_text("- name: a\n  files: [\n")
    for command in ("catalog", "show x", "search x", "install x", "export x", "refresh"):
        result = run_cli(capsys, *command.split(), "--catalog", index)
        assert result.code == 13, command
        assert result.err.count("\n") == 1 and "invalid YAML" in result.err and f"{index}:" in result.err
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("name: x\n")
    result = run_cli(capsys, "catalog", "--catalog", mapping)
    assert result.code == 13 and "must be a list of entries" in result.err


def test_export_localai_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "export", "qwen3-4b-4bit", "--format", "localai")
    assert result.code == 0
    data = yaml.safe_load(result.out)
    entry = load_catalog(BUNDLED / "index.yaml").get("qwen3-4b-4bit")
    config = entry.config
    assert set(data) == {
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
    assert data["name"] == "qwen3-4b-4bit" and data["backend"] == "mlx"
    assert data["parameters"]["model"] == "mlx-community/Qwen3-4B-4bit"
    assert data["parameters"]["temperature"] == config.parameters.temperature
    assert data["stopwords"] == ["<|endoftext|>", "<|im_end|>"]
    assert data["template"] == {"use_tokenizer_template": True}
    assert data["context_size"] == 40960
    assert data["known_usecases"] == ["chat", "completion"]
    # The revision, and the parsers LocalAI's own MLX importer sets (Qwen3: hermes tool calls, qwen3 reasoning).
    assert data["options"] == [
        f"revision:{config.mlx.source.revision}",
        "tool_parser:hermes",
        "reasoning_parser:qwen3",
    ]
    assert data["description"] == entry.meta.description and data["license"] == "apache-2.0"
    assert result.out.startswith("# LocalAI model config for qwen3-4b-4bit")
    vlm = yaml.safe_load(run_cli(capsys, "export", "gemma-4-e4b-it-qat-4bit").out)
    assert vlm["backend"] == "mlx-vlm" and "vision" in vlm["known_usecases"]


def test_export_to_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "qwen.yaml"
    assert run_cli(capsys, "export", "qwen3-4b-4bit", "-o", target).code == 0
    assert yaml.safe_load(target.read_text())["name"] == "qwen3-4b-4bit"
    again = run_cli(capsys, "export", "qwen3-4b-4bit", "-o", target)
    assert again.code == 11 and "--force" in again.err
    assert run_cli(capsys, "export", "qwen3-4b-4bit", "-o", target, "--force").code == 0
    not_installed = run_cli(capsys, "export", "qwen3-4b-4bit", "--models-dir", tmp_path)
    assert not_installed.code == 2 and "gallery install qwen3-4b-4bit" in not_installed.err
    bad = run_cli(capsys, "export", "qwen3-4b-4bit", "--format", "ollama")
    assert bad.code == 2


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GALLERY_", "HF_ENDPOINT", "HF_TOKEN"))}
    env.update(extra)
    return env


def test_validate_through_a_real_subprocess(tmp_path: Path) -> None:
    ok = subprocess.run(
        [str(GALLERY), "validate", "--format", "json"],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["entries"] == 6

    index = copy_catalog(tmp_path / "catalog")
    replace_in(index, "- name: qwen3-4b-4bit\n", "- name: qwen3-4b-4bit\n  name: qwen3-4b-4bit\n")
    bad = subprocess.run(
        [str(GALLERY), "validate", "--format", "github"],
        capture_output=True,
        text=True,
        env=_subprocess_env(GALLERY_CATALOG=str(index)),
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 14
    assert bad.stdout.startswith("::error file=catalog/index.yaml,line=")
    assert "title=gallery validate%3A duplicate-key::qwen3-4b-4bit: duplicate key 'name'" in bad.stdout
    assert bad.stderr == ""


def test_install_through_a_real_subprocess(
    hub_factory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.catalog_support import TINY_REPO, make_tiny_repo

    hub = hub_factory(extra_repos={TINY_REPO: make_tiny_repo(tmp_path / "repo")})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    index = tmp_path / "catalog" / "index.yaml"
    assert run_cli(capsys, "add", TINY_REPO, "--catalog", index).code == 0
    env = _subprocess_env(
        HF_ENDPOINT=hub.url, GALLERY_CATALOG=str(index), GALLERY_MODELS_DIR=str(tmp_path / "m")
    )
    first = subprocess.run(
        [str(GALLERY), "install", "tiny-qwen3"], capture_output=True, text=True, env=env, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "m" / "tiny-qwen3.yaml").is_file()
    assert "downloading 5 file(s)" in first.stderr and "tiny-qwen3: installed" in first.stderr
    second = subprocess.run(
        [str(GALLERY), "install", "tiny-qwen3"], capture_output=True, text=True, env=env, timeout=120
    )
    assert second.returncode == 0 and "already installed" in second.stderr


def test_pre_commit_hook_definition() -> None:
    hooks = yaml.safe_load((BUNDLED.parent / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "gallery-validate")
    assert hook["entry"].split()[:2] == ["gallery", "validate"]
    assert hook["language"] == "python"


def test_validate_needs_neither_mlx_nor_the_network() -> None:
    code = (
        "import sys\nfrom cli.app import main\nrc = main(['validate', '--format', 'json'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('mlx', 'mlx_lm', 'mlx_vlm', 'huggingface_hub', 'httpx', 'httpx2'))\n"
        "print(rc, loaded, file=sys.stderr)\n"
    )
    env = _subprocess_env(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.stderr.strip() == "0 []", result.stderr
