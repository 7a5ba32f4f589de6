"""Issue 22: a catalog LocalAI installs from. `catalog/localai-gallery.yaml` gives every entry's files a folder of
its own (`NAME/<file>`) and points `parameters.model` there, so no two entries share a path in LocalAI's models
folder, and the runtime loads the downloaded, sha256-checked files at the pinned revision.

LocalAI itself is not here: `localai_install` does what LocalAI's gallery documents for an install — download
each entry's `files` by `filename` into the models folder (checking `sha256`), then write `config_file` beside
them as `<name>.yaml` — against the loopback hub (the only rewrite: huggingface.co → the hub's address)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml

from catalog.export import LOCALAI_GALLERY_FILE, localai_gallery_data, localai_gallery_text
from catalog.index import bundled_catalog_path, load_catalog
from fixtures.hubserver import RecordedHub
from runtime.proto import backend_pb2 as pb
from tests.interfaces_support import GrpcProcess, runtime_env
from tests.plugins.models import fixture_info

ROOT = Path(__file__).resolve().parent.parent
REPO = "test-org/scripted-text"


def localai_install(entry: dict[str, Any], models: Path, hub_url: str) -> Path:
    """LocalAI's documented gallery install: files by `filename` into the models folder, sha256-checked, then
    the config written beside them. Returns the config's path."""
    for file in entry.get("files", []):
        relative = PurePosixPath(file["filename"])
        assert (
            not relative.is_absolute() and ".." not in relative.parts
        )  # LocalAI refuses paths out of models/
        target = models / relative
        url = file["uri"].replace("https://huggingface.co", hub_url)
        body = httpx.get(url, follow_redirects=True, timeout=30).raise_for_status().content
        assert hashlib.sha256(body).hexdigest() == file["sha256"], file["filename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    config = models / f"{entry['name']}.yaml"
    config.write_text(yaml.safe_dump({**entry["config_file"], "name": entry["name"]}))
    return config


def _paths(entries: list[dict[str, Any]]) -> list[str]:
    return [f["filename"] for e in entries for f in e["files"]] + [f"{e['name']}.yaml" for e in entries]


def test_the_bundled_gallery_is_current_and_collision_free() -> None:
    entries = load_catalog(bundled_catalog_path()).entries
    committed = (bundled_catalog_path().parent / LOCALAI_GALLERY_FILE).read_text(encoding="utf-8")
    assert committed == localai_gallery_text(entries)  # regenerate: python -m fixtures.catalog_seed
    gallery = yaml.safe_load(committed)
    paths = _paths(gallery)
    assert len(paths) == len(set(paths)) and len(gallery) == len(entries) >= 2
    for item in gallery:
        assert item["config_file"]["parameters"]["model"] == item["name"]
        assert all(f["filename"].startswith(item["name"] + "/") for f in item["files"])
        assert any(o.startswith("revision:") for o in item["config_file"]["options"])
    # The flat index (what LocalAI would have done with it) does collide: the reason this file exists.
    flat = [f.filename for e in entries for f in e.meta.files]
    assert len(flat) != len(set(flat))


@pytest.fixture
def installed(scripted_text_model: Path, tmp_path: Path) -> Any:
    repo = tmp_path / "repo"
    shutil.copytree(scripted_text_model, repo)
    (repo / "_info.json").write_text(
        json.dumps(
            {"pipeline_tag": "text-generation", "library_name": "mlx", "tags": ["mlx"], "gated": False}
        )
    )
    catalog = tmp_path / "catalog" / "index.yaml"
    with RecordedHub(extra_repos={REPO: repo}) as hub:
        env = runtime_env(
            HF_HUB_OFFLINE="0",
            HF_ENDPOINT=hub.url,
            HF_HUB_CACHE=str(tmp_path / "hf-add"),
            GALLERY_HTTP_BACKOFF="0",
        )
        for name in ("scripted-a", "scripted-b"):  # two entries with the same file names
            done = subprocess.run(
                [sys.executable, "-m", "cli", "add", REPO, "--name", name, "--catalog", str(catalog)],
                capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        gallery = localai_gallery_data(load_catalog(catalog).entries)
        models = tmp_path / "models"
        for entry in gallery:
            localai_install(entry, models, hub.url)
        yield gallery, models, catalog, hub.commit_of(REPO)


def test_a_localai_style_install_loads_the_pinned_files_offline(
    installed: Any, tmp_path: Path, scripted_text_model: Path
) -> None:
    gallery, models, catalog, commit = installed
    assert len({f for e in gallery for f in _paths([e])}) == len(_paths(gallery))  # nothing overwritten
    assert sorted(p.name for p in models.iterdir()) == [
        "scripted-a",
        "scripted-a.yaml",
        "scripted-b",
        "scripted-b.yaml",
    ]
    # The runtime as LocalAI starts it: offline, an empty HF cache; LoadModel with the YAML's model and options.
    env = runtime_env(HF_HUB_CACHE=str(tmp_path / "empty-cache"), GALLERY_CATALOG=str(catalog))
    process = GrpcProcess(env=env)
    try:
        config = yaml.safe_load((models / "scripted-b.yaml").read_text())
        assert f"revision:{commit}" in config["options"]
        request = pb.ModelOptions(
            Model=config["parameters"]["model"], ModelPath=str(models), Options=config["options"]
        )
        loaded = process.stub.LoadModel(request, timeout=120)
        assert loaded.success and "scripted-b" in loaded.message, loaded.message
        text = "".join(
            r.message.decode() for r in process.stub.PredictStream(pb.PredictOptions(Prompt="hi", Tokens=64))
        )
        assert text == fixture_info(scripted_text_model)["answer"]
        bogus = pb.ModelOptions(Model="scripted-b", ModelPath=str(models), Options=["revision:" + "1" * 40])
        refused = process.stub.LoadModel(bogus, timeout=120)
        assert not refused.success and "1" * 40 in refused.message, refused.message
    finally:
        process.close()
