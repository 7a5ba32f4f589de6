"""Issue #11 (hostile input and faults) on the import side: `gallery import` / `validate` in real subprocesses,
against the loopback recorded Hub (with faults injected), local folders and a hand-filled cache.

Each test reproduces one finding of the adversarial run and checks what happens now:
- item 3: a `%`-format bomb in a template costs nothing at import and validate (dead branch), and a live one is
  refused by the render check with the same message everywhere;
- item 4: a Hub that accepts the connection and never answers: exit 7 with a one-line timeout message;
- item 5: a body that does not match the Hub's listing is refused (exit 8, naming the file and the mismatch)
  and never stored, so the next import against a healthy Hub works; a poisoned cache entry is re-read;
- item 6: an offline import from a half-filled cache names each missing file; `--strict` makes it exit 12;
- item 7: symlinks out of a local folder (and FIFOs) are never read, so nothing they point at is pinned;
- item 8: bad input gets usage / no-config / bad-metadata codes, never internal or network ones;
- item 9: a 50 MB config.json names the size limit from every source; foreign-host URLs are refused; a stop
  id of 10**30 (or beyond the vocabulary) fails `gallery validate`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.hubserver import RecordedHub, git_blob_sha1

ROOT = Path(__file__).resolve().parent.parent
QWEN3 = "Qwen/Qwen3-4B"
QWEN3_FILES = ROOT / "fixtures" / "hub" / "Qwen" / "Qwen3-4B"
FIFTY_MB = 50 * 1024 * 1024


def _gallery(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=180
    )


def _one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The single stderr line of a failed command, after checking its exit code and words."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("gallery: error:")]
    assert done.returncode == code, (done.returncode, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def env(hub: RecordedHub, tmp_path: Path) -> dict[str, str]:
    """A CLI environment on a fresh loopback Hub with its own empty Hugging Face home."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        GALLERY_HTTP_BACKOFF="0.01",
        PYTHONPATH=str(ROOT),
    )
    return base


def _snapshot(env: dict[str, str], hub: RecordedHub, repo: str = QWEN3) -> Path:
    return (
        Path(env["HF_HOME"])
        / "hub"
        / ("models--" + repo.replace("/", "--"))
        / "snapshots"
        / hub.commit_of(repo)
    )


def _model_folder(tmp_path: Path, name: str = "model") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for file in QWEN3_FILES.iterdir():
        if not file.name.startswith("_"):
            shutil.copy(file, folder / file.name)
    return folder


# ----- item 3: template bombs at import and validate -----
BOMB = "{{ '%999999999s' % 'a' }}"


def _with_template(folder: Path, prefix: str) -> None:
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = prefix + config["chat_template"]
    config_path.write_text(json.dumps(config))


def test_a_format_bomb_in_a_dead_branch_costs_nothing_at_import_and_validate(env, tmp_path) -> None:
    """Issue: Jinja folded `'%999999999s' % 'a'` at compile time even inside `{% if false %}`: import ran 52 s
    at 3.9 GB and exited 0, validate took 26 s at 3.9 GB. Now the template is pinned and every probe renders."""
    folder = _model_folder(tmp_path)
    _with_template(folder, "{% if false %}" + BOMB + "{% endif %}")
    out = tmp_path / "bomb.yaml"
    done = _gallery(["import", str(folder), "-o", str(out)], env)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(out.read_text())
    assert config["mlx"]["chat_template"]["status"] == "pinned"
    assert config["mlx"]["chat_template"]["render_check"]["text_probe"] == "ok"
    checked = _gallery(["validate", str(out)], env)
    assert checked.returncode == 0 and "no problems" in checked.stdout, checked.stdout + checked.stderr


