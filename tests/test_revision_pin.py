"""Issue 22: the pinned revision is honoured on every route — LoadModel's `revision:` option, a config's pin, a
catalog name, a repo id with `@REV` — loaded from the Hugging Face cache with the network off, and a revision
that cannot be had is refused by name. A real tiny MLX model is served by the loopback hub, pulled once, and
then the hub is left behind (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fixtures.hubserver import RecordedHub
from runtime.proto import backend_pb2 as pb
from tests.interfaces_support import GrpcProcess, runtime_env
from tests.plugins.models import fixture_info

ROOT = Path(__file__).resolve().parent.parent
REPO = "test-org/scripted-text"
BOGUS = "0" * 40


def _gallery(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


class Setup:
    """The pulled commit, the newer commit the hub moved to, and the environments to use."""

    def __init__(self, hub: RecordedHub, home: Path, cache: Path) -> None:
        self.hub = hub
        self.cache = cache
        self.pulled = hub.commit_of(REPO)
        self.online = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GALLERY_"))},
            "HF_ENDPOINT": hub.url,
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "GALLERY_HOME": str(home),
            "GALLERY_HTTP_BACKOFF": "0",
            "PYTHONPATH": str(ROOT),
        }
        self.offline = {**self.online, "HF_HUB_OFFLINE": "1"}
        self.newer = ""


@pytest.fixture(scope="module")
def setup(scripted_text_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("revision")
    repo = tmp / "repo"
    shutil.copytree(scripted_text_model, repo)
    (repo / "_info.json").write_text(
        json.dumps(
            {"pipeline_tag": "text-generation", "library_name": "mlx", "tags": ["mlx"], "gated": False}
        )
    )
    with RecordedHub(extra_repos={REPO: repo}) as hub:
        state = Setup(hub, tmp / "home", tmp / "hf-cache")
        pulled = _gallery(["pull", REPO], state.online)
        assert pulled.returncode == 0, pulled.stderr
        # The hub moves on: main is now a commit nobody downloaded.
        state.newer = hub.write_file(REPO, "README.md", b"# moved on\n")
        assert state.newer != state.pulled
        yield state


def test_load_model_revision_option_offline(setup: Setup, scripted_text_model: Path) -> None:
    process = GrpcProcess(env=runtime_env(**setup.offline))
    try:
        stub = process.stub
        bogus = stub.LoadModel(pb.ModelOptions(Model=REPO, Options=[f"revision:{BOGUS}"]), timeout=120)
        assert not bogus.success and BOGUS in bogus.message, bogus.message
        newer = setup.newer
        absent = stub.LoadModel(pb.ModelOptions(Model=REPO, Options=[f"revision:{newer}"]), timeout=120)
        assert not absent.success and newer in absent.message, absent.message
        real = stub.LoadModel(pb.ModelOptions(Model=REPO, Options=[f"revision:{setup.pulled}"]), timeout=120)
        assert real.success, real.message
        assert "ignored unknown options" not in real.message
        # The catalog name pinned to that commit loads; asked at another revision, it is refused by name.
        name = "scripted-text"
        same = stub.LoadModel(pb.ModelOptions(Model=f"{name}@{setup.pulled[:12]}"), timeout=120)
        assert same.success, same.message
        other = stub.LoadModel(pb.ModelOptions(Model=name, Options=[f"revision:{newer}"]), timeout=120)
        assert not other.success and newer in other.message and setup.pulled in other.message
        answer = "".join(
            reply.message.decode()
            for reply in stub.PredictStream(pb.PredictOptions(Prompt="hi", Tokens=64), timeout=60)
        )
        assert answer == fixture_info(scripted_text_model)["answer"]
        # Status tells the loaded model's own memory apart from the process's (LocalAI shows the breakdown).
        status = stub.Status(pb.HealthMessage(), timeout=30)
        weights = (scripted_text_model / "model.safetensors").stat().st_size
        assert status.memory.breakdown["weights"] == weights
    finally:
        process.close()


def test_repo_revision_from_the_cache_without_any_catalog(setup: Setup, tmp_path: Path) -> None:
    env = {**setup.offline, "GALLERY_HOME": str(tmp_path / "empty-home")}
    process = GrpcProcess(env=runtime_env(**env))
    try:
        real = process.stub.LoadModel(
            pb.ModelOptions(Model=REPO, Options=[f"revision:{setup.pulled}"]), timeout=120
        )
        assert real.success, real.message
        assert f"imported {REPO} at commit {setup.pulled}" in real.message  # the on-the-fly import says so
    finally:
        process.close()


def test_config_pin_is_honoured_and_a_bogus_one_refused(setup: Setup, tmp_path: Path) -> None:
    imported = _gallery(
        ["import", REPO, "--revision", setup.pulled, "-o", str(tmp_path / "pinned.yaml")], setup.offline
    )
    assert imported.returncode == 0, imported.stderr
    good = _gallery(["run", str(tmp_path / "pinned.yaml"), "-p", "hi", "--max-tokens", "64"], setup.offline)
    assert good.returncode == 0, good.stderr
    data = yaml.safe_load((tmp_path / "pinned.yaml").read_text())
    data["mlx"]["source"]["revision"] = BOGUS
    (tmp_path / "bogus.yaml").write_text(yaml.safe_dump(data))
    bad = _gallery(["run", str(tmp_path / "bogus.yaml"), "-p", "hi"], setup.offline)
    assert bad.returncode == 17 and BOGUS in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_repo_id_finds_its_installed_entry_without_the_network(
    setup: Setup, scripted_text_model: Path
) -> None:
    setup.hub.reset_stats()
    # The hub is up, but the installed entry needs nothing from it.
    done = _gallery(["run", REPO, "-p", "hi", "--max-tokens", "64"], setup.online)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(fixture_info(scripted_text_model)["answer"])
    assert setup.hub.requests == []


def test_allow_download_without_a_network_says_so(setup: Setup, tmp_path: Path) -> None:
    config = tmp_path / "newer.yaml"
    # Only the metadata of the newer commit gets cached, not its weights.
    imported = _gallery(["import", REPO, "-o", str(config)], setup.online)
    assert imported.returncode == 0, imported.stderr
    down = {**setup.online, "HF_ENDPOINT": "http://127.0.0.1:9", "GALLERY_HTTP_ATTEMPTS": "1"}
    done = _gallery(["run", str(config), "-p", "hi", "--allow-download"], down)
    assert done.returncode in (7, 17) and "no .safetensors weights" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_an_http_request_model_with_a_revision(setup: Setup) -> None:
    import openai

    from tests.interfaces_support import HttpProcess

    process = HttpProcess("--any-model", env=runtime_env(**setup.offline))
    try:
        answer = process.client.completions.create(model=f"{REPO}@{setup.pulled}", prompt="hi", max_tokens=8)
        assert answer.choices[0].text
        # A commit neither cached nor reachable (offline): refused by name, as a client error.
        with pytest.raises(openai.APIStatusError) as refused:
            process.client.completions.create(model=f"{REPO}@{BOGUS}", prompt="hi", max_tokens=8)
        assert refused.value.status_code < 500 and BOGUS in str(refused.value.message)
    finally:
        process.close()
