"""The floors hold: dependencies point one way, MLX stays in backends, and the foundation imports nothing above it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOUNDATION = (
    "gallery.config",
    "gallery.configfile",
    "gallery.errors",
    "gallery.yamlio",
    "gallery.chat_template",
    "gallery.template_sandbox",
    "gallery.hub",
    "gallery.families",
    "gallery.commandline",
)
ABOVE = ("importers", "catalog", "backends", "runtime", "cli", "fixtures", "mlx", "mlx_lm", "mlx_vlm")


def test_the_import_contracts_hold() -> None:
    """import-linter reads the real import graph (function-level imports included) against pyproject's contracts."""
    script = Path(sys.executable).with_name(
        "lint-imports"
    )  # installed with the dev extra, beside this Python
    done = subprocess.run([str(script), "--no-cache"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and done.stdout.count("KEPT") >= 5


def test_the_foundation_pulls_in_nothing_above_it() -> None:
    code = (
        f"import importlib, json, sys\nfor name in {FOUNDATION!r}:\n    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {ABOVE!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
