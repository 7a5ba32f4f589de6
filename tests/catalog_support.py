"""Helpers shared by the catalog tests: copies of the bundled catalog, in-process CLI runs, YAML edits,
and a tiny installable repo (real files with real bytes) to serve from the recorded hub."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.app import main
from fixtures.hubserver import HUB_ROOT
from gallery.chat_template import template_sha256
from gallery.yamlio import dump_yaml

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "catalog"
TINY_REPO = "test-org/tiny-qwen3"


@dataclasses.dataclass
class CliResult:
    """One in-process `gallery` run."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout parsed as JSON."""
        return json.loads(self.out)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> CliResult:
    """Run `gallery ARGS…` in-process through cli.app.main and capture its output."""
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def copy_catalog(dest: Path) -> Path:
    """A copy of the bundled catalog (index + entries) in dest; returns the index path."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUNDLED / "index.yaml", dest / "index.yaml")
    shutil.copytree(BUNDLED / "entries", dest / "entries")
    return dest / "index.yaml"


def replace_in(path: Path, old: str, new: str, count: int = 1) -> None:
    """Replace text in a file, insisting that it is there."""
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count), encoding="utf-8")


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first line containing needle."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def line_after(path: Path, anchor: str, needle: str) -> int:
    """1-based line of the first line containing needle after the first line containing anchor."""
    start = line_of(path, anchor)
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines[start:], start=start + 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not after {anchor!r} in {path}")


def load_data(path: Path) -> Any:
    """A YAML file's data."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def save_data(path: Path, data: Any) -> None:
    """Write data as YAML the way the project writes it."""
    path.write_text(dump_yaml(data), encoding="utf-8")


def set_template(config_path: Path, text: str, *, repin: bool = True) -> None:
    """Replace an entry config's chat template text (and re-pin its sha256 unless told not to)."""
    data = load_data(config_path)
    data["mlx"]["chat_template"]["text"] = text
    if repin:
        data["mlx"]["chat_template"]["sha256"] = template_sha256(text)
    save_data(config_path, data)


def make_tiny_repo(folder: Path, *, weights: bytes | None = None) -> Path:
    """A small but real text-model repo (Qwen3 metadata, 2 MB of weight bytes) to serve with extra_repos."""
    source = HUB_ROOT / "mlx-community" / "Qwen3-4B-4bit"
    folder.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        shutil.copy2(source / name, folder / name)
    (folder / "README.md").write_text(
        "---\nlibrary_name: mlx\nlicense: apache-2.0\n---\n# tiny qwen3\n", encoding="utf-8"
    )
    (folder / "model.safetensors").write_bytes(
        weights if weights is not None else os.urandom(2 * 1024 * 1024)
    )
    info = {
        "pipeline_tag": "text-generation",
        "library_name": "mlx",
        "tags": ["mlx", "license:apache-2.0"],
        "gated": False,
        "card_data": {"license": "apache-2.0", "library_name": "mlx"},
    }
    (folder / "_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder
