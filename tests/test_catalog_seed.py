"""The shipped starter catalog is exactly what a fresh import from the recorded hub produces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catalog.index import load_catalog
from fixtures import catalog_seed
from fixtures.hubserver import RecordedHub
from tests.catalog_support import BUNDLED


def test_shipped_catalog_equals_a_fresh_import(hub_session: RecordedHub, hub_token: str) -> None:
    files = catalog_seed.generate(hub_session.url, hub_token)
    assert catalog_seed.differences(BUNDLED, files) == [], (
        "run `python -m fixtures.catalog_seed` to regenerate"
    )
    assert "HF_ENDPOINT" not in os.environ  # the seed restores the environment it changed


def test_seed_covers_the_required_repos() -> None:
    catalog = load_catalog(BUNDLED / "index.yaml")
    assert not catalog.problems
    repos = {entry.config.mlx.source.repo for entry in catalog.entries}
    assert repos == {
        "mlx-community/gemma-4-E4B-it-qat-4bit",
        "mlx-community/Qwen3-4B-4bit",
        "mlx-community/gemma-3-4b-it-text-4bit",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "meta-llama/Llama-3.2-3B-Instruct",
        "HuggingFaceTB/SmolLM3-3B",
    }
    for entry in catalog.entries:
        assert entry.meta.files and all(len(f.sha256) == 64 for f in entry.meta.files)
        assert entry.config.mlx.source.revision and len(entry.config.mlx.source.revision) == 40


def test_seed_check_mode_and_write(
    tmp_path: Path, hub_session: RecordedHub, hub_token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cat"
    assert (
        catalog_seed.main(["--out", str(out), "--endpoint", hub_session.url, "--token", hub_token, "--check"])
        == 1
    )
    assert catalog_seed.main(["--out", str(out), "--endpoint", hub_session.url, "--token", hub_token]) == 0
    (out / "entries" / "stale.yaml").write_text("name: stale\n")
    assert (
        catalog_seed.main(["--out", str(out), "--endpoint", hub_session.url, "--token", hub_token, "--check"])
        == 1
    )
    assert catalog_seed.main(["--out", str(out), "--endpoint", hub_session.url, "--token", hub_token]) == 0
    assert not (out / "entries" / "stale.yaml").exists()
    assert (out / "index.yaml").read_text() == (BUNDLED / "index.yaml").read_text()
    assert "file(s) differ" in capsys.readouterr().out
