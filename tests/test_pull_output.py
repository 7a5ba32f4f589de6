"""Issue 22: `gallery pull` output a person can read — one rich progress display at a terminal (no tqdm bars, no
finished bar drawn again after "ready"), no bars at all when piped, and a 404 that names the missing file."""

from __future__ import annotations

from pathlib import Path

import pexpect
import pytest

from fixtures.hubserver import RecordedHub
from tests.catalog_support import TINY_REPO, make_tiny_repo
from tests.terminal_support import gallery, spawn, strip_ansi, user_env

TQDM_MARKS = ("%|", "it/s]", "B/s]")


@pytest.fixture
def hub(hub_factory, tmp_path: Path) -> RecordedHub:  # type: ignore[no-untyped-def]
    return hub_factory(extra_repos={TINY_REPO: make_tiny_repo(tmp_path / "tiny-repo")})


def test_piped_pull_prints_no_bars(hub: RecordedHub, tmp_path: Path) -> None:
    env = user_env(tmp_path / "home", hub.url)
    done = gallery("pull", TINY_REPO, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr
    assert not any(mark in done.stderr for mark in TQDM_MARKS), done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("gallery: ready: `gallery chat tiny-qwen3`")


def test_terminal_pull_draws_one_rich_display(hub: RecordedHub, tmp_path: Path) -> None:
    env = user_env(tmp_path / "home", hub.url)
    child = spawn("pull", TINY_REPO, env=env, cwd=tmp_path, columns=400)
    child.expect(r"ready: ")
    child.expect(r"\n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.transcript.getvalue()
    raw = child.transcript.getvalue()
    assert not any(mark in raw for mark in TQDM_MARKS), raw  # huggingface_hub's own bars never drew
    shown = [line for line in strip_ansi(raw).splitlines() if line.strip()]
    assert "ready: `gallery chat tiny-qwen3`" in shown[-1]  # nothing drawn after the last line
    after_display = raw.split("\x1b[?25h")[-1]  # rich shows the cursor again when its display ends
    assert "━" not in after_display and "ready: " in after_display  # and no bar is drawn after that


def test_a_missing_file_is_named(hub: RecordedHub, tmp_path: Path) -> None:
    env = user_env(tmp_path / "home", hub.url, GALLERY_HTTP_ATTEMPTS="1")
    done = gallery("pull", "mlx-community/Qwen3-4B-4bit", "--force", env=env, cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("gallery: error:")]
    assert done.returncode == 3 and len(errors) == 1, done.stderr
    assert "'model.safetensors'" in errors[0] and "404" in errors[0]