def test_a_live_format_bomb_fails_the_same_way_at_import_and_validate(env, tmp_path) -> None:
    folder = _model_folder(tmp_path)
    _with_template(folder, BOMB)
    out = tmp_path / "bomb.yaml"
    done = _gallery(["import", str(folder), "-o", str(out)], env)
    assert done.returncode == 0, done.stderr
    check = yaml.safe_load(out.read_text())["mlx"]["chat_template"]["render_check"]
    assert check["text_probe"] == "error" and "format width too large" in check["errors"][0]
    strict = _gallery(["import", str(folder), "--strict"], env)
    _one_line_error(strict, 12, "--strict", "format width too large")
    checked = _gallery(["validate", str(out)], env)
    assert checked.returncode == 14 and "format width too large" in checked.stdout, checked.stdout


# ----- item 4: a Hub that never answers -----
@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A loopback port that accepts connections (the kernel completes the handshake) and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_a_hub_that_never_answers_times_out(env, silent_hub) -> None:
    """Issue: a Hub that accepts the connection and never answers hung `gallery import` forever, whatever
    HF_HUB_*_TIMEOUT said. Now every request has huggingface_hub's timeouts: exit 7, one line."""
    silent = {
        **env,
        "HF_ENDPOINT": silent_hub,
        "HF_HUB_ETAG_TIMEOUT": "1",
        "HF_HUB_DOWNLOAD_TIMEOUT": "1",
        "GALLERY_HTTP_ATTEMPTS": "2",
    }
    done = _gallery(["import", QWEN3], silent)
    _one_line_error(done, 7, "did not answer in time", "HF_HUB_ETAG_TIMEOUT")


# ----- item 5: bodies that do not match the listing -----
@pytest.mark.parametrize(
    ("body", "mismatch"),
    [
        (b"<!doctype html><html><body>Sign in</body></html>", "bytes, but the Hub lists"),  # an HTML page
        (
            b"{" + b" " * (2 * 1024 * 1024) + b"}",
            "more than the",
        ),  # far more than listed (the 200 MB)
        (None, "git blob id differs"),  # the listed size, other bytes
    ],
)
def test_a_body_that_does_not_match_the_listing_is_never_cached(env, hub, body, mismatch) -> None:
    """Issue: a 200 MB or HTML config.json was stored in the HF cache unchecked, and every later import of that
    commit failed with exit 8, even against a healthy Hub."""
    listed = (QWEN3_FILES / "config.json").read_bytes()
    if body is None:
        body = listed.replace(b'"', b"'", 1)  # same size, different content
        assert len(body) == len(listed) and body != listed
    hub.inject(r"/resolve/[0-9a-f]{40}/config\.json$", body=body, method="GET")
    done = _gallery(["import", QWEN3], env)
    _one_line_error(done, 8, "config.json", "does not match the Hub's listing", mismatch, "not stored")
    snapshot = _snapshot(env, hub)
    assert not (snapshot / "config.json").exists()
    blobs = snapshot.parent.parent / "blobs"
    assert not any(blob.read_bytes() == body for blob in blobs.iterdir()) if blobs.is_dir() else True
    again = _gallery(["import", QWEN3], env)  # the Hub is healthy again
    assert again.returncode == 0, again.stderr
    assert (snapshot / "config.json").read_bytes() == listed


def test_a_poisoned_cache_entry_is_re_read_from_the_hub(env, hub) -> None:
    assert _gallery(["import", QWEN3], env).returncode == 0
    cached = _snapshot(env, hub) / "config.json"
    good = cached.read_bytes()
    cached.unlink()  # (a symlink into blobs/) replaced by what an unchecked writer left there
    cached.write_bytes(b"<html>poisoned</html>")
    done = _gallery(["import", QWEN3], env)
    assert done.returncode == 0, done.stderr
    assert cached.read_bytes() == good


