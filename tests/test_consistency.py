"""Issue #9 (layering): one owner per concern means one verdict per input, whichever command meets it.

- The same Hub failure gives the same exit code and the same message on `import`, `add`, `install` and
  `refresh` (gallery.hub is the one translator): a refused token is the auth code everywhere, a Hub that keeps
  failing is the network code everywhere, and a 429's `Retry-After` is waited out everywhere.
- A config file gets the same verdict from `run`, `explain`, `serve` and `validate` (gallery.yamlio is the one
  loader: YAML anchors and aliases are refused, as are duplicate keys).
Every command runs as a real subprocess against the same faulty loopback Hub.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixtures.hubserver import RecordedHub
from tests.catalog_support import TINY_REPO, make_tiny_repo

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiny-qwen3"


def _gallery(args: list[str | Path], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # stdin is empty and closed: `serve --stdio` loads, sees the end of input, drains and exits.
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=180,
        input="",
    )


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("gallery: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0].removeprefix("gallery: error: ")


@pytest.fixture
def tiny(hub_factory: Any, tmp_path: Path) -> tuple[RecordedHub, dict[str, str], Path]:
    """A loopback Hub serving a small installable repo, a CLI environment on it, and a catalog holding it."""
    hub = hub_factory(extra_repos={TINY_REPO: make_tiny_repo(tmp_path / "tiny-repo")})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GALLERY_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        GALLERY_HTTP_ATTEMPTS="2",
        GALLERY_HTTP_BACKOFF="0.01",
        PYTHONPATH=str(ROOT),
    )
    index = tmp_path / "catalog" / "index.yaml"
    added = _gallery(["add", TINY_REPO, "--catalog", index], env)
    assert added.returncode == 0, added.stderr
    return hub, env, index


def _argv(command: str, index: Path, tmp_path: Path) -> list[str | Path]:
    """The command line of one command on the tiny repo, writing only into fresh places under tmp_path."""
    return {
        "import": ["import", TINY_REPO],
        "add": ["add", TINY_REPO, "--catalog", tmp_path / f"catalog-{command}" / "index.yaml"],
        "install": ["install", NAME, "--catalog", index, "--models-dir", tmp_path / f"models-{command}"],
        "refresh": ["refresh", NAME, "--catalog", index, "--json"],
    }[command]


def _every_command(env: dict[str, str], index: Path, tmp_path: Path) -> dict[str, tuple[int, str]]:
    """(exit code, one-line message) of import, add, install and refresh of the tiny repo, on an empty cache.
    refresh reports an entry's failure in its JSON report rather than on stderr."""
    results: dict[str, tuple[int, str]] = {}
    for command in ("import", "add", "install", "refresh"):
        done = _gallery(_argv(command, index, tmp_path), {**env, "HF_HOME": str(tmp_path / f"hf-{command}")})
        assert "Traceback" not in done.stderr, done.stderr
        if command == "refresh":
            entry = json.loads(done.stdout)["entries"][0]
            results[command] = (done.returncode, entry.get("error", ""))
        else:
            results[command] = (done.returncode, _error_line(done) if done.returncode else "")
    return results


def _tail(message: str) -> str:
    """A message without its leading label (which names the request that failed: model info, a file, …)."""
    return re.sub(r"^.*?: (?=the Hub )", "", message)


def test_a_refused_token_is_the_auth_code_with_one_message_on_every_command(tiny, tmp_path) -> None:
    _hub, env, index = tiny
    results = _every_command({**env, "HF_TOKEN": "hf_not_a_valid_token"}, index, tmp_path)
    codes = {command: code for command, (code, _) in results.items()}
    assert set(codes.values()) == {4}, results
    tails = {_tail(message) for _, message in results.values()}
    assert tails == {"the Hub refused the credentials (HTTP 401): check HF_TOKEN or run `hf auth login`"}, (
        results
    )


