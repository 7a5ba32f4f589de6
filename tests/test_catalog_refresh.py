"""`gallery refresh` against the recorded hub on loopback: no drift for the shipped pins, drift after the hub
changes a repo, `--write` re-pins atomically, and one failing entry does not stop the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catalog.index import load_catalog
from fixtures.hubserver import HUB_ROOT, RecordedHub
from tests.catalog_support import copy_catalog, run_cli

QWEN = "mlx-community/Qwen3-4B-4bit"


@pytest.fixture
def hub_env(hub: RecordedHub, hub_token: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RecordedHub:
    """The function-scoped hub as HF_ENDPOINT, with the token, fast retries and a private cache."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub_token)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("GALLERY_HTTP_ATTEMPTS", "2")
    monkeypatch.setenv("GALLERY_HTTP_BACKOFF", "0")
    return hub


def test_shipped_pins_have_no_drift(
    hub_env: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = copy_catalog(tmp_path / "catalog")
    before = index.read_bytes()
    result = run_cli(capsys, "refresh", "--catalog", index)
    assert result.code == 0, result.out + result.err
    assert result.out.count(": up-to-date") == 6
    assert "0 drifted, 6 up to date, 0 failed" in result.out
    assert index.read_bytes() == before


def test_drift_is_reported_then_written_then_gone(
    hub_env: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = copy_catalog(tmp_path / "catalog")
    old_commit = hub_env.commit_of(QWEN)
    generation = json.loads((HUB_ROOT / QWEN / "generation_config.json").read_text())
    generation["eos_token_id"] = [151645, 151643, 151644]  # adds <|im_start|>
    new_commit = hub_env.write_file(QWEN, "generation_config.json", json.dumps(generation, indent=2).encode())
    assert new_commit != old_commit

    report = run_cli(capsys, "refresh", "--catalog", index, "--json")
    assert report.code == 15, report.out + report.err
    outcomes = {e["name"]: e for e in report.json()["entries"]}
    qwen = outcomes["qwen3-4b-4bit"]
    assert qwen["status"] == "drifted"
    changes = "\n".join(qwen["changes"])
    assert f"new commit: {old_commit[:12]} → {new_commit[:12]}" in changes
    assert "file hash changed: generation_config.json" in changes
    assert "stop set:" in changes and "151644 '<|im_start|>'" in changes
    assert all(o["status"] == "up-to-date" for name, o in outcomes.items() if name != "qwen3-4b-4bit")
    assert load_catalog(index).get("qwen3-4b-4bit").config.mlx.source.revision == old_commit  # report only

    text = run_cli(capsys, "refresh", "qwen3-4b-4bit", "--catalog", index)
    assert text.code == 15 and "run with --write" in text.out and "qwen3-4b-4bit: drifted" in text.out

    written = run_cli(capsys, "refresh", "--write", "--catalog", index)
    assert written.code == 15, written.out + written.err  # drift existed when the run started
    assert "rewrote 1 entry" in written.out
    entry = load_catalog(index).get("qwen3-4b-4bit")
    assert entry.config.mlx.source.revision == new_commit
    assert 151644 in entry.config.mlx.stop_token_ids
    assert all(new_commit in f.uri for f in entry.meta.files)
    assert entry.meta.description.startswith("Qwen3 4B")  # curated fields survive

    again = run_cli(capsys, "refresh", "--catalog", index)
    assert again.code == 0, again.out
    assert run_cli(capsys, "validate", index).code == 0


def test_only_the_refreshed_entry_is_rewritten(
    hub_env: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = copy_catalog(tmp_path / "catalog")
    others = {p.name: p.read_bytes() for p in (index.parent / "entries").iterdir() if "qwen3" not in p.name}
    hub_env.write_file(QWEN, "README.md", b"---\nlibrary_name: mlx\n---\nchanged card\n")
    result = run_cli(capsys, "refresh", "--write", "--catalog", index)
    assert result.code == 15
    outcome = result.out.split("qwen3-4b-4bit: drifted", 1)[1]
    assert "file hash changed: README.md" in outcome
    assert "stop set" not in outcome.split("gemma-3", 1)[0]
    assert {
        p.name: p.read_bytes() for p in (index.parent / "entries").iterdir() if "qwen3" not in p.name
    } == others


def test_one_failing_entry_does_not_stop_the_others(
    hub_env: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = copy_catalog(tmp_path / "catalog")
    hub_env.inject(r"^/api/models/HuggingFaceTB/SmolLM3-3B", status=503, count=50)
    result = run_cli(capsys, "refresh", "--catalog", index, "--json")
    assert result.code == 7, result.out + result.err  # nothing drifted: the failure's exit code
    outcomes = {e["name"]: e for e in result.json()["entries"]}
    assert outcomes["smollm3-3b"]["status"] == "error" and outcomes["smollm3-3b"]["exit_code"] == 7
    assert sum(o["status"] == "up-to-date" for o in outcomes.values()) == 5

    # A drifted entry wins over the failure: exit 15.
    hub_env.write_file(QWEN, "README.md", b"changed\n")
    assert run_cli(capsys, "refresh", "--catalog", index).code == 15


def test_gated_entry_without_token_says_how_to_authenticate(
    hub_env: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    index = copy_catalog(tmp_path / "catalog")
    result = run_cli(capsys, "refresh", "llama-3.2-3b-instruct", "--catalog", index)
    assert result.code == 4, result.out
    assert "gated" in result.out and "HF_TOKEN" in result.out and "hf auth login" in result.out


def test_unknown_name_and_bad_jobs(
    hub_env: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = copy_catalog(tmp_path / "catalog")
    unknown = run_cli(capsys, "refresh", "qwen3", "--catalog", index)
    assert unknown.code == 2 and "did you mean qwen3-4b-4bit" in unknown.err
    assert run_cli(capsys, "refresh", "--jobs", "0", "--catalog", index).code == 2
    assert hub_env.requests == []


def test_write_refuses_a_broken_catalog(
    hub_env: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = copy_catalog(tmp_path / "catalog")
    text = index.read_text()
    index.write_text(text.replace("- name: smollm3-3b\n", "- name: smollm3-3b\n  name: again\n"))
    before = index.read_bytes()
    result = run_cli(capsys, "refresh", "--write", "--catalog", index)
    assert result.code == 13 and "duplicate key" in result.err
    assert index.read_bytes() == before


def test_offline_refresh_is_an_error_not_a_false_all_clear(
    hub_env: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    index = copy_catalog(tmp_path / "catalog")
    assert run_cli(capsys, "refresh", "qwen3-4b-4bit", "--catalog", index).code == 0  # fills the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli(capsys, "refresh", "qwen3-4b-4bit", "--catalog", index)
    assert result.code == 6, result.out
    assert "qwen3-4b-4bit: error (exit 6)" in result.out


def test_a_rewrite_refuses_when_another_writer_changed_the_index(tmp_path: Path) -> None:
    from catalog.index import write_catalog
    from gallery.errors import BadConfig

    index = copy_catalog(tmp_path / "catalog")
    catalog = load_catalog(index)
    index.write_text(index.read_text() + "\n")  # someone else wrote meanwhile
    changed = index.read_bytes()
    with pytest.raises(BadConfig, match="changed while this command ran"):
        write_catalog(index, catalog.entries, changed=set(), expect_fingerprint=catalog.fingerprint)
    assert index.read_bytes() == changed