def test_an_unsafe_file_name_in_the_listing_is_refused(env, hub, tmp_path) -> None:
    """A listing is data from the network: a name that climbs out of the repo must never reach the cache."""
    with urllib.request.urlopen(f"{hub.url}/api/models/{QWEN3}?blobs=true", timeout=10) as answer:
        info = json.loads(answer.read())
    evil = "additional_chat_templates/../../../../../escaped.jinja"
    content = b"{{ 'escaped' }}"
    info["siblings"].append({"rfilename": evil, "size": len(content), "blobId": git_blob_sha1(content)})
    hub.inject(r"^/api/models/", body=json.dumps(info).encode(), headers={"Content-Type": "application/json"})
    hub.inject(r"escaped\.jinja$", body=content)
    done = _gallery(["import", QWEN3], env)
    _one_line_error(done, 8, "model info", "unsafe file name")
    assert not list(tmp_path.rglob("escaped.jinja"))


# ----- item 6: a half-filled cache -----
def test_an_offline_import_names_the_files_the_cache_lacks_and_strict_refuses(env, hub) -> None:
    """Issue: offline, with generation_config.json missing from the cache, the import exited 0 with one stop
    token instead of two and no sampling defaults, and nothing named the missing file."""
    online = _gallery(["import", QWEN3], env)
    assert online.returncode == 0, online.stderr
    (_snapshot(env, hub) / "generation_config.json").unlink()
    offline_env = {**env, "HF_HUB_OFFLINE": "1"}
    offline = _gallery(["import", QWEN3], offline_env)
    assert offline.returncode == 0, offline.stderr
    assert "offline import without generation_config.json" in offline.stderr
    strict = _gallery(["import", QWEN3, "--strict"], offline_env)
    _one_line_error(strict, 12, "--strict", "without generation_config.json")


# ----- item 7: symlinks and special files in a local folder -----
def test_links_out_of_a_model_folder_and_fifos_are_never_read(env, tmp_path) -> None:
    """Issue: a chat_template.jinja linked to /proc/self/environ put the process environment, secrets
    included, into the config."""
    folder = _model_folder(tmp_path)
    secret = "hunter2-secret-from-the-environment"
    (folder / "chat_template.jinja").symlink_to("/proc/self/environ")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"chat_template": secret}))
    (folder / "chat_template.json").symlink_to(outside)
    os.mkfifo(folder / "processor_config.json")  # reading a FIFO would block forever
    inside = folder / "sub"
    inside.mkdir()
    (inside / "x.txt").write_text("x")
    (folder / "linked_inside.txt").symlink_to(inside / "x.txt")  # a link inside the folder is fine
    done = _gallery(["import", str(folder), "--json"], {**env, "GALLERY_TEST_SECRET": secret})
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout and "GALLERY_TEST_SECRET" not in done.stdout
    config = json.loads(done.stdout)
    assert config["mlx"]["chat_template"]["source"] == "tokenizer_config.json:chat_template"
    assert "chat_template.jinja (a link out of the folder)" in done.stderr
    assert "chat_template.json (a link out of the folder)" in done.stderr
    assert "processor_config.json (not a regular file)" in done.stderr


# ----- item 8: bad input, refused with the right code -----
def test_bad_sources_get_usage_no_config_or_bad_metadata_codes(env, hub) -> None:
    """Issue: a 5,000-character repo id exited 1 ("File name too long"); `gallery import /` walked the whole
    file system for 26 s then exited 1; non-JSON or wrongly typed model info was exit 7 "could not reach"."""
    _one_line_error(_gallery(["import", "x" * 5000], env), 2, "5000 characters")
    _one_line_error(_gallery(["import", "org/" + "x" * 5000], env), 2, "5004 characters")
    _one_line_error(_gallery(["import", "/"], env), 9, "no config.json")
    model_info = r"^/api/models/"
    json_header = {"Content-Type": "application/json"}
    for body, words in (
        (b"<html>maintenance</html>", "JSONDecodeError"),
        (b"[1, 2]", "a JSON list"),
        (json.dumps({"id": QWEN3, "sha": 5}).encode(), "sha is int"),
        (json.dumps({"id": QWEN3, "sha": "a" * 40, "siblings": "x"}).encode(), "siblings is str"),
        (json.dumps({"id": QWEN3, "sha": "a" * 40, "siblings": [{"rfilename": 5}]}).encode(), "rfilename"),
        (
            json.dumps(
                {"id": QWEN3, "sha": "a" * 40, "siblings": [{"rfilename": "c", "size": "big"}]}
            ).encode(),
            "not a byte count",
        ),
    ):
        hub.inject(model_info, body=body, headers=json_header, method="GET")
        _one_line_error(_gallery(["import", QWEN3], env), 8, "model info", words)


