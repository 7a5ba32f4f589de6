"""`gallery add` + `gallery install` against the recorded hub: real downloads through huggingface_hub into
real folders, sha256 verification, idempotence, resumption after an interrupted run, and gated repos."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from catalog.index import load_catalog
from fixtures.hubserver import RecordedHub
from tests.catalog_support import TINY_REPO, copy_catalog, make_tiny_repo, replace_in, run_cli

NAME = "tiny-qwen3"
FILES = ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]


@pytest.fixture
def tiny_hub(hub_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RecordedHub:  # type: ignore[no-untyped-def]
    """A recorded hub that also serves a small installable repo, as HF_ENDPOINT, with fast retries."""
    hub = hub_factory(extra_repos={TINY_REPO: make_tiny_repo(tmp_path / "tiny-repo")})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("GALLERY_HTTP_ATTEMPTS", "2")
    monkeypatch.setenv("GALLERY_HTTP_BACKOFF", "0")
    monkeypatch.delenv("GALLERY_MODELS_DIR", raising=False)
    return hub


@pytest.fixture
def catalog(tiny_hub: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A new catalog holding the tiny repo, added with `gallery add`."""
    index = tmp_path / "catalog" / "index.yaml"
    result = run_cli(capsys, "add", TINY_REPO, "--catalog", index)
    assert result.code == 0, result.err
    return index


def _repo_bytes(tmp_path: Path, name: str) -> bytes:
    """A file of the tiny repo as served (the fixture builds it in tmp_path/tiny-repo)."""
    return (tmp_path / "tiny-repo" / name).read_bytes()


def _resolve_requests(hub: RecordedHub) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in hub.requests if "/resolve/" in r.path]


