"""The whole job in real processes: a model repo on the loopback hub -> `gallery add` -> `gallery install`
(sha256-checked) -> `gallery run NAME` answers from the installed weights, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.models import fixture_info

pytestmark = pytest.mark.mlx
ROOT = Path(__file__).resolve().parent.parent


def test_add_install_run(hub_factory, scripted_text_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    shutil.copytree(scripted_text_model, repo, ignore=shutil.ignore_patterns("fixture.json", ".*"))
    hub = hub_factory(extra_repos={"test-org/scripted-text": repo})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GALLERY_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        GALLERY_CATALOG=str(tmp_path / "catalog" / "index.yaml"),
        GALLERY_MODELS_DIR=str(tmp_path / "models"),
    )

    def gallery(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            cwd=ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )

    added = gallery("add", "test-org/scripted-text")
    assert added.returncode == 0, added.stderr
    assert gallery("validate").returncode == 0
    installed = gallery("install", "scripted-text")
    assert installed.returncode == 0, installed.stderr
    assert (tmp_path / "models" / "scripted-text.yaml").is_file()
    weights = tmp_path / "models" / "scripted-text" / "model.safetensors"
    assert weights.read_bytes() == (repo / "model.safetensors").read_bytes()
    ran = gallery("run", "scripted-text", "--prompt", "hi", HF_HUB_OFFLINE="1")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == fixture_info(scripted_text_model)["answer"]
    # From another folder, with the models dir given on the command line rather than in the environment.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env.pop("GALLERY_MODELS_DIR")
    moved = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "run",
            "scripted-text",
            "-p",
            "hi",
            "--models-dir",
            str(tmp_path / "models"),
        ],
        cwd=elsewhere,
        env={**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.strip() == fixture_info(scripted_text_model)["answer"]
    assert "Traceback" not in ran.stderr + installed.stderr + added.stderr