# ----- item 9: smaller ones -----
def test_a_50_mb_config_json_names_the_size_limit_from_every_source(env, hub, tmp_path) -> None:
    """Issue: a 50 MB config.json gave "could not be read" instead of naming the size limit."""
    huge = b'{"model_type": "qwen3", "pad": "' + b"x" * FIFTY_MB + b'"}'
    folder = _model_folder(tmp_path)
    (folder / "config.json").write_bytes(huge)
    _one_line_error(_gallery(["import", str(folder)], env), 8, "config.json", "16777216-byte limit")
    # From the Hub: the listing says 50 MB, so nothing is downloaded.
    hub.write_file(QWEN3, "config.json", huge)
    hub.reset_stats()
    _one_line_error(_gallery(["import", QWEN3], env), 8, "config.json", "16777216-byte limit")
    assert not [r for r in hub.requests if r.path.endswith("/config.json")]
    # From the cache (offline), where a snapshot_download may have put it.
    snapshot = _snapshot(env, hub)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_bytes(huge)
    ref = snapshot.parent.parent / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(hub.commit_of(QWEN3))
    offline = _gallery(["import", QWEN3], {**env, "HF_HUB_OFFLINE": "1"})
    _one_line_error(offline, 8, "config.json", "16777216-byte limit")


def test_a_url_on_a_foreign_host_is_refused(env, hub) -> None:
    """Issue: `https://evil.example.com/org/name` silently imported org/name from the configured Hub."""
    hub.reset_stats()
    for url in ("https://evil.example.com/Qwen/Qwen3-4B", "http://huggingface.co.evil.example/Qwen/Qwen3-4B"):
        _one_line_error(_gallery(["import", url], env), 2, "not a Hub URL", "evil.example")
    assert hub.requests == []
    assert _gallery(["import", f"{hub.url}/{QWEN3}"], env).returncode == 0  # the configured endpoint is fine


def _config_with_stop_id(path: Path, stop_id: int) -> Path:
    data = yaml.safe_load((ROOT / "catalog" / "entries" / "qwen3-4b-4bit.yaml").read_text())
    data["mlx"]["stop_tokens"][0]["id"] = stop_id
    out = path / f"stop-{len(str(stop_id))}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return out


def test_stop_ids_beyond_int32_or_the_vocabulary_fail_validate(env, tmp_path) -> None:
    """Issue: a stop id of 10**30 passed `gallery validate`."""
    entry = yaml.safe_load((ROOT / "catalog" / "entries" / "qwen3-4b-4bit.yaml").read_text())
    assert entry["mlx"]["vocab_size"] == 151936  # pinned by the importer from config.json
    huge = _gallery(["validate", str(_config_with_stop_id(tmp_path, 10**30))], env)
    assert huge.returncode == 14, huge.stdout + huge.stderr
    assert "mlx.stop_tokens.0.id: Input should be less than or equal to 2147483647" in huge.stdout
    beyond = _gallery(["validate", str(_config_with_stop_id(tmp_path, 151936))], env)
    assert beyond.returncode == 14, beyond.stdout
    assert "stop token id 151936 is outside the vocabulary (mlx.vocab_size 151936)" in beyond.stdout


def test_vocab_size_comes_from_the_language_sub_config(hub_env: Any) -> None:
    """VLM configs keep the language model's vocabulary in text_config (gemma) or at the root (qwen2.5-vl)."""
    from importers import import_model

    assert import_model("mlx-community/gemma-4-E4B-it-qat-4bit").config.mlx.vocab_size == 262144
    assert import_model("Qwen/Qwen2.5-VL-3B-Instruct").config.mlx.vocab_size == 151936
