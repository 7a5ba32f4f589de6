"""Read and write ModelConfig files (YAML or JSON), with schema errors that point at a line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gallery.config import ModelConfig
from gallery.errors import BadConfig
from gallery.yamlio import PathKey, YamlError, atomic_write, dump_yaml, load_yaml

MAX_CONFIG_BYTES = 8 * 1024 * 1024


def config_to_yaml(config: ModelConfig) -> str:
    """The config as deterministic YAML (schema key order, templates as block literals)."""
    return dump_yaml(config.to_data())


def config_to_json(config: ModelConfig) -> str:
    """The config as indented JSON in schema key order."""
    return json.dumps(config.to_data(), indent=2, ensure_ascii=False) + "\n"


def _line_for(lines: dict[PathKey, int], loc: tuple[Any, ...]) -> int | None:
    path = tuple(loc)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


def validation_messages(
    exc: ValidationError, lines: dict[PathKey, int], filename: str, prefix: tuple[Any, ...] = ()
) -> list[tuple[int | None, str]]:
    """(line, message) per schema error; `prefix` is where the config sits inside a larger document."""
    messages = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        where = ".".join(str(part) for part in loc) or "(top level)"
        text = error.get("msg", "invalid").removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            text = "unknown key (typo?)"
        messages.append((_line_for(lines, prefix + loc), f"{where}: {text}"))
    return messages


def config_from_data(data: Any, *, filename: str, lines: dict[PathKey, int] | None = None) -> ModelConfig:
    """Validate plain data as a ModelConfig. Raises BadConfig naming file, line and field."""
    if not isinstance(data, dict):
        raise BadConfig(f"{filename}: a model config must be a mapping, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        problems = validation_messages(exc, lines or {}, filename)
        first_line, first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        where = f"{filename}:{first_line}" if first_line else filename
        raise BadConfig(f"{where}: {first}{more}") from None


def parse_config_text(text: str, *, filename: str) -> ModelConfig:
    """Parse YAML (or JSON, which is YAML) text into a validated config."""
    try:
        data, lines = load_yaml(text)
    except YamlError as exc:
        where = f"{filename}:{exc.line}" if exc.line else filename
        raise BadConfig(f"{where}: {exc}") from None
    return config_from_data(data, filename=filename, lines=lines)


def read_config(path: str | Path) -> ModelConfig:
    """Read a config file. Raises BadConfig for a missing, oversized, unreadable or invalid file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise BadConfig(f"{path}: {size} bytes is too large for a model config")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadConfig(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadConfig(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise BadConfig(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise BadConfig(f"{path}: cannot read ({exc.strerror})") from None
    return parse_config_text(text, filename=str(path))


def write_config(config: ModelConfig, path: str | Path, *, overwrite: bool = False, as_json: bool = False) -> None:
    """Write a config atomically; never replaces an existing file unless overwrite."""
    text = config_to_json(config) if as_json else config_to_yaml(config)
    atomic_write(Path(path), text, overwrite=overwrite)
