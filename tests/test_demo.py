"""Issue 22: `./run demo` leaves a working model, and the command its last line prints works afterwards — in a
fresh environment, with no hub and no network (the demo's recorded hub is gone by then)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_last_line_works_afterwards(smollm2_model: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GALLERY_"))}
    env.update(GALLERY_DEMO_DIR=str(tmp_path / "demo"), PYTHONPATH=str(ROOT))
    demo = subprocess.run(
        [sys.executable, "-m", "fixtures.demo"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    last = demo.stdout.strip().splitlines()[-1]
    words = shlex.split(last)
    assert words[:3] == ["gallery", "chat", "smollm2-135m-instruct"], last
    # A user's shell afterwards: no recorded hub, offline, an HF cache and a catalog of its own.
    fresh = {
        **env,
        "HF_HOME": str(tmp_path / "fresh-hf"),
        "GALLERY_HOME": str(tmp_path / "fresh-home"),
        "HF_HUB_OFFLINE": "1",
    }
    chat = subprocess.run(
        [sys.executable, "-m", "cli", *words[1:], "--max-tokens", "16"],
        input="What is the capital of France?\n/exit\n",
        capture_output=True,
        text=True,
        env=fresh,
        cwd=tmp_path,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout and "Traceback" not in chat.stderr
