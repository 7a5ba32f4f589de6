"""The one models store: `gallery pull`/`install` into the standard Hugging Face cache through huggingface_hub,
sha256-verified; found again without network, offline from a complete cache, resumable after a killed
process, a full disk reported as a full disk; `rm` and `ls`; the user's catalog is where `add` and `pull`
write, with the maintainer's comments kept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catalog.index import bundled_catalog_path, load_catalog, user_catalog_path
from fixtures.hubserver import RecordedHub
from tests.catalog_support import TINY_REPO, copy_catalog, make_tiny_repo, replace_in, run_cli

NAME = "tiny-qwen3"
FILES = ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]


@pytest.fixture
def tiny(hub_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RecordedHub:  # type: ignore[no-untyped-def]
    """A hub serving the tiny repo; an empty HF cache and user catalog of this test's own."""
    hub = hub_factory(extra_repos={TINY_REPO: make_tiny_repo(tmp_path / "tiny-repo")})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("GALLERY_HOME", str(tmp_path / "gallery-home"))
    monkeypatch.setenv("GALLERY_HTTP_ATTEMPTS", "2")
    monkeypatch.setenv("GALLERY_HTTP_BACKOFF", "0")
    monkeypatch.delenv("GALLERY_MODELS_DIR", raising=False)
    monkeypatch.delenv("GALLERY_CATALOG", raising=False)
    return hub


def _snapshot(tmp_path: Path, hub: RecordedHub) -> Path:
    return tmp_path / "hf-cache" / "models--test-org--tiny-qwen3" / "snapshots" / hub.commit_of(TINY_REPO)


def _repo_bytes(tmp_path: Path, name: str) -> bytes:
    return (tmp_path / "tiny-repo" / name).read_bytes()


def _env(tmp_path: Path, hub: RecordedHub, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GALLERY_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_CACHE=str(tmp_path / "hf-cache"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        GALLERY_HOME=str(tmp_path / "gallery-home"),
        GALLERY_HTTP_BACKOFF="0",
        **extra,
    )
    return env


def test_pull_a_repo_installs_into_the_hf_cache(tiny: RecordedHub, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    result = run_cli(capsys, "pull", TINY_REPO, "--json")
    assert result.code == 0, result.err
    report = result.json()
    # `pull` imported the repo first, which may have cached small files at the pinned commit already
    assert report["store"] == "hf-cache" and "model.safetensors" in report["downloaded"]
    assert sorted(report["downloaded"] + report["verified"]) == FILES
    snapshot = _snapshot(tmp_path, tiny)
    assert report["folder"] == str(snapshot)
    for name in FILES:
        assert (snapshot / name).read_bytes() == _repo_bytes(tmp_path, name)
    # pull imported the repo into the user's catalog (never the bundled one) and named the next step
    assert load_catalog(user_catalog_path()).get(NAME).config.mlx.source.repo == TINY_REPO
    assert "gallery chat tiny-qwen3" in result.err

    tiny.reset_stats()
    again = run_cli(capsys, "pull", TINY_REPO, "--json")
    assert again.code == 0, again.err
    assert again.json()["downloaded"] == [] and sorted(again.json()["verified"]) == FILES
    assert tiny.requests == []  # already in the catalog and in the cache: no network at all
    assert "already installed" in again.err


def test_install_reuses_what_hf_download_put_in_the_cache_offline(
    tiny: RecordedHub, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    """Every file already in the cache (by `hf download`): an offline install works and downloads nothing."""
    from huggingface_hub import snapshot_download

    assert run_cli(capsys, "add", TINY_REPO).code == 0
    snapshot_download(
        TINY_REPO, revision=tiny.commit_of(TINY_REPO), cache_dir=tmp_path / "hf-cache", endpoint=tiny.url
    )
    tiny.reset_stats()
    done = subprocess.run(
        [sys.executable, "-m", "cli", "install", NAME, "--json"],
        env=_env(tmp_path, tiny, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["downloaded"] == [] and tiny.requests == []
    listed = run_cli(capsys, "ls", "--json").json()
    assert [(r["name"], r["where"]) for r in listed] == [(NAME, str(_snapshot(tmp_path, tiny)))]


def test_a_corrupt_cached_file_is_fetched_again_and_a_bad_pin_is_removed(
    tiny: RecordedHub, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    assert run_cli(capsys, "pull", TINY_REPO).code == 0
    weights = _snapshot(tmp_path, tiny) / "model.safetensors"
    blob = weights.resolve()
    os.chmod(blob, 0o644)
    blob.write_bytes(b"corrupted")
    again = run_cli(capsys, "install", NAME, "--json")
    assert again.code == 0, again.err
    assert again.json()["downloaded"] == ["model.safetensors"]
    assert weights.read_bytes() == _repo_bytes(tmp_path, "model.safetensors")

    index = user_catalog_path()
    good = next(f.sha256 for f in load_catalog(index).get(NAME).meta.files if f.filename == "config.json")
    replace_in(index, f"sha256: {good}", f"sha256: {'ab' * 32}")
    (_snapshot(tmp_path, tiny) / "config.json").unlink()
    bad = run_cli(capsys, "install", NAME)
    assert bad.code == 16 and "config.json" in bad.err and "was removed" in bad.err
    assert not (_snapshot(tmp_path, tiny) / "config.json").exists()


def test_a_killed_install_leaves_a_partial_file_that_the_next_install_removes(
    hub_factory, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    hub = hub_factory(extra_repos={TINY_REPO: make_tiny_repo(tmp_path / "tiny-repo")})
    for key, value in _env(tmp_path, hub).items():
        if key.startswith(("HF_", "GALLERY_")):
            monkeypatch.setenv(key, value)
    assert run_cli(capsys, "add", TINY_REPO).code == 0
    hub.latency = 1.5  # every request waits: the download's partial file exists while its GET is pending
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "install", NAME],
        env=_env(tmp_path, hub),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    blobs = tmp_path / "hf-cache" / "models--test-org--tiny-qwen3" / "blobs"
    try:
        deadline = time.monotonic() + 120
        while not list(blobs.glob("*.incomplete")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(blobs.glob("*.incomplete")), "the install never started a download"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    partials = [p.name for p in blobs.glob("*.incomplete")]
    assert partials  # what SIGKILL leaves behind: huggingface_hub never got to delete it
    hub.latency = 0
    rerun = run_cli(capsys, "install", NAME, "--json")
    assert rerun.code == 0, rerun.err
    assert set(partials) <= set(rerun.json()["removed_partials"])
    assert not list(blobs.glob("*.incomplete"))
    assert (_snapshot(tmp_path, hub) / "model.safetensors").read_bytes() == _repo_bytes(
        tmp_path, "model.safetensors"
    )


def _can_mount_private_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp",
        ],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_private_tmpfs(), reason="needs unshare and a private tmpfs mount")
def test_a_full_disk_is_write_failed_not_network(tiny: RecordedHub, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A real ENOSPC: the HF cache on a 512 KiB tmpfs (private to the process), the weights 2 MB."""
    assert run_cli(capsys, "add", TINY_REPO).code == 0
    cache = tmp_path / "hf-cache"
    cache.mkdir(exist_ok=True)
    script = f'mount -t tmpfs -o size=512k tmpfs "{cache}" && exec "$0" -m cli install {NAME}'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, sys.executable],
        env=_env(tmp_path, tiny),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 18, done.stderr
    assert "No space left on device" in done.stderr and "network" not in done.stderr.lower()
    errors = [line for line in done.stderr.splitlines() if line.startswith("gallery: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert all(
        line.startswith("gallery: ") for line in done.stderr.splitlines()
    )  # warnings one line each too


def test_rm_asks_then_removes_and_ls_follows(tiny: RecordedHub, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert run_cli(capsys, "pull", TINY_REPO).code == 0
    assert [r["name"] for r in run_cli(capsys, "ls", "--json").json()] == [NAME]
    refused = run_cli(capsys, "rm", NAME)  # not a terminal, no --yes: nothing is deleted
    assert refused.code == 2 and "--yes" in refused.err
    assert _snapshot(tmp_path, tiny).is_dir()
    removed = run_cli(capsys, "rm", NAME, "--yes")
    assert removed.code == 0, removed.err
    assert not (tmp_path / "hf-cache" / "models--test-org--tiny-qwen3").exists()
    assert run_cli(capsys, "ls", "--json").json() == []
    assert run_cli(capsys, "rm", NAME, "--yes").code == 2  # not installed any more
    assert load_catalog(user_catalog_path()).get(NAME)  # the entry stays: `gallery pull` brings it back

    models = tmp_path / "models"
    assert run_cli(capsys, "pull", NAME, "--models-dir", models).code == 0
    assert (models / f"{NAME}.yaml").is_file()
    assert [r["store"] for r in run_cli(capsys, "ls", "--models-dir", models, "--json").json()] == [
        "models-dir"
    ]
    assert run_cli(capsys, "rm", NAME, "--models-dir", models, "-y").code == 0
    assert not (models / NAME).exists() and not (models / f"{NAME}.yaml").exists()


def test_add_writes_the_user_catalog_and_keeps_a_maintainers_comments(
    tiny: RecordedHub, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    bundled_before = bundled_catalog_path().read_bytes()
    assert run_cli(capsys, "add", TINY_REPO).code == 0
    assert bundled_catalog_path().read_bytes() == bundled_before  # never the package's own catalog
    index = user_catalog_path()
    assert load_catalog(index).names() == [NAME]

    # A maintainer's catalog with comments and its own key order; add and refresh --write keep both.
    maintained = copy_catalog(tmp_path / "maintained")
    text = maintained.read_text()
    text = text.replace(
        "- name: qwen3-4b-4bit\n", "# Qwen3: keep in sync with the blog post\n- name: qwen3-4b-4bit\n"
    )
    text = text.replace("  license: apache-2.0\n", "  license: apache-2.0  # checked by legal\n", 1)
    maintained.write_text(text)
    assert run_cli(capsys, "add", TINY_REPO, "--name", "tiny", "--catalog", maintained).code == 0
    after = maintained.read_text()
    assert "# Qwen3: keep in sync with the blog post\n- name: qwen3-4b-4bit\n" in after
    assert "license: apache-2.0  # checked by legal" in after
    assert after.startswith(text)  # everything before is byte for byte the same; the entry is appended
    assert load_catalog(maintained).names()[-1] == "tiny"

    tiny.write_file(TINY_REPO, "generation_config.json", b'{"eos_token_id": 151645}')
    refreshed = run_cli(capsys, "refresh", "tiny", "--write", "--catalog", maintained)
    assert refreshed.code == 15, refreshed.out + refreshed.err
    rewritten = maintained.read_text()
    assert "# Qwen3: keep in sync with the blog post" in rewritten and "# checked by legal" in rewritten
    assert load_catalog(maintained).get("tiny").config.mlx.source.revision == tiny.commit_of(TINY_REPO)
    assert run_cli(capsys, "validate", maintained).code == 0