def test_a_hub_that_keeps_failing_is_the_network_code_with_one_message_on_every_command(
    tiny, tmp_path
) -> None:
    hub, env, index = tiny
    hub.inject(r".", status=503, count=10_000, headers={"Retry-After": "0"})
    results = _every_command(env, index, tmp_path)
    assert {code for code, _ in results.values()} == {7}, results
    assert {_tail(message) for _, message in results.values()} == {
        "the Hub kept failing after 2 attempts (HTTP 503)"
    }, results


def test_retry_after_is_honoured_on_every_command(tiny, tmp_path) -> None:
    """A 429 with `Retry-After: 1` on the first request each command makes: every command waits at least that
    long before asking again, then succeeds."""
    hub, env, index = tiny
    for command in ("import", "add", "install", "refresh"):
        hub.reset_stats()
        hub.inject(r".", status=429, count=1, headers={"Retry-After": "1"})
        done = _gallery(_argv(command, index, tmp_path), {**env, "HF_HOME": str(tmp_path / f"hf-{command}")})
        assert done.returncode == 0 and "Traceback" not in done.stderr, (command, done.stderr)
        records = hub.requests
        refused = next(i for i, record in enumerate(records) if record.injected)
        retry = next(r for r in records[refused + 1 :] if r.path == records[refused].path)
        assert retry.start - records[refused].end >= 0.9, (command, records[refused].path)


# ----- one verdict per config file -----
def _variants(valid: str) -> dict[str, str]:
    """The valid config, the same with a YAML anchor and alias (valid YAML the one loader refuses), and the same
    with a duplicate key."""
    alias = valid.replace("\nparameters:\n", "\nparameters: &params\n", 1) + "x-copy: *params\n"
    duplicate = valid.replace("\nbackend: mlx\n", "\nbackend: mlx\nbackend: mlx-vlm\n", 1)
    assert "&params" in alias and duplicate != valid
    return {"valid": valid, "alias": alias, "duplicate-key": duplicate}


_VALIDATE_LINE = re.compile(r"^(?P<where>\S+:\d+): error: \[[a-z-]+\] (?P<reason>.*)$")
_ERROR_LINE = re.compile(r"^(?P<where>\S+:\d+): (?P<reason>.*)$")


@pytest.mark.mlx
def test_a_config_file_gets_one_verdict_from_run_explain_serve_and_validate(
    text_qwen3_model: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT))
    imported = _gallery(["import", text_qwen3_model], env)
    assert imported.returncode == 0, imported.stderr
    for kind, text in _variants(imported.stdout).items():
        path = tmp_path / f"{kind}.yaml"
        path.write_text(text, encoding="utf-8")
        validate = _gallery(["validate", path], env)
        explain = _gallery(["explain", path], env)
        run = _gallery(["run", path, "--prompt", "Hi", "--max-tokens", "2"], env)
        serve = _gallery(["serve", path, "--stdio"], env)  # stdin closed at once: load, drain, exit
        if kind == "valid":
            for done in (validate, explain, run, serve):
                assert done.returncode == 0, (kind, done.args[3:], done.stdout, done.stderr)
            continue
        # Refused by every command, at the same line, for the same reason.
        reasons = set()
        for done in (explain, run, serve):
            assert done.returncode == 13, (kind, done.args[3:], done.stderr)
            match = _ERROR_LINE.match(_error_line(done))
            assert match, done.stderr
            reasons.add((match["where"], match["reason"]))
        found = [m for m in map(_VALIDATE_LINE.match, validate.stdout.splitlines()) if m]
        assert {(m["where"], m["reason"]) for m in found} == reasons, (kind, validate.stdout, reasons)
        # validate's own codes: 13 when it cannot read the file at all (aliases), 14 for problems it found.
        assert validate.returncode == (13 if kind == "alias" else 14), (kind, validate.stdout)
        assert ("anchors and aliases" if kind == "alias" else "duplicate key 'backend'") in next(
            iter(reasons)
        )[1]
