"""Issue 22: ollama / LM Studio habits against a running server — `gallery ps` shows what it holds in memory,
`gallery stop` (alias `unload`) frees a model, /health and /metrics carry the memory per loaded model, and
`gallery serve` has a default HTTP address; `gallery list` / `ls` list what is installed, `gallery catalog`
the catalog; tables wrap long cells instead of cutting them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.interfaces_support import HttpProcess, runtime_env
from tests.terminal_support import gallery, spawn, strip_ansi, user_env

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-habits"


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_")}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        env={**base, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        timeout=120,
    )


@pytest.fixture(scope="module")
def server(scripted_text_model: Path) -> HttpProcess:  # type: ignore[misc]
    process = HttpProcess(str(scripted_text_model), "--api-key", KEY, env=runtime_env(), api_key=KEY)
    try:
        yield process
    finally:
        process.close()


def test_ps_health_and_metrics_show_memory_per_model(server: HttpProcess, scripted_text_model: Path) -> None:
    server.client.completions.create(model="scripted-text", prompt="hi", max_tokens=4)
    health = httpx.get(f"{server.url}/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    (row,) = health["loaded"]
    weights = (scripted_text_model / "model.safetensors").stat().st_size
    assert row["weights_bytes"] == weights and row["memory_bytes"] >= weights
    assert "loaded" not in httpx.get(f"{server.url}/health").json()  # without the key: no details
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert f'gallery_model_weights_bytes{{model="{row["name"]}"}} {float(weights)}' in metrics
    assert 'gallery_process_memory_bytes{kind="rss"}' in metrics

    listed = _cli("ps", "--url", server.url, "--api-key", KEY, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["name"] for r in json.loads(listed.stdout)] == [row["name"]]
    table = _cli("ps", "--url", server.url, GALLERY_API_KEY=KEY)
    assert table.returncode == 0 and row["name"] in table.stdout and "MEMORY" in table.stdout
    refused = _cli("ps", "--url", server.url)
    assert refused.returncode == 2 and "--api-key" in refused.stderr


def test_stop_unloads_and_the_next_request_loads_again(server: HttpProcess) -> None:
    server.client.completions.create(model="scripted-text", prompt="hi", max_tokens=4)
    stopped = _cli("stop", "scripted-text", "--url", server.url, "--api-key", KEY)
    assert stopped.returncode == 0 and "unloaded scripted-text" in stopped.stderr, stopped.stderr
    after = _cli("ps", "--url", server.url, "--api-key", KEY, "--json")
    assert json.loads(after.stdout) == []
    again = _cli("unload", "scripted-text", "--url", server.url, "--api-key", KEY)
    assert again.returncode == 0 and "was not loaded" in again.stderr
    unknown = _cli("stop", "no-such-model", "--url", server.url, "--api-key", KEY)
    assert unknown.returncode == 3 and unknown.stderr.count("\n") == 1
    server.client.completions.create(model="scripted-text", prompt="hi", max_tokens=4)  # loads again
    assert json.loads(_cli("ps", "--url", server.url, "--api-key", KEY, "--json").stdout)


def test_no_server_is_one_line(tmp_path: Path) -> None:
    done = _cli("ps", "--url", "http://127.0.0.1:9")
    assert done.returncode == 17 and "gallery serve" in done.stderr and "Traceback" not in done.stderr


def test_serve_defaults_to_http_and_says_so() -> None:
    helped = _cli("serve", "--help")
    assert "127.0.0.1:8080" in helped.stdout and "HTTP" in helped.stdout


def test_list_is_installed_and_catalog_is_the_catalog(tmp_path: Path) -> None:
    env = user_env(tmp_path / "home")
    for command in ("list", "ls"):
        done = gallery(command, "--json", env=env, cwd=tmp_path)
        assert done.returncode == 0 and json.loads(done.stdout) == []
    catalog = gallery("catalog", "--json", env=env, cwd=tmp_path)
    assert catalog.returncode == 0 and "qwen3-4b-4bit" in [r["name"] for r in json.loads(catalog.stdout)]


def test_narrow_tables_wrap_instead_of_cutting_words(tmp_path: Path) -> None:
    env = user_env(tmp_path / "home")
    child = spawn("catalog", env=env, cwd=tmp_path, columns=60)
    child.expect(__import__("pexpect").EOF)
    child.close()
    text = strip_ansi(child.transcript.getvalue())
    assert child.exitstatus == 0 and "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 60
