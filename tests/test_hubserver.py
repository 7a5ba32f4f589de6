"""The recorded hub must look like the real Hub to the real huggingface_hub client.

Every check goes through huggingface_hub itself (HfApi, hf_hub_download, snapshot_download, get_session), with
`endpoint=hub.url` passed explicitly, except the raw-socket junk test.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import (
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from fixtures.hubserver import HUB_ROOT, RecordedHub, git_blob_sha1

GEMMA4 = "mlx-community/gemma-4-E4B-it-qat-4bit"
QWEN = "Qwen/Qwen3-4B"
ROOT = Path(__file__).resolve().parent.parent


def fixture_bytes(repo: str, path: str) -> bytes:
    """The bytes a repo file has on disk in fixtures/hub."""
    return (HUB_ROOT / repo / path).read_bytes()


def download(hub: RecordedHub, repo: str, path: str, cache: Path, **kwargs: object) -> bytes:
    """hf_hub_download against the recorded hub, returning the downloaded bytes."""
    return Path(hf_hub_download(repo, path, endpoint=hub.url, cache_dir=cache, **kwargs)).read_bytes()


# ----------------------------------------------------------------------------------------------- model info
def test_model_info_with_files_metadata(hub: RecordedHub) -> None:
    info = HfApi(endpoint=hub.url).model_info(GEMMA4, files_metadata=True)
    assert info.id == GEMMA4
    assert info.sha == hub.commit_of(GEMMA4)
    assert info.pipeline_tag == "image-text-to-text"
    assert info.library_name == "mlx"
    assert {"mlx", "safetensors", "gemma4"} <= set(info.tags)
    assert info.gated is False
    assert info.card_data is not None and info.card_data.base_model == "google/gemma-4-E4B-it"

    siblings = {s.rfilename: s for s in info.siblings}
    assert not any(name.startswith("_") for name in siblings)  # _info.json / _PROVENANCE.txt are never served
    config = fixture_bytes(GEMMA4, "config.json")
    assert siblings["config.json"].size == len(config)
    assert siblings["config.json"].blob_id == git_blob_sha1(config)
    assert siblings["config.json"].lfs is None

    declared = json.loads(fixture_bytes(GEMMA4, "_info.json"))["virtual_files"]
    assert len(declared) == 2
    for decl in declared:
        shard = siblings[decl["path"]]
        assert shard.size == decl["size"]
        assert shard.lfs is not None
        assert shard.lfs.sha256 == decl["sha256"]
        assert shard.lfs.size == decl["size"]
    assert sum(d["size"] for d in declared) > 4_500_000_000  # ~5 GB of (virtual) weights

    index = json.loads(fixture_bytes(GEMMA4, "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == {d["path"] for d in declared}
    prefixes = {name.split(".")[0] for name in index["weight_map"]}
    assert {"language_model", "vision_tower", "audio_tower"} <= prefixes


def test_model_info_without_files_metadata_lists_names_only(hub: RecordedHub) -> None:
    info = HfApi(endpoint=hub.url).model_info(QWEN)
    assert {s.rfilename for s in info.siblings} == {
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
    }
    assert all(s.size is None and s.blob_id is None for s in info.siblings)
    assert info.card_data is None  # no README, no card data


def test_model_info_expand_returns_only_requested_fields(hub: RecordedHub) -> None:
    info = HfApi(endpoint=hub.url).model_info(GEMMA4, expand=["pipeline_tag", "sha"])
    assert info.pipeline_tag == "image-text-to-text"
    assert info.sha == hub.commit_of(GEMMA4)
    assert info.siblings is None and info.tags is None


def test_gated_repo_metadata_is_public(hub: RecordedHub) -> None:
    api = HfApi(endpoint=hub.url)
    for repo in ("google/gemma-3-4b-it", "meta-llama/Llama-3.2-3B-Instruct", "broken/gated"):
        info = api.model_info(repo, files_metadata=True)
        assert info.gated == "manual"
        assert "config.json" in {s.rfilename for s in info.siblings}


def test_every_repo_loads_and_is_documented(hub: RecordedHub) -> None:
    readme = (HUB_ROOT / "README.md").read_text()
    api = HfApi(endpoint=hub.url)
    for repo in hub.repo_ids:
        assert (HUB_ROOT / repo / "_PROVENANCE.txt").is_file(), repo
        assert (HUB_ROOT / repo / "_info.json").is_file(), repo
        assert f"`{repo}`" in readme, f"{repo} missing from fixtures/hub/README.md"
        assert api.model_info(repo).sha == hub.commit_of(repo)
    assert len(hub.repo_ids) >= 24


def test_commit_sha_is_deterministic() -> None:
    first, second = RecordedHub(), RecordedHub()  # never started: loading alone fixes the commits
    for repo in first.repo_ids:
        assert re.fullmatch(r"[0-9a-f]{40}", first.commit_of(repo))
        assert first.commit_of(repo) == second.commit_of(repo)


# ----------------------------------------------------------------------------------------------- downloads
def test_download_gives_fixture_bytes_and_commit(hub: RecordedHub, tmp_path: Path) -> None:
    path = Path(hf_hub_download(GEMMA4, "config.json", endpoint=hub.url, cache_dir=tmp_path))
    assert path.read_bytes() == fixture_bytes(GEMMA4, "config.json")
    assert path.parent.name == hub.commit_of(GEMMA4)  # snapshots/<commit>/config.json
    ref = tmp_path / "models--mlx-community--gemma-4-E4B-it-qat-4bit" / "refs" / "main"
    assert ref.read_text() == hub.commit_of(GEMMA4)
    config = json.loads(path.read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]


def test_mistral_serves_the_sophgo_config_as_config_json(hub: RecordedHub, tmp_path: Path) -> None:
    data = download(hub, "mistralai/Mistral-7B-Instruct-v0.2", "config.json", tmp_path)
    assert data == (HUB_ROOT / "mistralai/Mistral-7B-Instruct-v0.2/config.json").read_bytes()
    assert json.loads(data)["architectures"] == ["MistralForCausalLM"]


def test_subfolders_and_url_encoded_paths(hub: RecordedHub, tmp_path: Path) -> None:
    repo = "broken/malicious-template"
    name = "additional_chat_templates/long_loop.jinja"
    assert download(hub, repo, name, tmp_path) == fixture_bytes(repo, name)
    odd = "templates/with space & ü #1.jinja"
    hub.write_file(repo, odd, b"{{ messages }}")
    assert download(hub, repo, odd, tmp_path) == b"{{ messages }}"


def test_reserved_files_are_not_served(hub: RecordedHub, tmp_path: Path) -> None:
    for name in ("_info.json", "_PROVENANCE.txt"):
        with pytest.raises(EntryNotFoundError):
            hf_hub_download(QWEN, name, endpoint=hub.url, cache_dir=tmp_path)


def test_head_metadata_headers(hub: RecordedHub) -> None:
    url = hf_hub_url(GEMMA4, "config.json", endpoint=hub.url)
    meta = get_hf_file_metadata(url)
    config = fixture_bytes(GEMMA4, "config.json")
    assert meta.commit_hash == hub.commit_of(GEMMA4)
    assert meta.etag == git_blob_sha1(config)
    assert meta.size == len(config)
    response = get_session().head(url, headers=build_hf_headers())
    assert response.status_code == 200
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"] == f'"{git_blob_sha1(config)}"'
    assert "X-Linked-Etag" not in response.headers  # not an LFS file


def test_virtual_lfs_file_heads_but_does_not_download(hub: RecordedHub, tmp_path: Path) -> None:
    shard = json.loads(fixture_bytes(GEMMA4, "_info.json"))["virtual_files"][0]
    url = hf_hub_url(GEMMA4, shard["path"], endpoint=hub.url)
    meta = get_hf_file_metadata(url)
    assert meta.etag == shard["sha256"]
    assert meta.size == shard["size"]
    response = get_session().head(url, headers=build_hf_headers())
    assert response.headers["X-Linked-Etag"] == f'"{shard["sha256"]}"'
    assert response.headers["X-Linked-Size"] == str(shard["size"])
    response = get_session().get(url, headers=build_hf_headers())
    with pytest.raises(EntryNotFoundError):
        hf_raise_for_status(response)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(GEMMA4, shard["path"], endpoint=hub.url, cache_dir=tmp_path)


def test_listed_but_missing_file(hub: RecordedHub, tmp_path: Path) -> None:
    repo = "broken/missing-file"
    info = HfApi(endpoint=hub.url).model_info(repo, files_metadata=True)
    listed = {s.rfilename: s for s in info.siblings}
    assert listed["generation_config.json"].size == 239
    with pytest.raises(EntryNotFoundError):
        get_hf_file_metadata(hf_hub_url(repo, "generation_config.json", endpoint=hub.url))
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "generation_config.json", endpoint=hub.url, cache_dir=tmp_path)


def test_huge_template_is_synthesized(hub: RecordedHub, tmp_path: Path) -> None:
    data = download(hub, "broken/huge-template", "tokenizer_config.json", tmp_path)
    assert len(data) > 2 * 1024 * 1024
    assert len(json.loads(data)["chat_template"]) > 2 * 1024 * 1024
    assert not (HUB_ROOT / "broken/huge-template/tokenizer_config.json").exists()  # git stays small


def test_extra_repo_serves_safetensors_as_lfs(
    hub_factory: Callable[..., RecordedHub], tmp_path: Path
) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    weights = bytes(range(256)) * 40
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "_info.json").write_text('{"library_name": "mlx", "tags": ["mlx"]}')
    hub = hub_factory(extra_repos={"local/tiny": folder})
    info = HfApi(endpoint=hub.url).model_info("local/tiny", files_metadata=True)
    shard = next(s for s in info.siblings if s.rfilename == "model.safetensors")
    assert shard.lfs is not None and shard.lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert info.library_name == "mlx"
    path = Path(
        hf_hub_download("local/tiny", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "c")
    )
    assert path.read_bytes() == weights
    assert path.resolve().name == hashlib.sha256(weights).hexdigest()  # cached under the LFS etag


# ----------------------------------------------------------------------------------------------- ranges
def test_range_reads(hub: RecordedHub) -> None:
    data = fixture_bytes(GEMMA4, "tokenizer.json")
    url = hf_hub_url(GEMMA4, "tokenizer.json", endpoint=hub.url)
    session, headers = get_session(), build_hf_headers()

    r = session.get(url, headers={**headers, "Range": "bytes=0-63"})
    assert r.status_code == 206
    assert r.content == data[:64]
    assert r.headers["Content-Range"] == f"bytes 0-63/{len(data)}"
    assert r.headers["X-Repo-Commit"] == hub.commit_of(GEMMA4)

    r = session.get(url, headers={**headers, "Range": "bytes=100-"})
    assert r.status_code == 206 and r.content == data[100:]

    r = session.get(url, headers={**headers, "Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == data[-10:]

    r = session.get(url, headers={**headers, "Range": f"bytes=10-{len(data) + 500}"})
    assert r.status_code == 206 and r.content == data[10:]

    r = session.get(url, headers={**headers, "Range": f"bytes={len(data)}-"})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{len(data)}"

    r = session.get(url, headers={**headers, "Range": "bytes=0-1,5-9"})  # multi-range: ignored, whole file
    assert r.status_code == 200 and r.content == data


def test_range_read_of_gated_file_needs_token(hub: RecordedHub, hub_token: str) -> None:
    url = hf_hub_url("google/gemma-3-4b-it", "tokenizer_config.json", endpoint=hub.url)
    r = get_session().get(url, headers={**build_hf_headers(), "Range": "bytes=0-1023"})
    with pytest.raises(GatedRepoError):
        hf_raise_for_status(r)
    r = get_session().get(url, headers={**build_hf_headers(token=hub_token), "Range": "bytes=0-1023"})
    hf_raise_for_status(r)
    assert r.content == fixture_bytes("google/gemma-3-4b-it", "tokenizer_config.json")[:1024]


# ----------------------------------------------------------------------------------------------- errors
def test_unknown_repo(hub: RecordedHub, hub_token: str, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info("nobody/nothing")
    assert not isinstance(err.value, GatedRepoError)
    assert err.value.response.status_code == 401
    assert err.value.response.headers["X-Error-Code"] == "RepoNotFound"
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info("nobody/nothing", token=hub_token)
    assert err.value.response.status_code == 404  # signed in: the Hub says 404
    with pytest.raises(RepositoryNotFoundError) as err:
        hf_hub_download("nobody/nothing", "config.json", endpoint=hub.url, cache_dir=tmp_path)
    assert not isinstance(err.value, GatedRepoError)


def test_gated_repo_files(hub: RecordedHub, hub_token: str, tmp_path: Path) -> None:
    for repo in ("google/gemma-3-4b-it", "meta-llama/Llama-3.2-3B-Instruct", "broken/gated"):
        with pytest.raises(GatedRepoError) as err:
            hf_hub_download(repo, "config.json", endpoint=hub.url, cache_dir=tmp_path)
        assert err.value.response.status_code == 401
        assert "restricted" in str(err.value)
        data = download(hub, repo, "config.json", tmp_path, token=hub_token)
        assert data == fixture_bytes(repo, "config.json")


def test_unknown_revision(hub: RecordedHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(QWEN, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(QWEN, "config.json", revision="0" * 40, endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        list(api.list_repo_tree(QWEN, revision="nope"))


def test_unknown_file(hub: RecordedHub, tmp_path: Path) -> None:
    with pytest.raises(EntryNotFoundError) as err:
        hf_hub_download(QWEN, "chat_template.jinja", endpoint=hub.url, cache_dir=tmp_path)
    assert err.value.response.headers["X-Repo-Commit"] == hub.commit_of(QWEN)
    # huggingface_hub caches the absence under .no_exist/<commit>/, keyed by the X-Repo-Commit header
    assert (
        tmp_path / "models--Qwen--Qwen3-4B" / ".no_exist" / hub.commit_of(QWEN) / "chat_template.jinja"
    ).exists()


def test_invalid_token_is_refused_like_the_hub(hub: RecordedHub, tmp_path: Path) -> None:
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url).model_info(QWEN, token="hf_wrong")
    assert not isinstance(err.value, RepositoryNotFoundError)
    assert err.value.response.status_code == 401
    assert "Invalid credentials" in str(err.value)
    with pytest.raises(HfHubHTTPError):
        hf_hub_download(QWEN, "config.json", endpoint=hub.url, cache_dir=tmp_path, token="hf_wrong")


def test_unknown_route_is_404(hub: RecordedHub) -> None:
    r = get_session().get(f"{hub.url}/api/spaces/a/b")
    assert r.status_code == 404
    r = get_session().post(f"{hub.url}/api/models/{QWEN}")
    assert r.status_code == 404


# ----------------------------------------------------------------------------------------------- faults
def test_injected_500_on_head_is_retried_by_hf_hub_download(hub: RecordedHub, tmp_path: Path) -> None:
    hub.inject(r"/resolve/.*/config\.json$", status=500, method="HEAD")
    assert download(hub, QWEN, "config.json", tmp_path) == fixture_bytes(QWEN, "config.json")
    seen = [(r.method, r.status, r.injected) for r in hub.requests]
    assert seen == [("HEAD", 500, True), ("HEAD", 200, False), ("GET", 200, False)]


def test_injected_429_on_get_is_retried_after_retry_after(hub: RecordedHub, tmp_path: Path) -> None:
    hub.inject(r"/resolve/.*/generation_config\.json$", status=429, method="GET")
    assert download(hub, QWEN, "generation_config.json", tmp_path) == fixture_bytes(
        QWEN, "generation_config.json"
    )
    statuses = [(r.method, r.status) for r in hub.requests]
    assert statuses == [("HEAD", 200), ("GET", 429), ("GET", 200)]


def test_model_info_does_not_retry(hub: RecordedHub) -> None:
    hub.inject(r"^/api/models/", status=503)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url).model_info(QWEN)
    assert err.value.response.status_code == 503
    assert err.value.response.headers["Retry-After"] == "0"
    assert HfApi(endpoint=hub.url).model_info(QWEN).sha == hub.commit_of(QWEN)  # the fault was used up


def test_injected_delay_and_latency(hub: RecordedHub, hub_factory: Callable[..., RecordedHub]) -> None:
    hub.inject(r"^/api/models/", delay=0.2, count=1)
    HfApi(endpoint=hub.url).model_info(QWEN)
    assert hub.requests[-1].duration >= 0.2
    slow = hub_factory(latency=0.05)
    started = time.monotonic()
    HfApi(endpoint=slow.url).model_info(QWEN)
    assert time.monotonic() - started >= 0.05
    assert all(r.duration >= 0.05 for r in slow.requests)


# ----------------------------------------------------------------------------------------------- snapshot
def test_snapshot_download_json_and_jinja(hub: RecordedHub, tmp_path: Path) -> None:
    folder = Path(
        snapshot_download(GEMMA4, allow_patterns=["*.json", "*.jinja"], endpoint=hub.url, cache_dir=tmp_path)
    )
    got = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    expected = {
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert got == expected
    assert folder.name == hub.commit_of(GEMMA4)
    for name in expected:
        assert (folder / name).read_bytes() == fixture_bytes(GEMMA4, name)
    kinds = [(r.method, r.path.split("/")[5 if r.path.startswith("/api/") else 3]) for r in hub.requests]
    # One info call, one tree listing, then a HEAD and a GET per matching file: 2 + 2 * 7 = 16 requests.
    assert kinds.count(("GET", "revision")) == 1
    assert kinds.count(("GET", "tree")) == 1
    assert kinds.count(("HEAD", "resolve")) == len(expected)
    assert kinds.count(("GET", "resolve")) == len(expected)
    assert len(hub.requests) == 2 + 2 * len(expected)
    assert all(r.status == 200 for r in hub.requests)
    assert hub.bytes_sent >= sum(len(fixture_bytes(GEMMA4, n)) for n in expected)


def test_snapshot_download_of_gated_repo_needs_token(
    hub: RecordedHub, hub_token: str, tmp_path: Path
) -> None:
    with pytest.raises(GatedRepoError):
        snapshot_download("broken/gated", allow_patterns=["*.json"], endpoint=hub.url, cache_dir=tmp_path)
    folder = snapshot_download(
        "broken/gated", allow_patterns=["*.json"], endpoint=hub.url, cache_dir=tmp_path / "t", token=hub_token
    )
    assert (Path(folder) / "config.json").is_file()


def test_tree_listing_and_paths_info(hub: RecordedHub) -> None:
    api = HfApi(endpoint=hub.url)
    repo = "broken/image-gen"
    top = list(api.list_repo_tree(repo))
    assert {e.path for e in top if isinstance(e, RepoFolder)} == {
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    }
    assert "unet/config.json" not in {e.path for e in top}
    everything = {e.path: e for e in api.list_repo_tree(repo, recursive=True)}
    unet_weights = everything["unet/diffusion_pytorch_model.safetensors"]
    assert isinstance(unet_weights, RepoFile) and unet_weights.lfs is not None
    assert {e.path for e in api.list_repo_tree(repo, path_in_repo="unet")} == {
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }
    found = api.get_paths_info(repo, ["model_index.json", "unet", "nope.json"])
    assert {(type(e).__name__, e.path) for e in found} == {
        ("RepoFile", "model_index.json"),
        ("RepoFolder", "unet"),
    }
    assert set(api.list_repo_files(repo)) == {p for p, e in everything.items() if isinstance(e, RepoFile)}


def test_tree_pagination(hub: RecordedHub) -> None:
    repo = "broken/no-config"
    for i in range(1005):
        hub.write_file(repo, f"many/{i:04d}.json", b"{}")
    hub.reset_stats()
    files = [
        e for e in HfApi(endpoint=hub.url).list_repo_tree(repo, recursive=True) if isinstance(e, RepoFile)
    ]
    assert len(files) == 1005 + 3
    assert sum(1 for r in hub.requests if "/tree/" in r.path) == 2  # followed the Link: rel="next" header


# ----------------------------------------------------------------------------------------------- drift
def test_write_file_makes_a_new_commit_and_old_one_stays(hub: RecordedHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url)
    before = fixture_bytes(QWEN, "config.json")
    old = hub.commit_of(QWEN)
    new = hub.write_file(QWEN, "config.json", b'{"model_type": "qwen3", "changed": true}\n')
    assert new != old and hub.commit_of(QWEN) == new
    assert api.model_info(QWEN).sha == new
    assert api.model_info(QWEN, revision=old).sha == old
    assert download(hub, QWEN, "config.json", tmp_path) == b'{"model_type": "qwen3", "changed": true}\n'
    assert download(hub, QWEN, "config.json", tmp_path, revision=old) == before
    assert fixture_bytes(QWEN, "config.json") == before  # memory only: fixtures/ untouched

    deleted = hub.delete_file(QWEN, "generation_config.json")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(QWEN, "generation_config.json", endpoint=hub.url, cache_dir=tmp_path / "2")
    assert download(hub, QWEN, "generation_config.json", tmp_path / "3", revision=new) == fixture_bytes(
        QWEN, "generation_config.json"
    )
    commits = api.list_repo_commits(QWEN)
    assert [c.commit_id for c in commits] == [deleted, new, old]
    refs = api.list_repo_refs(QWEN)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", deleted)]
    with pytest.raises(FileNotFoundError):
        hub.delete_file(QWEN, "generation_config.json")
    with pytest.raises(ValueError):
        hub.write_file(QWEN, "_info.json", b"{}")


def test_same_files_give_the_same_commit(hub: RecordedHub) -> None:
    original = hub.commit_of(QWEN)
    content = fixture_bytes(QWEN, "config.json")
    changed = hub.write_file(QWEN, "config.json", b"{}")
    assert hub.write_file(QWEN, "config.json", content) == original  # back to the recorded files
    assert changed != original


def test_stats(hub: RecordedHub, tmp_path: Path) -> None:
    download(hub, QWEN, "tokenizer_config.json", tmp_path)
    assert hub.bytes_sent == len(fixture_bytes(QWEN, "tokenizer_config.json"))
    record = hub.requests[-1]
    assert (record.method, record.status, record.bytes_sent) == ("GET", 200, hub.bytes_sent)
    assert record.end >= record.start
    hub.reset_stats()
    assert hub.requests == [] and hub.bytes_sent == 0
    get_session().get(hf_hub_url(QWEN, "config.json", endpoint=hub.url), headers={"Range": "bytes=0-9"})
    assert hub.requests[-1].range == "bytes=0-9" and hub.requests[-1].bytes_sent == 10


def test_whoami(hub: RecordedHub, hub_token: str) -> None:
    assert HfApi(endpoint=hub.url).whoami(token=hub_token)["name"] == "fixture-user"


# ----------------------------------------------------------------------------------------------- robustness
def _raw(hub: RecordedHub, payload: bytes, *, read: bool = True) -> bytes:
    host, port = hub.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(payload)
        if not read:
            return b""
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_server_survives_garbage(hub: RecordedHub) -> None:
    junk = [
        b"\x00\x01\x02\xff garbage \r\n\r\n",
        b"GET\r\n\r\n",
        b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"GET /api/models/Qwen/Qwen3-4B HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"POST /api/models/Qwen/Qwen3-4B/paths-info/main HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\nab",
        b"GET /Qwen/Qwen3-4B/resolve/main/config.json HTTP/1.1\r\nHost: x\r\nRange: bytes=zz\r\n\r\n",
        b"GET /%zz/%%/resolve/%/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/models/Qwen/Qwen3-4B/tree/main?cursor=x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/models/Qwen/Qwen3-4B HTTP/1.1\r\nHost: x\r\nAuthorization: \xff\xfe\r\n\r\n",
        b"GET /api/models/Qwen/Qwen3-4B/revision/%C3%BC%0D%0AX-Evil:%201 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/models/Qwen/Qwen3-4B HTTP/1.1\r\nHost: x\r\n",  # headers never finished
    ]
    for payload in junk:
        answer = _raw(hub, payload)
        assert answer == b"" or answer.startswith(b"HTTP/"), payload[:40]
    _raw(hub, b"GET /api/models/Qwen/Qwen3-4B HTTP/1.1\r\nHost: x\r\n\r\n", read=False)  # hang up at once
    head = _raw(hub, junk[10]).split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 404") and b"\r\nX-Evil" not in head  # no header splitting
    assert b" 400 " in _raw(hub, junk[4]).split(b"\r\n", 1)[0]
    full = _raw(hub, junk[6])
    assert full.startswith(b"HTTP/1.1 200") and full.endswith(fixture_bytes(QWEN, "config.json"))
    # ...and it keeps answering real clients
    assert HfApi(endpoint=hub.url).model_info(QWEN).sha == hub.commit_of(QWEN)


def test_cli_serves_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fixtures.hubserver", "--port", "0", "--latency", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert HfApi(endpoint=url).model_info(QWEN).id == QWEN
    finally:
        proc.send_signal(2)  # SIGINT, i.e. Ctrl-C
        assert proc.wait(timeout=10) == 0
        if proc.stdout is not None:
            proc.stdout.close()
