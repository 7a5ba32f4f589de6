"""A documented drafter is suggested at import, pinned with `--drafter` after its own files verify, and fetched and
sha256-checked by `pull` with the model, through the same code path (a bad hash removes the file, exit 16).

The loopback hub serves the tiny qwen3_5 target (`vlm-qwen35-mtp`) as `test-org/Qwen3.5-4B-tiny` and the tiny
DFlash drafter as `z-lab/Qwen3.5-4B-DFlash` — the drafter importers/drafters.yaml documents for Qwen3.5-4B — with
real bytes, so the pairing data, the Hub reads and the downloads are all real; only the names are borrowed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures.hubserver import RecordedHub

TARGET = "test-org/Qwen3.5-4B-tiny"
DRAFTER = "z-lab/Qwen3.5-4B-DFlash"


def _repo(source: Path, folder: Path, tag: str) -> Path:
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".*", "fixture.json"))
    info = {"pipeline_tag": tag, "library_name": "mlx", "tags": ["mlx"], "gated": False}
    (folder / "_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


@pytest.fixture
def hub(
    hub_factory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mtp_vlm_model: Path,
    dflash_drafter_model: Path,
) -> RecordedHub:  # type: ignore[no-untyped-def]
    served = hub_factory(
        extra_repos={
            TARGET: _repo(mtp_vlm_model, tmp_path / "target", "image-text-to-text"),
            DRAFTER: _repo(dflash_drafter_model, tmp_path / "drafter", "text-generation"),
        }
    )
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("GALLERY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GALLERY_HTTP_ATTEMPTS", "2")
    monkeypatch.setenv("GALLERY_HTTP_BACKOFF", "0")
    return served


def test_import_suggests_then_pins_and_pull_fetches_and_verifies_the_drafter(
    hub: RecordedHub, tmp_path: Path
) -> None:
    from catalog.build import entry_from_config, hash_files
    from catalog.index import install_files
    from catalog.install import install_entry
    from importers import import_model

    suggested = import_model(TARGET).config
    assert suggested.mlx.drafter is None
    decision = suggested.mlx.decisions["drafter"]
    assert decision.value.startswith("suggested") and DRAFTER in decision.value
    assert (
        decision.evidence[0].source == "importers/drafters.yaml"
        and "mlx-vlm 0.7.10 README" in decision.evidence[0].detail
    )

    config = import_model(TARGET, drafter=True).config
    pin = config.mlx.drafter
    assert (
        pin is not None and pin.repo == DRAFTER and pin.kind == "dflash" and pin.model_type == "qwen3_dflash"
    )
    assert pin.revision == hub.commit_of(DRAFTER)
    assert {f.path for f in pin.files} == {"config.json", "model.safetensors"} and all(
        f.sha256 for f in pin.files
    )
    assert "decisive" in {e.strength for e in config.mlx.decisions["drafter"].evidence}

    entry = entry_from_config(config, hash_files(config, install_files(config)))
    result = install_entry(entry, progress=lambda message: None)
    assert "drafter/model.safetensors" in result.downloaded
    folder = tmp_path / "hf-cache" / "models--z-lab--Qwen3.5-4B-DFlash" / "snapshots" / pin.revision
    source = tmp_path / "drafter"
    assert (folder / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    again = install_entry(entry, progress=lambda message: None)
    assert again.downloaded == [] and "drafter/model.safetensors" in again.verified

    # Into a models folder: the drafter lands beside the model, and the written config points at it.
    models = tmp_path / "models"
    local = install_entry(entry, models, progress=lambda message: None)
    assert (models / config.name / "drafter" / "model.safetensors").is_file()
    from gallery.configfile import read_config

    installed = read_config(models / f"{config.name}.yaml")
    assert installed.mlx.drafter is not None and installed.mlx.drafter.local_path == str(
        (models / config.name / "drafter").resolve()
    )
    assert local.config_written


def test_a_drafter_file_that_fails_its_hash_is_removed_and_the_pull_fails_16(
    hub: RecordedHub, tmp_path: Path
) -> None:
    from catalog.build import entry_from_config, hash_files
    from catalog.index import install_files
    from catalog.install import install_entry
    from gallery.errors import HashMismatch
    from importers import import_model

    config = import_model(TARGET, drafter=True).config
    assert config.mlx.drafter is not None
    files = [
        f.model_copy(update={"sha256": "0" * 64}) if f.path == "model.safetensors" else f
        for f in config.mlx.drafter.files
    ]
    config.mlx.drafter = config.mlx.drafter.model_copy(update={"files": files})
    entry = entry_from_config(config, hash_files(config, install_files(config)))
    models = tmp_path / "models"
    with pytest.raises(HashMismatch) as refused:
        install_entry(entry, models, progress=lambda message: None)
    assert refused.value.exit_code == 16 and "model.safetensors" in str(refused.value)
    assert not (models / config.name / "drafter" / "model.safetensors").exists()
    assert not (models / f"{config.name}.yaml").exists()  # no config pointing at half an install


@pytest.mark.mlx
def test_gallery_pull_drafter_installs_both_and_the_runtime_loads_the_drafter_from_the_cache(
    hub: RecordedHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from catalog.index import load_catalog, user_catalog_path
    from runtime.loader import load
    from tests.catalog_support import run_cli

    result = run_cli(capsys, "pull", TARGET, "--drafter", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert "drafter/model.safetensors" in report["downloaded"] and "model.safetensors" in report["downloaded"]
    entry = next(e for e in load_catalog(user_catalog_path()).entries if e.config.mlx.source.repo == TARGET)
    assert entry.config.mlx.drafter is not None and entry.config.mlx.drafter.repo == DRAFTER
    listed = run_cli(capsys, "ls", "--json")
    assert entry.name in listed.out
    loaded = load(entry.config)  # from the HF cache at both pinned commits, no download allowed
    assert (
        type(loaded.primary.draft_model).__name__ == "DFlashDraftModel"
        and loaded.primary.draft_kind == "dflash"
    )
    # Without the drafter's files the install is incomplete: `ls` no longer lists it, and the load names the drafter.
    pinned = tmp_path / "hf-cache" / "models--z-lab--Qwen3.5-4B-DFlash"
    shutil.rmtree(pinned)
    assert entry.name not in run_cli(capsys, "ls", "--json").out
    from gallery.errors import RuntimeFailure

    with pytest.raises(RuntimeFailure, match=r"the drafter: the weights of z-lab/Qwen3\.5-4B-DFlash"):
        load(entry.config)


def test_a_gemma4_model_pins_its_documented_assistant_drafter_with_kind_mtp(
    hub_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    audio_vlm_model: Path,
    gemma4_assistant_model: Path,
) -> None:
    """Gemma 4's `-assistant` pairing (the table in mlx-vlm's README), with the tiny gemma4 and assistant served
    under E2B's names; the assistant's config (gemma4_assistant, backbone_hidden_size) decides kind and fit."""
    from importers import import_model

    assistant = "mlx-community/gemma-4-E2B-it-assistant-bf16"
    served = hub_factory(
        extra_repos={
            "test-org/gemma-4-E2B-it-tiny": _repo(audio_vlm_model, tmp_path / "target", "image-text-to-text"),
            assistant: _repo(gemma4_assistant_model, tmp_path / "assistant", "text-generation"),
        }
    )
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    config = import_model("test-org/gemma-4-E2B-it-tiny", drafter=True).config
    pin = config.mlx.drafter
    assert pin is not None and pin.repo == assistant
    assert (pin.kind, pin.model_type) == ("mtp", "gemma4_assistant")
    assert "Supported pairings" in config.mlx.decisions["drafter"].evidence[0].detail
