"""Running the `gallery` CLI the way a person does: in a real pseudo-terminal (pexpect), or piped, with a fresh
HOME and from a working folder that is not the project's, against the loopback hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# What a spinner (rich's Live) writes last when it stops: after it, a Ctrl-C cannot land inside the spinner.
SHOW_CURSOR = "\x1b[?25h"


def user_env(home: Path, hub_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a new user: a fresh HOME (so the HF cache and the user catalog start empty), no
    project or Hugging Face settings from the test process, the project importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("HF_", "GALLERY_", "XDG_", "PYTEST", "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")
        )
    }
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1", GALLERY_HTTP_BACKOFF="0.01"
    )
    if hub_url is not None:
        env["HF_ENDPOINT"] = hub_url
    env.update(extra)
    return env


def gallery(
    *args: str, env: dict[str, str], cwd: Path, input: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`gallery ARGS` in a subprocess with pipes (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=env,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn(
    *args: str, env: dict[str, str], cwd: Path, columns: int = 80, rows: int = 24, timeout: float = 120
) -> Any:
    """`gallery ARGS` in a pseudo-terminal of the given size (pexpect.spawn; its log kept in `.transcript`)."""
    import io

    import pexpect

    child = pexpect.spawn(
        sys.executable,
        ["-m", "cli", *args],
        env={"TERM": "xterm-256color", **env},  # a terminal has a TERM, also when the suite runs without one
        cwd=str(cwd),
        dimensions=(rows, columns),
        timeout=timeout,
        encoding="utf-8",
        codec_errors="replace",
    )
    child.transcript = io.StringIO()
    child.logfile_read = child.transcript
    return child


def strip_ansi(text: str) -> str:
    """What a terminal shows at the end: control sequences removed, and of each line only what the last
    carriage return left (a spinner redraws its line in place)."""
    import re

    text = text.replace("\x1b[2K", "\r")  # erase-line: what was on the line is gone
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", text)
    return "\n".join(line.rstrip("\r").split("\r")[-1] for line in text.split("\n"))