def test_add_builds_a_fully_hashed_entry(
    catalog: Path, tiny_hub: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = load_catalog(catalog).get(NAME)
    assert [f.filename for f in entry.meta.files] == FILES
    commit = tiny_hub.commit_of(TINY_REPO)
    for file in entry.meta.files:
        assert file.sha256 == hashlib.sha256(_repo_bytes(tmp_path, file.filename)).hexdigest()
        assert file.uri == f"https://huggingface.co/{TINY_REPO}/resolve/{commit}/{file.filename}"
    assert (catalog.parent / "entries" / f"{NAME}.yaml").is_file()
    assert run_cli(capsys, "validate", catalog).code == 0


def test_install_verifies_and_writes_the_config(
    catalog: Path, tiny_hub: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    result = run_cli(capsys, "install", NAME, "--models-dir", models, "--catalog", catalog, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert sorted(report["downloaded"]) == FILES and report["config_written"]
    folder = models / NAME
    for name in FILES:
        assert (folder / name).read_bytes() == _repo_bytes(tmp_path, name)
    config = yaml.safe_load((models / f"{NAME}.yaml").read_text())
    assert config["parameters"]["model"] == str(folder.resolve())
    assert config["mlx"]["source"]["revision"] == tiny_hub.commit_of(TINY_REPO)
    assert (models / f"{NAME}.yaml").stat().st_mode & 0o777 == 0o644


def test_second_install_only_reverifies(
    catalog: Path, tiny_hub: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    assert run_cli(capsys, "install", NAME, "--models-dir", models, "--catalog", catalog).code == 0
    config_file = models / f"{NAME}.yaml"
    stamp = config_file.stat().st_mtime_ns
    tiny_hub.reset_stats()
    again = run_cli(capsys, "install", NAME, "--models-dir", models, "--catalog", catalog, "--json")
    assert again.code == 0, again.err
    assert again.json()["downloaded"] == [] and sorted(again.json()["verified"]) == FILES
    assert not again.json()["config_written"]
    assert tiny_hub.requests == []  # no network at all
    assert config_file.stat().st_mtime_ns == stamp
    assert "already installed" in again.err


def test_hash_mismatch_removes_the_file_and_writes_no_config(
    catalog: Path, tiny_hub: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = load_catalog(catalog).get(NAME)
    good = next(f.sha256 for f in entry.meta.files if f.filename == "config.json")
    replace_in(
        catalog, f"sha256: {good}", f"sha256: {'ab' * 32}"
    )  # a small git file: only a download can tell
    assert run_cli(capsys, "validate", catalog).code == 0
    models = tmp_path / "models"
    result = run_cli(capsys, "install", NAME, "--models-dir", models, "--catalog", catalog)
    assert result.code == 16, result.err
    assert "config.json" in result.err and "was removed" in result.err and "gallery refresh" in result.err
    assert not (models / NAME / "config.json").exists()
    assert not (models / f"{NAME}.yaml").exists()
    assert (models / NAME / "README.md").is_file()  # files before it verified and stay


def test_corrupt_local_file_is_fetched_again(
    catalog: Path, tiny_hub: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    assert run_cli(capsys, "install", NAME, "--models-dir", models, "--catalog", catalog).code == 0
    weights = models / NAME / "model.safetensors"
    weights.write_bytes(b"corrupted")
    tiny_hub.reset_stats()
    result = run_cli(capsys, "install", NAME, "--models-dir", models, "--catalog", catalog, "--json")
    assert result.code == 0, result.err
    assert result.json()["downloaded"] == ["model.safetensors"]
    assert weights.read_bytes() == _repo_bytes(tmp_path, "model.safetensors")
    assert set(_resolve_requests(tiny_hub)) == {"model.safetensors"}


def test_interrupted_install_then_successful_rerun(
    catalog: Path, tiny_hub: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    tiny_hub.inject(r"/resolve/[0-9a-f]{40}/model\.safetensors$", status=500, count=20, method="GET")
    failed = run_cli(capsys, "install", NAME, "--models-dir", models, "--catalog", catalog)
    assert failed.code == 7, failed.err
    assert "HTTP 500" in failed.err
    assert not (models / f"{NAME}.yaml").exists()
    assert not (models / NAME / "model.safetensors").exists()
    done_before = [name for name in FILES if (models / NAME / name).is_file()]
    assert done_before == [name for name in FILES if name != "model.safetensors"]  # fetched side by side

    tiny_hub.clear_injections()
    tiny_hub.reset_stats()
    result = run_cli(capsys, "install", NAME, "--models-dir", models, "--catalog", catalog, "--json")
    assert result.code == 0, result.err
    assert sorted(result.json()["verified"]) == done_before
    assert sorted(result.json()["downloaded"]) == ["model.safetensors"]
    assert not set(_resolve_requests(tiny_hub)) & set(done_before)  # verified files are not fetched again
    assert (models / f"{NAME}.yaml").is_file()


def test_transient_errors_are_retried(
    catalog: Path, tiny_hub: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_hub.inject(r"/resolve/[0-9a-f]{40}/model\.safetensors$", status=503, count=1, method="GET")
    result = run_cli(capsys, "install", NAME, "--models-dir", tmp_path / "models", "--catalog", catalog)
    assert result.code == 0, result.err


def test_gated_repo_says_how_to_authenticate(
    hub_factory,  # type: ignore[no-untyped-def]
    hub_token: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = make_tiny_repo(tmp_path / "gated-repo")
    info = json.loads((repo / "_info.json").read_text())
    (repo / "_info.json").write_text(json.dumps({**info, "gated": "manual"}))
    hub = hub_factory(extra_repos={"test-org/gated-tiny": repo})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("GALLERY_HTTP_BACKOFF", "0")
    index = tmp_path / "catalog" / "index.yaml"
    monkeypatch.setenv("HF_TOKEN", hub_token)  # the maintainer who added it had access
    assert run_cli(capsys, "add", "test-org/gated-tiny", "--catalog", index).code == 0
    monkeypatch.delenv("HF_TOKEN")
    models = tmp_path / "models"
    result = run_cli(capsys, "install", "gated-tiny", "--models-dir", models, "--catalog", index)
    assert result.code == 4, result.err
    assert "test-org/gated-tiny is gated" in result.err
    assert "HF_TOKEN" in result.err and "hf auth login" in result.err
    assert len(result.err.strip().splitlines()[-1]) < 300 and "Traceback" not in result.err
    assert not (models / "gated-tiny.yaml").exists()
    assert not (models / "gated-tiny").exists()  # nothing installed: no empty folder left


def test_entry_without_weights_is_refused_and_marked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pinned revision without weights (the recorded SmolLM3 metadata) cannot be installed: say why, mark it."""
    index = copy_catalog(tmp_path / "catalog")
    result = run_cli(capsys, "install", "smollm3-3b", "--catalog", index)
    assert result.code == 10, result.err
    assert "no .safetensors weights" in result.err and "nothing to run" in result.err
    assert result.err.count("\n") == 1
    listed = {row["name"]: row for row in run_cli(capsys, "catalog", "--catalog", index, "--json").json()}
    assert listed["smollm3-3b"]["weights"] is False and listed["qwen3-4b-4bit"]["weights"] is True


def test_install_refuses_an_invalid_entry_and_unknown_names(
    catalog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    unknown = run_cli(capsys, "install", "tiny", "--models-dir", models, "--catalog", catalog)
    assert unknown.code == 2 and "did you mean tiny-qwen3" in unknown.err
    replace_in(catalog, "  - filename: config.json", "  - filename: ../config.json")
    broken = run_cli(capsys, "install", NAME, "--models-dir", models, "--catalog", catalog)
    assert broken.code == 13 and "escapes its folder" in broken.err
    assert not models.exists()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert run_cli(capsys, "install", NAME, "--models-dir", not_a_dir, "--catalog", catalog).code in (2, 13)


def test_add_refuses_duplicates_and_broken_templates(
    catalog: Path, tiny_hub: RecordedHub, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = catalog.read_bytes()
    duplicate = run_cli(capsys, "add", TINY_REPO, "--catalog", catalog)
    assert duplicate.code == 11 and "already has an entry named 'tiny-qwen3'" in duplicate.err
    named = run_cli(
        capsys, "add", "mlx-community/Qwen3-4B-4bit", "--name", "tiny-qwen3", "--catalog", catalog
    )
    assert named.code == 11
    assert catalog.read_bytes() == before

    no_template = run_cli(capsys, "add", "google/gemma-4-E4B-it", "--catalog", catalog)
    assert no_template.code == 14 and "--accept-missing-template" in no_template.err
    assert catalog.read_bytes() == before
    accepted = run_cli(
        capsys, "add", "google/gemma-4-E4B-it", "--accept-missing-template", "--catalog", catalog
    )
    assert accepted.code == 0, accepted.err
    assert run_cli(capsys, "validate", catalog).code == 0
    assert load_catalog(catalog).get("gemma-4-e4b-it").config.mlx.chat_template.accept_missing

    monkeypatch.delenv("HF_TOKEN", raising=False)
    gated = run_cli(capsys, "add", "meta-llama/Llama-3.2-3B-Instruct", "--catalog", catalog)
    assert gated.code == 4 and "HF_TOKEN" in gated.err
    local = run_cli(capsys, "add", str(catalog.parent), "--catalog", catalog)
    assert local.code in (2, 9)


def test_add_inline_config(tiny_hub: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "inline" / "index.yaml"
    assert run_cli(capsys, "add", TINY_REPO, "--inline", "--name", "tiny", "--catalog", index).code == 0
    assert not (index.parent / "entries").exists()
    entry = load_catalog(index).get("tiny")
    assert entry.config_ref is None and entry.config.name == "tiny"
    assert run_cli(capsys, "validate", index).code == 0
    result = run_cli(capsys, "install", "tiny", "--models-dir", tmp_path / "models", "--catalog", index)
    assert result.code == 0, result.err


def test_runtime_lookup_prefers_the_installed_config(
    catalog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from catalog.resolve import find_entry

    models = tmp_path / "models"
    monkeypatch.setenv("GALLERY_MODELS_DIR", str(models))
    found = find_entry(NAME, catalog=str(catalog))
    assert found is not None and found.kind == "entry"
    assert found.config.parameters.model == TINY_REPO and found.base == catalog.parent
    assert run_cli(capsys, "install", NAME, "--catalog", catalog).code == 0  # models dir from the environment
    found = find_entry(NAME, catalog=str(catalog))
    assert found is not None and found.kind == "installed"
    assert found.config.parameters.model == str((models / NAME).resolve()) and found.base == models.resolve()
    assert find_entry("org/repo", catalog=str(catalog)) is None
    assert find_entry("not-an-entry", catalog=str(catalog)) is None


def test_add_refuses_a_template_that_drops_text_and_a_file_the_hub_cannot_serve(
    catalog: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = catalog.read_bytes()
    # llava-1.5's processor template renders only list-of-parts content: a plain string message vanishes.
    llava = run_cli(capsys, "add", "llava-hf/llava-1.5-7b-hf", "--catalog", catalog)
    assert llava.code == 14 and "lacks the user's message" in llava.err
    missing = run_cli(capsys, "add", "broken/missing-file", "--catalog", catalog)
    assert missing.code == 3 and "HTTP 404" in missing.err and missing.err.count("\n") == 1
    assert catalog.read_bytes() == before
    assert sorted(p.name for p in (catalog.parent / "entries").iterdir()) == [f"{NAME}.yaml"]
